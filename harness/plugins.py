"""Entries from installed packages: a distribution that declares an entry point in the group
``sanity_harness.plugins`` adds models, datasets, methods, checks or metrics without touching
the harness. The entry point names a module; importing it registers its entries (with the
registries' decorators). A ``conf/`` folder beside that module (``conf/<group>/<name>.yaml``) is
added to Hydra's search path, so the CLI selects the entries like its own.

    # the plugin's pyproject.toml
    [project.entry-points."sanity_harness.plugins"]
    my_lab = "my_lab.sanity"        # my_lab/sanity.py registers; my_lab/conf/method/*.yaml
"""
from __future__ import annotations

import importlib
from functools import cache
from importlib import metadata
from pathlib import Path

GROUP = "sanity_harness.plugins"


@cache
def load_plugins() -> tuple[Path, ...]:
    """Import every plugin module (once); the ``conf/`` folders beside them."""
    conf_dirs = []
    for entry in metadata.entry_points(group=GROUP):
        try:
            module = importlib.import_module(entry.value)
        except ImportError as err:
            raise ValueError(f"plugin {entry.name} ({entry.value}, entry point of "
                             f"{entry.dist.name if entry.dist else '?'}): cannot import it: "
                             f"{err}") from None
        conf = Path(module.__file__).resolve().parent / "conf"
        if conf.is_dir():
            conf_dirs.append(conf)
    return tuple(conf_dirs)
