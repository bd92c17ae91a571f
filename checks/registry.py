"""``CHECKS``: the registry of sanity checks, with what each declares about itself
(:class:`harness.base.context.CheckFacts`). Import it as ``from checks import CHECKS``; the
checks' own modules import it from here, so that no module imports one that imports it back."""
from harness.base.context import CheckFacts, check_check_facts
from harness.base.registry import Registry

CHECKS = Registry("check", facts=CheckFacts, check=check_check_facts)
