"""The ``sanity`` console script: a Hydra app over :func:`harness.run.run`.

Before Hydra starts, the command line is checked (registry names against ``conf/``, the output
dir for writability), so a typo fails in one line (Hydra's own message spans many lines).
``sanity list`` (also ``sanity-list``) lists what can be chosen; ``sanity figures`` and
``sanity collect`` are ``sanity-figures`` and ``sanity-collect``; ``sanity verify DIR`` checks a
run or sweep dir against its manifests (``harness.verify``); ``sanity report DIR`` remakes a
run's or a sweep's report.html; ``sanity --version``.

The configs are the repository's top-level ``conf/``, installed as package data in
``harness/conf`` (pyproject.toml): :data:`CONF_DIR` is that folder after a normal install and the
clone's ``conf/`` when the package runs from a clone. Outputs go under the current directory
(``results/``, or ``hydra.run.dir``), caches under ``cache_dir``; nothing is written into the
installed package.

Run dirs are deterministic so that rerunning a command resumes it: a single run's dir is named by
the ``sanity_digest`` resolver (a digest of the resolved config), a sweep's dir by a digest of
the command's overrides (the launcher left out: a sweep started locally resumes on SLURM).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from harness.console import counted


def _conf_dir() -> Path:
    """``harness/conf`` of an installed package, else the top-level ``conf/`` of the clone."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if (installed / "config.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()
CHOICE_GROUPS = ("model", "dataset", "method", "check", "metric", "experiment", "input_bias_task")
_OVERRIDE = re.compile(r"^[+~]{0,2}(?P<group>[a-z_]+)=(?P<value>.*)$")
SWEEPS_DIR = "results/sweeps"
RUNS_DIR = "results/runs"
# overrides that change no result: left out of a sweep's digest
NEUTRAL = ("hydra/launcher=", "hydra.launcher.", "progress=", "figures=", "resume=")


def _digest_resolver(*, _root_) -> str:
    """``${sanity_digest:}``: the digest of the whole resolved config (harness.store)."""
    from harness.store import config_digest

    config = {k: OmegaConf.to_container(_root_[k], resolve=True)
              if OmegaConf.is_config(_root_[k]) else _root_[k] for k in _root_ if k != "hydra"}
    return config_digest(config)


if not OmegaConf.has_resolver("sanity_digest"):  # also registered in launcher job processes
    OmegaConf.register_new_resolver("sanity_digest", _digest_resolver)
if not OmegaConf.has_resolver("sanity_selected"):  # `sanity --help`: the selected methods
    OmegaConf.register_new_resolver(
        "sanity_selected", lambda group, *, _root_: ",".join(_root_.get(group) or {}))


class UsageError(Exception):
    """A bad command line or config: reported in one line, exit status 2."""


def options(group: str, conf_dirs: tuple[Path, ...] = ()) -> list[str]:
    """The options of a config group in ``conf/`` and in the user's config dirs."""
    return sorted({p.stem for d in (CONF_DIR, *conf_dirs) for p in (d / group).glob("*.yaml")})


def user_conf_dirs(argv: list[str]) -> tuple[Path, ...]:
    """Config dirs a command line adds (``hydra.searchpath=[file://DIR,...]``,
    ``--config-dir DIR`` / ``-cd DIR``), and those of installed plugins."""
    from harness.plugins import load_plugins

    dirs = []
    for i, arg in enumerate(argv):
        if arg.startswith("hydra.searchpath="):
            dirs += [Path(e.strip().removeprefix("file://")) for e in re.split(
                r"[,\[\]]", arg.split("=", 1)[1]) if e.strip().startswith("file://")]
        elif arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
    return (*dirs, *load_plugins())


def plugin_searchpath(argv: list[str]) -> list[str]:
    """``hydra.searchpath=[...]`` with the plugins' config dirs added to the user's (if any)."""
    from harness.plugins import load_plugins

    plugins = [f"file://{d}" for d in load_plugins()]
    if not plugins:
        return []
    given = [a for a in argv if a.startswith("hydra.searchpath=")]
    entries = [e.strip() for a in given for e in re.split(r"[,\[\]]", a.split("=", 1)[1])
               if e.strip()]
    for arg in given:
        sys.argv.remove(arg)
    return [f"hydra.searchpath=[{','.join(entries + plugins)}]"]


