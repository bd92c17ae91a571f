"""The package's version, and the git commit it runs from (``sanity --version``, ``run.json``).

The commit is reported only when the package's own source is a clone: the imported ``harness``
folder lies at the top level of a git work tree (an editable install, or ``PYTHONPATH`` pointing
into a clone). An installed wheel has none, also when its environment sits inside some other git
repository (a ``.venv`` in the user's own project folder must not lend that project's commit).
"""
from __future__ import annotations

import re
import subprocess
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "sanity-harness"
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the clone's root, or site-packages


def package_version() -> str:
    """The installed distribution's version; from a clone that is not installed, pyproject's."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pyproject = SOURCE_ROOT / "pyproject.toml"
        found = pyproject.is_file() and re.search(r'^version\s*=\s*"([^"]+)"',
                                                  pyproject.read_text(), re.MULTILINE)
        return found.group(1) if found else "unknown"


def git_sha() -> str:
    """HEAD of the clone the package runs from; "" for an installed package (or without git)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=SOURCE_ROOT,
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = done.stdout.split()
    if done.returncode or len(lines) != 2 or Path(lines[0]).resolve() != SOURCE_ROOT:
        return ""
    return lines[1]


def _uncommitted() -> bool:
    """Whether tracked files of the clone differ from HEAD."""
    try:
        return subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=SOURCE_ROOT,
                              capture_output=True, timeout=5, check=False).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return False


def version_line() -> str:
    """``sanity-harness 0.1.0 (git <sha>)`` from a clone (``, modified`` with uncommitted changes),
    ``sanity-harness 0.1.0`` installed."""
    sha = git_sha()
    if sha and _uncommitted():
        sha += ", modified"
    return f"{DISTRIBUTION} {package_version()}" + (f" (git {sha})" if sha else "")
