"""``METRICS``: the registry of similarity metrics, with each metric's facts
(:class:`harness.base.facts.MetricFacts`). Import it as ``from metrics import METRICS``; the
metrics' own modules import it from here, so that no module imports one that imports it back."""
from harness.base.facts import MetricFacts, check_metric_facts
from harness.base.registry import Registry

METRICS = Registry("metric", facts=MetricFacts, check=check_metric_facts)