def validate_overrides(argv: list[str]) -> None:
    """Raise UsageError for an unknown option of a registry group (``method=[a,typo]``) or an
    unknown key of a selected option (``method.smoothgrad.n_sample=4``; ``+key`` adds a key
    on purpose and is checked against the function when the run is planned)."""
    check_override_syntax(argv)
    conf_dirs = user_conf_dirs(argv)
    check_override_keys(argv, conf_dirs)
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if not match or match["group"] not in CHOICE_GROUPS:
            continue
        value = match["value"].strip()
        if value.startswith("choice(") or value.startswith("range("):
            value = value[value.index("(") + 1: -1]
        valid = options(match["group"], conf_dirs)
        for name in re.split(r"[,\[\]\s]+", value):
            if name and name != "null" and name not in valid:
                raise UsageError(f"unknown {match['group']} {name!r}; valid choices: "
                                 f"{', '.join(valid)}")


def check_override_syntax(argv: list[str]) -> None:
    """Hydra's grammar, checked first: its own message spans several lines."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    for arg in overrides:
        try:
            OverridesParser.create().parse_overrides([arg])
        except OverrideParseException as err:
            reason = str(err).strip().splitlines()[0]
            raise UsageError(f"cannot read {arg!r}: {reason} (override syntax: "
                             "https://hydra.cc/docs/advanced/override_grammar/basic)") from None


_KEY = re.compile(r"^(?P<group>model|dataset|method|check|metric)\.(?P<path>[\w.]+)=")


def check_override_keys(argv: list[str], conf_dirs: tuple[Path, ...]) -> None:
    """``<group>.<key>=v`` without ``+`` for a key the selected option's yaml lacks: Hydra
    would refuse it in six lines; here it is one line naming the valid keys."""
    for arg in argv:
        match = _KEY.match(arg)
        if not match:
            continue
        group, path = match["group"], match["path"].split(".")
        if group in ("method", "metric"):  # method.<name>.<key>: the node of that option
            node = _option_node(group, path[0], conf_dirs)
            if node is not None and len(path) > 1:
                node = node.get(path[0], {})
                _check_key(f"{group}.{path[0]}", path[1], node)
        else:
            node = _option_node(group, _selected(argv, group), conf_dirs)
            if node is not None:  # with the keys config.yaml gives every option of the group
                top = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"),
                                             resolve=False).get(group) or {}
                _check_key(group, path[0], {**node, **top})


def _check_key(prefix: str, key: str, node) -> None:
    if key not in node:
        raise UsageError(f"{prefix}.{key}: unknown key; valid keys: {', '.join(node) or 'none'}"
                         f" (a key the yaml lacks but the function takes: +{prefix}.{key}=...)")


def _selected(argv: list[str], group: str) -> str:
    """The option of ``group`` the command line selects, else the default of config.yaml."""
    for arg in reversed(argv):  # the last one wins, as in Hydra
        if arg.startswith(f"{group}="):
            return arg.split("=", 1)[1]
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", [])
    chosen = [d[group] for d in defaults if OmegaConf.is_dict(d) and group in d]
    return str(chosen[0]) if chosen else ""


def _option_node(group: str, name: str, conf_dirs: tuple[Path, ...]):
    """The yaml of an option, or None when it is not a single known file (a sweep, a list)."""
    for folder in (CONF_DIR, *conf_dirs):
        path = folder / group / f"{name}.yaml"
        if re.fullmatch(r"\w+", name or "") and path.is_file():
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            return {k: v for k, v in loaded.items() if k != "defaults"}
    return None


def _app():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> str | None:
        from harness.allocator import tune_allocator
        from harness.base.registry import UnknownNameError
        from harness.console import log_console
        from harness.run import run, summary
        from harness.store import RunDirTaken, record_failure

        tune_allocator()  # also in a launcher's job process (a no-op when already set)

        for noisy in ("fontTools", "matplotlib", "PIL"):  # Hydra logs at INFO: keep them quiet
            logging.getLogger(noisy).setLevel(logging.WARNING)
        hydra_cfg = HydraConfig.get()
        choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
        run_dir = Path(hydra_cfg.runtime.output_dir)
        log_console(run_dir / "cli.log")  # what the run prints, kept with it
        use_allocated_cpus()
        stop_on_signals(run_dir)
        try:
            run(cfg, choices, run_dir)
        except (UnknownNameError, ValueError, FileNotFoundError, RuntimeError) as err:
            if not isinstance(err, RunDirTaken):  # the dir is another run's: left alone
                record_failure(run_dir, str(err))
            print(f"sanity: error: {err}", file=sys.stderr)
            if hydra_cfg.mode == RunMode.MULTIRUN:
                return  # the other jobs go on; main() and sanity-collect report the failure
            sys.exit(2)
        except Exception as err:  # a bug: the traceback goes to the log, one line to collect
            record_failure(run_dir, f"{type(err).__name__}: {err} (traceback in the job's log)")
            raise
        print(summary(run_dir))
        print(f"[sanity] rows: {run_dir / 'rows'}\n[sanity] run record: {run_dir / 'run.json'}")
        if cfg.figures:  # no path for what was not written
            print(f"[sanity] figures: {run_dir / 'figures'}")
        print(f"[sanity] report: {run_dir / 'report.html'}")
        record = json.loads((run_dir / "run.json").read_text())
        # what a launcher logs for the job: a sweep on a cluster shows what each job did
        return (f"{counted(record['parts_kept'], 'part')} kept, "
                f"{counted(record['parts_computed'], 'part')} computed, "
                f"{counted(record['rows'], 'row')} ({run_dir})")

    return app


def is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def sweep_dir_override(argv: list[str]) -> list[str]:
    """``hydra.sweep.dir=results/sweeps/<digest>`` for a multirun without one: the same
    command gets the same sweep dir, so rerunning it resumes every job."""
    if not is_multirun(argv) or any(a.startswith("hydra.sweep.dir=") for a in argv):
        return []
    overrides = sorted(a for a in argv if not a.startswith("-") and not a.startswith(NEUTRAL))
    digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:12]
    return [f"hydra.sweep.dir={SWEEPS_DIR}/{digest}"]


def check_writable(argv: list[str]) -> None:
    """Raise UsageError when the output dir (given or default) cannot be written."""
    given = [a.split("=", 1)[1] for a in argv
             if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    for folder in given or [SWEEPS_DIR if is_multirun(argv) else RUNS_DIR]:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            probe = Path(folder) / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise UsageError(f"output dir {folder} is not writable ({err.strerror or err}); "
                             "choose another with hydra.run.dir=PATH "
                             "(hydra.sweep.dir=PATH for -m)") from err


def main() -> None:
    from harness.allocator import tune_allocator

    tune_allocator()  # before torch allocates: the entry point, not an import, sets it
    stop_on_signals()  # also while loading: one line, no traceback
    argv = sys.argv[1:]
    if argv[:1] == ["list"]:
        list_main()
        return
    if argv[:1] == ["verify"]:  # before anything heavy: it reads with pyarrow only
        from harness.verify import main as verify_main

        sys.exit(verify_main(argv[1:]))
    if argv[:1] == ["--version"]:
        from harness.version import version_line

        print(version_line())
        return
    if argv[:1] == ["report"]:  # remake a run's or a sweep's report.html
        from harness import report

        sys.exit(report.main(argv[1:]))
    if argv[:1] in (["figures"], ["collect"]):  # the same as sanity-figures, sanity-collect
        from harness import collect, figures

        sys.exit((figures if argv[0] == "figures" else collect).main(argv[1:]))
    try:
        validate_overrides(argv)
        if not {"--help", "-h", "--hydra-help"} & set(argv):  # help writes nothing
            check_writable(argv)
    except UsageError as err:
        print(f"sanity: error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.argv += sweep_dir_override(argv) + plugin_searchpath(argv)
    _app()()
    if is_multirun(argv):
        status = report_failed_jobs(sys.argv[1:])
        write_sweep_report(sys.argv[1:])
        sys.exit(status)


def report_failed_jobs(argv: list[str]) -> int:
    """After a sweep: one line per job that failed (with its error), is unfinished (cancelled,
    killed) or missing, and status 1; nothing and status 0 when every job finished."""
    from harness.collect import sweep_report

    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")]
    if not given or not Path(given[-1]).is_dir():
        return 0
    report = sweep_report(given[-1])
    if report.complete:
        return 0
    for line in report.lines():
        print(f"sanity: {line}", file=sys.stderr)
    print(f"sanity: error: the sweep is incomplete; see sanity-collect {given[-1]}",
          file=sys.stderr)
    return 1


def write_sweep_report(argv: list[str]) -> None:
    """The sweep's report.html (each job wrote its own)."""
    from harness.report import write_report

    given = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.sweep.dir=")]
    if given and Path(given[-1]).is_dir():
        print(f"[sanity] sweep report: {write_report(given[-1])}")


