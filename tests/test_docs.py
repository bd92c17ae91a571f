"""The documentation names everything a user can choose: every registry entry and every preset
appears in README.md or CONTRIBUTING.md as code (in backticks or a code block), so a new entry
without a line of documentation fails here."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from checks import CHECKS
from harness.data import DATASETS
from harness.zoo import MODELS
from methods import METHODS
from metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "CONTRIBUTING.md")
REGISTRIES = {"model": MODELS, "dataset": DATASETS, "method": METHODS, "check": CHECKS,
              "metric": METRICS}
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def code_words() -> set[str]:
    """Identifiers inside fenced code blocks and inline code spans of the docs."""
    words = set()
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        blocks = re.findall(r"```.*?```", text, flags=re.DOTALL)
        inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
        for code in blocks + inline:
            words.update(re.findall(r"[A-Za-z0-9_]+", code))
    return words


WORDS = code_words()


@pytest.mark.parametrize("kind,name", [(kind, name) for kind, registry in REGISTRIES.items()
                                       for name in sorted(registry)])
def test_every_registry_entry_is_documented(kind, name):
    assert name in WORDS, f"{kind} {name!r} is not named (as code) in {' or '.join(DOCS)}"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_documented(preset):
    assert preset in WORDS, f"preset {preset!r} is not named (as code) in {' or '.join(DOCS)}"


def test_contributing_has_a_section_per_kind_of_entry():
    headings = re.findall(r"^## (.+)$", (ROOT / "CONTRIBUTING.md").read_text(), flags=re.MULTILINE)
    for kind in ("method", "metric", "model", "preset", "check"):
        assert f"Add a {kind}" in headings
