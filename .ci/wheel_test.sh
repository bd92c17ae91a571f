#!/usr/bin/env bash
# The pip-install way (issue #20), after `make install`:
#  1. build the sdist from the work tree (tracked and untracked files, ignored ones left out), then
#     the wheel from that sdist (as `pip install` does from an index), and check that both carry
#     every conf/**.yaml and every module;
#  2. install the wheel, not editable, into a separate env whose only dependencies are .venv's
#     (one .pth line: nothing is downloaded, the editable install stays invisible);
#  3. from a temporary folder outside the clone: `sanity --version`, `sanity list`, the small
#     check, `sanity figures` and `sanity verify` on its run (exit 0, one verdict line); outputs
#     under that folder's results/, installed tree unchanged;
#  4. the same check through the clone (editable) from another folder: the same table.
# Usage: bash .ci/wheel_test.sh  (VENV=path to use another dependency env than .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
export HF_HUB_OFFLINE=1
START=$SECONDS
TMP=$(mktemp -d "${TMPDIR:-/tmp}/sanity-wheel-test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
case "$TMP/" in "$ROOT"/*) echo "wheel-test: $TMP lies inside the clone" >&2; exit 1;; esac
CHECK=(model=tiny_cnn dataset=digits dataset.n=2 'method=[gradient]' device=cpu progress=false)
say() { echo "[wheel-test $((SECONDS - START))s] $*"; }

say "1. sdist and wheel"
mkdir -p "$TMP/src" "$TMP/dist"
git ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && xargs -0 sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' sh) \
    | tar -C "$ROOT" --null -T - -cf - | tar -C "$TMP/src" -xf -
(cd "$TMP/src" && "$PY" -c "from setuptools import build_meta as b; b.build_sdist('$TMP/dist')" \
    > "$TMP/sdist.log" 2>&1) || { cat "$TMP/sdist.log" >&2; exit 1; }
"$VENV/bin/pip" wheel --quiet --no-deps "$TMP"/dist/*.tar.gz -w "$TMP/dist"
"$PY" - "$ROOT" "$TMP/dist" <<'EOF'
"""Every conf/**.yaml and every module of the four packages is in the sdist and in the wheel."""
import subprocess, sys, tarfile, zipfile
from pathlib import Path

root, dist = Path(sys.argv[1]), Path(sys.argv[2])
tracked = subprocess.run(["git", "ls-files", "conf", "harness", "methods", "checks", "metrics"],
                         cwd=root, capture_output=True, text=True, check=True).stdout.split()
wanted = {p for p in tracked if p.endswith((".yaml", ".py")) and (root / p).is_file()}
confs = {p for p in wanted if p.startswith("conf/")}
(sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
in_wheel = set(zipfile.ZipFile(wheel).namelist())
def installed_as(path: str) -> str:  # conf/ -> harness/conf/, Hydra's namespace to its own
    if path.startswith("conf/"):
        return "harness/" + path
    return path.removeprefix("harness/") if path.startswith("harness/hydra_plugins/") else path


as_installed = {installed_as(p) for p in wanted}
missing = sorted(wanted - in_sdist) + sorted(as_installed - in_wheel)
if missing:
    sys.exit(f"wheel-test: missing from {sdist.name} / {wheel.name} (a new conf/ folder needs "
             f"its harness.conf.* line in pyproject.toml): {', '.join(missing)}")
print(f"{wheel.name}: {len(in_wheel)} files, {len(confs)} of {len(confs)} conf/**.yaml "
      f"(as harness/conf/), {len(wanted) - len(confs)} modules; {sdist.name} carries them too")
EOF

say "2. non-editable install into $TMP/env (dependencies: $VENV)"
"$PY" -m venv --without-pip "$TMP/env"
ENV_SITE=$("$TMP/env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
    | sort -u > "$ENV_SITE/sanity-harness-deps.pth"
# pip sees .venv's (editable) sanity-harness through the .pth line and leaves it alone
# ("outside environment"); the env's own copy comes first on sys.path.
"$VENV/bin/pip" --python "$TMP/env/bin/python" install --quiet --no-deps --no-index \
    "$TMP"/dist/*.whl
snapshot() { (cd "$ENV_SITE" && find harness methods checks metrics -name __pycache__ -prune \
    -o -type f -printf '%p %s %T@\n' | sort); }
snapshot > "$TMP/installed.before"

say "3. the installed sanity, run from $TMP/work"
mkdir -p "$TMP/work" "$TMP/editable"
cd "$TMP/work"
INSTALLED=(env -u PYTHONPATH "$TMP/env/bin/sanity")
"${INSTALLED[@]}" --version | tee "$TMP/version.txt"
grep -q "^sanity-harness [0-9]" "$TMP/version.txt"
! grep -q "git" "$TMP/version.txt"  # an installed package has no commit of its own
env -u PYTHONPATH "$TMP/env/bin/python" -c "
import sys, harness, harness.cli as cli
site = sys.argv[1]
assert harness.__file__.startswith(site), harness.__file__
assert cli.CONF_DIR == cli.Path(site) / 'harness' / 'conf', cli.CONF_DIR" "$ENV_SITE"
"${INSTALLED[@]}" list > "$TMP/list.txt"
grep -q "tiny_cnn" "$TMP/list.txt" && grep -q "adebayo2018_cascading" "$TMP/list.txt"
"${INSTALLED[@]}" "${CHECK[@]}" > "$TMP/run.log" 2>&1 || { cat "$TMP/run.log" >&2; exit 1; }
"${INSTALLED[@]}" figures results/runs/* > "$TMP/figures.txt"
grep -q "^$TMP/work/results/runs/.*\.png$\|^results/runs/.*\.png$" "$TMP/figures.txt"
"${INSTALLED[@]}" verify results/runs/* > "$TMP/verify.txt" \
    || { cat "$TMP/verify.txt" >&2; echo "wheel-test: sanity verify failed" >&2; exit 1; }
[ "$(wc -l < "$TMP/verify.txt")" = 1 ] && grep -q "^WHOLE" "$TMP/verify.txt" \
    || { cat "$TMP/verify.txt" >&2; echo "wheel-test: sanity verify: not one WHOLE line" >&2; exit 1; }
[ "$(ls -A "$TMP/work")" = results ] \
    || { echo "wheel-test: the cwd holds $(ls -A), not only results/" >&2; exit 1; }
snapshot > "$TMP/installed.after"
diff "$TMP/installed.before" "$TMP/installed.after" \
    || { echo "wheel-test: the run wrote into the installed package" >&2; exit 1; }

say "4. the clone's sanity (editable), run from $TMP/editable"
cd "$TMP/editable"
PYTHONPATH="$ROOT" "$PY" -c "import harness, sys; assert harness.__file__.startswith(sys.argv[1])" \
    "$ROOT/"
PYTHONPATH="$ROOT" "$VENV/bin/sanity" "${CHECK[@]}" > "$TMP/run-editable.log" 2>&1 \
    || { cat "$TMP/run-editable.log" >&2; exit 1; }
"$PY" - "$TMP/work" "$TMP/editable" <<'EOF'
"""Both installs wrote one run under their own cwd's results/, with the same dir name (config
digest) and the same table: same rows and values, run_id aside."""
import sys
from pathlib import Path

import pandas as pd

installed, editable = (sorted(Path(d).glob("results/runs/*/rows")) for d in sys.argv[1:3])
assert len(installed) == len(editable) == 1, (installed, editable)
a, b = (pd.read_parquet(rows) for rows in (installed[0], editable[0]))
assert installed[0].parent.name == editable[0].parent.name, "different config digests"
assert a["run_id"].nunique() == b["run_id"].nunique() == 1 and len(a) > 0
a, b = (t.drop(columns="run_id") for t in (a, b))
assert list(a.columns) == list(b.columns), (list(a.columns), list(b.columns))
keys = [c for c in a.columns if c != "value"]
a, b = (t.sort_values(keys, kind="stable").reset_index(drop=True) for t in (a, b))
pd.testing.assert_frame_equal(a, b, check_exact=True)
print(f"same table: {len(a)} rows x {a.shape[1]} columns (run_id aside), "
      f"run dir results/runs/{installed[0].parent.name} in both")
EOF
say "passed"
