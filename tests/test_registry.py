"""Facts travel with registration: wrong facts fail at import (into a fresh registry of the same
kind), every declared range is enforced by the early checks, and every model's declared blocks
and GradCAM layer exist in the model it builds. Parametrized over the registries: a new entry
is tested without new test code."""
from __future__ import annotations

import inspect
import math
import typing

import pytest
import torch
from torch import nn

from harness.base.facts import (
    MethodFacts,
    MetricFacts,
    ModelFacts,
    check_method_facts,
    check_metric_facts,
    check_model_facts,
)
from harness.base.meta import member, model_meta
from harness.base.registry import Range, RegistrationError, Registry
from harness.validate import check_hparams, check_metric_args
from harness.zoo import MODELS
from methods import METHODS
from metrics import METRICS, NORMALIZATIONS


def fresh_methods() -> Registry:
    return Registry("method", facts=MethodFacts, check=check_method_facts)


def documented(model, x, target, *, q: float = 1.0, internal_batch_size: int = 64,
               seed: int = 0):
    """A method for these tests. x: (B, C, H, W) -> (B, C, H, W)."""
    return x


def undocumented(model, x, target):
    return x


def another_documented():
    def documented(model, x, target):
        """Same name, another function."""
        return x

    return documented


@pytest.mark.parametrize("fn,facts,fragment", [
    (documented, {"speed": "fast"}, "method 'documented': unknown fact speed; a method declares"),
    (documented, {"ranges": {"steps": Range(1)}}, "range for 'steps', which is not a keyword"),
    (documented, {"ranges": {"model": Range(1)}}, "range for 'model', which is not a keyword"),
    (documented, {"ranges": {"q": (0, 100)}}, "range of 'q' must be a Range"),
    (documented, {"needs": ("gpu",)}, "method 'documented': unknown need gpu"),
    (undocumented, {}, "method 'undocumented' has no docstring"),
])
def test_wrong_method_facts_fail_at_registration(fn, facts, fragment):
    registry = fresh_methods()
    with pytest.raises(RegistrationError) as err:
        registry.register(**facts)(fn)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert fn.__name__ not in registry  # nothing half-registered


def test_wrong_metric_and_model_facts_fail_at_registration():
    def metric(a, b, width: int = 3):
        """A metric for this test: (B, H, W) x (B, H, W) -> (B,)."""

    def model():
        """A model for this test."""

    with pytest.raises(RegistrationError, match="range for 'height'"):
        Registry("metric", facts=MetricFacts, check=check_metric_facts).register(
            ranges={"height": Range(1)})(metric)
    with pytest.raises(RegistrationError, match="members of undeclared blocks head"):
        Registry("model", facts=ModelFacts, check=check_model_facts).register(
            blocks=("conv",), members={"head": ("fc",)})(model)


def test_register_same_function_replaces_other_function_fails():
    registry = fresh_methods()
    registry.register(needs=("relu",))(documented)
    registry.register(needs=("conv",))(documented)  # a notebook cell run again
    assert registry["documented"] is documented
    assert registry.facts("documented").needs == ("conv",)
    with pytest.raises(RegistrationError, match="registered twice"):
        registry.register(another_documented())


def test_facts_are_frozen_and_default():
    facts = fresh_methods().facts_type()
    assert facts == MethodFacts(needs=(), deterministic=True, uses_model=True)
    with pytest.raises(TypeError):
        facts.ranges["q"] = Range(0)  # a read-only view: facts cannot drift after import


# --- every declared range is enforced -------------------------------------------------------

def declared(registry: Registry) -> list[tuple[str, str]]:
    return [(name, key) for name in sorted(registry) for key in registry.facts(name).ranges]


def just_outside(bounds: Range, integer: bool) -> list[float]:
    """The nearest values outside ``bounds`` on each finite side (for ints: the next int)."""
    values = []
    if bounds.low != -math.inf:
        values.append(bounds.low if bounds.exclusive_low else
                      bounds.low - 1 if integer else math.nextafter(bounds.low, -math.inf))
    if bounds.high != math.inf:
        values.append(bounds.high if bounds.exclusive_high else
                      bounds.high + 1 if integer else math.nextafter(bounds.high, math.inf))
    return values


def assert_range_enforced(kind: str, name: str, key: str, fn, check) -> None:
    bounds = REGISTRIES[kind].facts(name).ranges[key]
    default = inspect.signature(fn).parameters[key].default
    check(name, fn, {key: default})  # the default is inside its declared range
    integer = typing.get_type_hints(fn).get(key) is int
    values = just_outside(bounds, integer)
    assert values, f"{kind} {name}: range of {key} bounds nothing"
    for value in values:
        with pytest.raises(ValueError) as err:
            check(name, fn, {key: value})
        assert str(err.value) == f"{kind}.{name}.{key} must be {bounds}, got {value!r}"


REGISTRIES = {"method": METHODS, "metric": METRICS}


@pytest.mark.parametrize("name,key", declared(METHODS))
def test_every_method_range_rejects_outside_accepts_default(name, key):
    assert_range_enforced("method", name, key, METHODS[name], check_hparams)


@pytest.mark.parametrize("name,key", declared(METRICS))
def test_every_metric_range_rejects_outside_accepts_default(name, key):
    assert_range_enforced("metric", name, key, METRICS[name], check_metric_args)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_default_normalization_exists(name):
    NORMALIZATIONS[METRICS.facts(name).normalization]


def test_ranges_mean_what_their_method_means():
    """The same name, different meanings: iGOS++'s alpha is a positive step size, LRP's alpha
    a rule weight of at least 1 (alpha - beta = 1, beta >= 0)."""
    assert METHODS.facts("igos_pp").ranges["alpha"] == Range(0, exclusive_low=True)
    assert METHODS.facts("lrp_alpha_beta").ranges["alpha"] == Range(1)


# --- models: declared blocks and GradCAM layer exist, in execution order -------------------------

SMALL = {"mlp": {"hidden": [8, 4]},  # builds that keep the table fast; others use defaults
         "vit": {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 16, "num_heads": 2,
                 "num_classes": 5},
         "vit_mnist": {"depth": 2, "embed_dim": 16}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_declares_blocks_that_exist_in_execution_order(name):
    model = MODELS[name](**SMALL.get(name, {}))
    meta = model_meta(model)
    blocks, members, layer = MODELS.facts(name).resolve(model)
    assert meta.blocks == (blocks or meta.blocks) and meta.members == members
    assert meta.gradcam_layer == layer or not blocks
    for block in meta.blocks:
        for name in meta.members.get(block, [block]):  # a module with parameters, or one
            part = member(model, name)
            assert isinstance(part, nn.Parameter) or any(True for _ in part.parameters()), name
    if meta.gradcam_layer:
        model.get_submodule(meta.gradcam_layer)
    assert_execution_order(model, meta.blocks, meta.data_config["input_size"])


def assert_execution_order(model: nn.Module, blocks: list[str], input_size: tuple) -> None:
    seen = []
    handles = [model.get_submodule(b).register_forward_hook(
        lambda *_, block=b: seen.append(block)) for b in blocks]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for handle in handles:
            handle.remove()
    first_calls = list(dict.fromkeys(seen))
    assert first_calls == blocks, "blocks must be listed in execution order (input -> logits)"
