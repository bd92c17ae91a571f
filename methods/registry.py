"""``METHODS``: the registry of saliency methods, with each method's facts
(:class:`harness.base.facts.MethodFacts`). Import it as ``from methods import METHODS``; the
methods' own modules import it from here, so that no module imports one that imports it back."""
from harness.base.facts import MethodFacts, check_method_facts
from harness.base.registry import Registry

METHODS = Registry("method", facts=MethodFacts, check=check_method_facts)