class Stopped(SystemExit):
    """Ctrl-C or SIGTERM: not an error of the run (collect reports it unfinished)."""


SIGNALS = {"SIGINT": (130, "Ctrl-C"), "SIGTERM": (143, "SIGTERM")}  # exit status 128 + signum


def stop_on_signals(run_dir: Path | None = None) -> None:
    """Ctrl-C (SIGINT) and SIGTERM (what SLURM sends on ``scancel``, the time limit or
    preemption) stop the run at once with one line and exit 130 / 143. Every file is renamed
    into place whole, so what is interrupted is a temporary file (removed by the next run) or
    a buffered unfinished stage (never written): rerunning the same command resumes. Inside a
    SLURM job this matters too: submitit ignores SIGTERM, so a cancelled job computed on until
    SLURM's KillWait (30 s by default) and could finish after squeue said CANCELLED."""
    import signal

    def stop(signum, frame):
        from harness.store import finished_parts

        name = signal.Signals(signum).name
        status, what = SIGNALS[name]
        if "SLURM_JOB_ID" in os.environ and name == "SIGTERM":
            what = "SIGTERM (scancel, time limit or preemption)"
        kept = (f"{len(finished_parts(run_dir))} finished parts kept in {run_dir}"
                if run_dir is not None else "nothing was computed")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: no traceback either
        print(f"[sanity] stopped by {what}: {kept}; rerun the same command to resume",
              file=sys.stderr, flush=True)
        raise Stopped(status)

    for name in SIGNALS:
        signal.signal(getattr(signal, name), stop)


def use_allocated_cpus() -> None:
    """Inside a SLURM job, torch uses the job's CPUs (``cpus_per_task``), not every core of the
    node: without cgroups a job sees the whole node, and jobs sharing it oversubscribe it."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(int(cpus))


def descriptions() -> dict[str, dict[str, str]]:
    """Every choice of every group with its one-line description: the first docstring line of
    registry entries, the description comment of experiment presets."""
    from harness.plan import registries

    table = {group: {name: _first_line(fn.__doc__) for name, fn in sorted(registry.items())}
             for group, registry in registries().items()}
    table["experiment"] = {name: experiment_description(CONF_DIR / "experiment" / f"{name}.yaml")
                           for name in options("experiment")}
    return table


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def experiment_description(path: Path) -> str:
    """The first comment line after ``# @package _global_``."""
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if line.startswith("#") and text and not text.startswith("@package"):
            return text
    return ""


def list_main() -> None:
    """``sanity list``: models, datasets, methods, checks, metrics and experiments."""
    for group, entries in descriptions().items():
        print(f"{group}s:")
        width = max(map(len, entries), default=0)
        for name, text in entries.items():
            print(f"  {name:<{width}}  {text}")


if __name__ == "__main__":
    main()
