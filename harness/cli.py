"""The ``sanity`` console script: a Hydra app over :func:`harness.run.run`.

Registry names given on the command line are checked against ``conf/`` before Hydra starts, so
a typo fails in one line that lists the valid choices (Hydra's own message spans many lines).
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CHOICE_GROUPS = ("model", "dataset", "method", "check", "metric", "experiment")
_OVERRIDE = re.compile(r"^[+~]{0,2}(?P<group>[a-z_]+)=(?P<value>.*)$")


class UsageError(Exception):
    """A bad command line or config: reported in one line, exit status 2."""


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def validate_overrides(argv: list[str]) -> None:
    """Raise UsageError for an unknown option of a registry group (``method=[a,typo]``)."""
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if not match or match["group"] not in CHOICE_GROUPS:
            continue
        value = match["value"].strip()
        if value.startswith("choice(") or value.startswith("range("):
            value = value[value.index("(") + 1: -1]
        for name in re.split(r"[,\[\]\s]+", value):
            if name and name != "null" and name not in options(match["group"]):
                raise UsageError(f"unknown {match['group']} {name!r}; valid choices: "
                                 f"{', '.join(options(match['group']))}")


def _app():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        from harness.registry import UnknownNameError
        from harness.run import run, summary

        for noisy in ("fontTools", "matplotlib", "PIL"):  # Hydra logs at INFO: keep them quiet
            logging.getLogger(noisy).setLevel(logging.WARNING)
        hydra_cfg = HydraConfig.get()
        choices = OmegaConf.to_container(hydra_cfg.runtime.choices)
        run_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            run(cfg, choices, run_dir)
        except (UnknownNameError, ValueError, FileNotFoundError, RuntimeError) as err:
            print(f"sanity: error: {err}", file=sys.stderr)
            sys.exit(2)
        print(summary(run_dir))
        print(f"[sanity] rows: {run_dir / 'rows'}\n[sanity] run record: {run_dir / 'run.json'}"
              f"\n[sanity] figures: {run_dir / 'figures'}")

    return app


def main() -> None:
    try:
        validate_overrides(sys.argv[1:])
    except UsageError as err:
        print(f"sanity: error: {err}", file=sys.stderr)
        sys.exit(2)
    _app()()


if __name__ == "__main__":
    main()
