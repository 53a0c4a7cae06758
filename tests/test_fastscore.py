"""Fast categorisation: sequential looks, first-order screening, stratified prefixes."""

import numpy as np
import pytest
import torch

from cswap.categorize import CRITICAL, CategoryConfig, categorize
from cswap.fastscore import FastConfig, fast_categorize, first_order_effects, stratified_order
from cswap.intervene import hook_count
from cswap.scoring import causal_effects
from cswap.units import discover_units

CONFIG = CategoryConfig(min_class_size=3)


@pytest.fixture(scope="module")
def setting(trained_tiny, fashion_small):
    _, _, held_x, held_y = fashion_small
    images, labels = held_x[:120], held_y[:120]
    space = discover_units(trained_tiny, images[:1])
    exact = categorize(causal_effects(trained_tiny, space, images, labels), CONFIG)
    return trained_tiny, space, images, labels, exact


def test_every_prefix_of_the_order_is_stratified():
    labels = np.repeat(np.arange(4), [40, 20, 20, 8])
    order = stratified_order(labels, seed=3)
    assert sorted(order.tolist()) == list(range(len(labels)))
    for fraction in (0.25, 0.5, 0.75):
        prefix = labels[order[: int(fraction * len(labels))]]
        counts = np.bincount(prefix, minlength=4)
        assert np.all(np.abs(counts - fraction * np.array([40, 20, 20, 8])) <= 1)


def test_without_levers_it_is_the_fixed_n_procedure(setting):
    model, space, images, labels, exact = setting
    result = fast_categorize(model, space, images, labels, CONFIG, FastConfig())
    assert result.exact_passes == result.full_passes
    assert list(result.categorization.categories) == list(exact.categories)
    assert np.allclose(result.categorization.xi, exact.xi, rtol=1e-9, atol=1e-12)


def test_sequential_looks_stop_critical_units_early_and_spend_alpha(setting):
    model, space, images, labels, exact = setting
    fast = FastConfig(looks=(0.25, 0.5, 0.75), early_alpha_share=0.25)
    result = fast_categorize(model, space, images, labels, CONFIG, fast)
    categories = result.categorization.categories
    assert result.settled_early > 0
    assert result.exact_passes < result.full_passes
    # nothing is called detrimental early: only critical and confidently-neutral units stop
    assert set(categories) <= set(exact.categories) | {CRITICAL, "neutral"}
    # the final critical level is alpha * 0.75 and early verdicts use fewer samples: most
    # verdicts agree, not necessarily all
    agreement = np.mean(categories == exact.categories)
    assert agreement >= 0.9
    assert hook_count(model) == 0


def test_with_no_early_alpha_only_neutral_units_stop_early(setting):
    model, space, images, labels, exact = setting
    fast = FastConfig(looks=(0.25, 0.5, 0.75), early_alpha_share=0.0, futility=0.2)
    result = fast_categorize(model, space, images, labels, CONFIG, fast)
    categories = result.categorization.categories
    assert result.settled_early > 0
    stopped = result.exact_passes < result.full_passes
    assert stopped
    # a unit that ran to the end is tested exactly like the fixed-n procedure (full alpha):
    # critical now => critical there, and every early stop is a neutral verdict
    assert all(exact.categories[categories == CRITICAL] == CRITICAL)
    changed = categories != exact.categories
    assert set(categories[changed]) <= {"neutral"}
    assert hook_count(model) == 0


def test_first_order_estimate_is_the_derivative_of_removal():
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        .double()
        .eval()
    )
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    space = discover_units(model, x[:1])
    estimate = first_order_effects(model, space, x, y)
    step = 1e-7

    def sigma(scale_unit=None):
        def hook(_m, inputs):
            z = inputs[0].clone()
            z[:, scale_unit] = z[:, scale_unit] * (1 - step)
            return (z,)

        handle = model[2].register_forward_pre_hook(hook) if scale_unit is not None else None
        with torch.no_grad():
            p = torch.softmax(model(x), 1).gather(1, y.view(-1, 1)).squeeze(1)
        if handle:
            handle.remove()
        return p

    base = sigma()
    for unit in space.units:
        derivative = (sigma(unit.index) - base) / step / base  # d r / d(removal fraction)
        assert np.allclose(estimate[unit.id], derivative.numpy(), rtol=1e-4, atol=1e-7)


def test_screening_settles_only_clear_critical_units(setting, monkeypatch):
    import cswap.fastscore as fastscore_module

    model, space, images, labels, exact = setting
    scored_exactly: set[int] = set()
    original = fastscore_module.causal_effects

    def spy(*args, units=None, **kwargs):
        scored_exactly.update(int(unit) for unit in units)
        return original(*args, units=units, **kwargs)

    monkeypatch.setattr(fastscore_module, "causal_effects", spy)
    result = fast_categorize(
        model, space, images, labels, CONFIG, FastConfig(screen=True, screen_factor=4.0)
    )
    # the units that got no exact intervention are the ones screening settled
    screened = sorted({unit.id for unit in space.units} - scored_exactly)
    assert result.screened == len(screened) > 0  # the lever actually did something here
    assert result.exact_passes == (len(space) - result.screened) * len(images)
    assert result.exact_passes < result.full_passes
    # screening only ever settles units as critical, and only units the exact categorisation
    # (every unit scored by its intervention) also finds critical
    row = {int(unit): i for i, unit in enumerate(result.categorization.unit_ids)}
    exact_row = {int(unit): i for i, unit in enumerate(exact.unit_ids)}
    assert all(result.categorization.categories[row[u]] == CRITICAL for u in screened)
    assert all(exact.categories[exact_row[u]] == CRITICAL for u in screened)
    # and clearly so: the exact class mean is far below -margin in some class
    assert all(exact.class_means[exact_row[u]].min() < -CONFIG.margin for u in screened)
    # every unit scored exactly gets the fixed-n verdict
    for unit in scored_exactly:
        assert result.categorization.categories[row[unit]] == exact.categories[exact_row[unit]]
    agreement = np.mean(result.categorization.categories == exact.categories)
    assert agreement >= 0.9


def test_neutral_is_settled_only_inside_the_margin_with_confidence():
    from cswap.fastscore import _classes_testable, _surely_neutral
    from cswap.scoring import CausalEffects

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    tiny = rng.normal(0, 1e-5, (1, 30))  # far inside +-0.001
    harmful_class = tiny.copy()
    harmful_class[0, :10] -= 0.01  # class 0 loses 1%: critical territory
    noisy = rng.normal(0, 0.05, (1, 30))  # mean ~0, but too noisy to be sure
    effects = CausalEffects(
        np.arange(3), np.concatenate([tiny, harmful_class, noisy]), labels, np.ones(30)
    )
    sure = _surely_neutral(effects, CONFIG, alpha=0.0125)
    assert sure.tolist() == [True, False, False]
    assert _classes_testable(labels, 30, 5)
    assert not _classes_testable(np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2, 2, 0, 1, 2]), 6, 3)
