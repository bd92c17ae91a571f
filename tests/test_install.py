"""Packaging (issue #20): conf/ maps into the installed tree as harness/conf, the CLI finds its
configs there after a normal install (and conf/ in a clone), ``sanity --version`` names the
clone's commit only, and the console scripts and sub-commands resolve. The wheel itself is built,
installed and run from outside the clone by ``.ci/wheel_test.sh`` (``make wheel-test``)."""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import CONF_DIR

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def python(code: str, *args: str, path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120, check=False)


def test_every_conf_folder_is_a_mapped_package():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"harness.conf": "conf",  # and Hydra's namespace:
                                         "hydra_plugins": "harness/hydra_plugins"}
    folders = {p.parent for p in (ROOT / "conf").rglob("*.yaml")}
    wanted = {".".join(("harness", *p.relative_to(ROOT).parts)) for p in folders}
    assert wanted <= set(setuptools["packages"]), wanted - set(setuptools["packages"])
    assert "*.yaml" in setuptools["package-data"]["*"]


def test_conf_dir_in_a_clone_is_the_top_level_conf():
    assert CONF_DIR == ROOT / "conf" and (CONF_DIR / "config.yaml").is_file()


def test_installed_layout_finds_harness_conf_not_site_packages_conf(tmp_path):
    """The wheel's layout: site-packages/harness/conf; a stray site-packages/conf (the old
    lookup) is ignored."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "harness", site / "harness",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", site / "harness" / "conf")
    (site / "conf").mkdir()
    (site / "conf" / "config.yaml").write_text("defaults: []\n")
    done = python("import harness.cli as c; print(c.CONF_DIR); print(c.options('method'))",
                  path=site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    conf_dir, methods = done.stdout.splitlines()
    assert Path(conf_dir) == site / "harness" / "conf"
    assert "'gradient'" in methods and "'smoothgrad'" in methods


def test_version_from_the_clone_names_its_commit():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=False).stdout.strip()
    if not head:
        pytest.skip("not a git clone")
    done = subprocess.run([sys.executable, "-m", "harness.cli", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    version = PYPROJECT["project"]["version"]
    assert done.stdout.startswith(f"sanity-harness {version} (git {head}")


def test_version_inside_another_repository_has_no_commit(tmp_path):
    """A copy of the package in a .venv inside the user's own git project is an installed
    package: neither --version nor run.json may report that project's commit."""
    project = tmp_path / "project"
    site = project / ".venv" / "site-packages"
    shutil.copytree(ROOT / "harness", site / "harness",
                    ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=project, check=True)
    done = python("from harness.version import git_sha, version_line; "
                  "print(repr(git_sha())); print(version_line())", path=site, cwd=project)
    assert done.returncode == 0, done.stderr
    sha, line = done.stdout.splitlines()
    assert sha == "''" and line.startswith("sanity-harness ") and "git" not in line


@pytest.mark.parametrize("name", sorted(PYPROJECT["project"]["scripts"]))
def test_console_scripts_resolve(name):
    module, function = PYPROJECT["project"]["scripts"][name].split(":")
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("command,status,message", [
    ("figures", 1, "error: {} is not a directory"),
    ("collect", 2, "sanity-collect: error: {} is not a directory")])
def test_subcommands_run_the_console_scripts(command, status, message, tmp_path):
    missing = tmp_path / "missing"
    done = python("import sys; from harness.cli import main; sys.argv = ['sanity', *sys.argv[1:]];"
                  " main()", command, str(missing), path=ROOT, cwd=tmp_path)
    assert done.returncode == status and done.stderr.strip() == message.format(missing)
