"""Causal scoring against a slow oracle: copy the model, physically remove one unit, rerun."""

import numpy as np
import torch

from conftest import TinyNet, randomize_batchnorm
from cswap.categorize import categorize
from cswap.intervene import hook_count
from cswap.scoring import CausalEffects, causal_effects
from cswap.surgery import prune_copy
from cswap.units import discover_units


def oracle_effects(model, space, images, labels):
    """r_u(x) by physical removal, one unit at a time (slow and plain)."""
    with torch.no_grad():
        base = torch.softmax(model(images), 1).gather(1, labels.view(-1, 1)).squeeze(1)
    rows = []
    for unit in space.units:
        pruned = prune_copy(model, space, [unit.id], images[:1])
        with torch.no_grad():
            after = torch.softmax(pruned(images), 1).gather(1, labels.view(-1, 1)).squeeze(1)
        rows.append(((after - base) / base).numpy())
    return np.stack(rows), base.numpy()


def test_fast_effects_equal_the_copy_remove_rerun_oracle_in_float64(trained_tiny, fashion_small):
    model = trained_tiny.double()
    try:
        _, _, held_x, held_y = fashion_small
        images, labels = held_x[:60].double(), held_y[:60]
        space = discover_units(model, images[:1])
        fast = causal_effects(model, space, images, labels, batch_size=25)
        slow, base = oracle_effects(model, space, images, labels)
        assert np.allclose(fast.baseline, base, rtol=1e-12, atol=1e-15)
        assert np.allclose(fast.relative_effects, slow, rtol=1e-9, atol=1e-12)
        oracle = CausalEffects(fast.unit_ids, slow, fast.labels, base)
        fast_categories = categorize(fast).categories
        assert list(fast_categories) == list(categorize(oracle).categories)
        # the fixture is trained: some units matter a lot, so the comparison is not vacuous
        assert np.abs(fast.xi).max() > 0.01
        assert hook_count(model) == 0
    finally:
        model.float()


def test_scoring_leaves_the_model_bit_identical(trained_tiny, fashion_small):
    _, _, held_x, held_y = fashion_small
    x = held_x[:20]
    before = trained_tiny(x)
    state = {k: v.clone() for k, v in trained_tiny.state_dict().items()}
    space = discover_units(trained_tiny, x[:1])
    causal_effects(trained_tiny, space, x, held_y[:20], units=[0, 5, 30])
    assert hook_count(trained_tiny) == 0
    assert torch.equal(trained_tiny(x), before)
    assert all(torch.equal(v, trained_tiny.state_dict()[k]) for k, v in state.items())


def test_effects_relative_to_an_already_pruned_model(trained_tiny, fashion_small):
    _, _, held_x, held_y = fashion_small
    images, labels = held_x[:30], held_y[:30]
    space = discover_units(trained_tiny, images[:1])
    effects = causal_effects(trained_tiny, space, images, labels, already_removed=[1, 2])
    assert 1 not in effects.unit_ids and 2 not in effects.unit_ids
    pruned = prune_copy(trained_tiny, space, [1, 2], images[:1])
    with torch.no_grad():
        base = torch.softmax(pruned(images), 1).gather(1, labels.view(-1, 1)).squeeze(1)
    assert np.allclose(effects.baseline, base.numpy(), rtol=1e-5)


def test_batch_size_does_not_change_the_effects(trained_tiny, fashion_small):
    model = trained_tiny.double()
    try:
        _, _, held_x, held_y = fashion_small
        images, labels = held_x[:30].double(), held_y[:30]
        space = discover_units(model, images[:1])
        a = causal_effects(model, space, images, labels, units=[3, 17], batch_size=30)
        b = causal_effects(model, space, images, labels, units=[3, 17], batch_size=7)
        assert np.allclose(a.relative_effects, b.relative_effects, rtol=1e-9, atol=1e-12)
    finally:
        model.float()


def test_prefix_reuse_is_exact_on_resnet_and_vgg_in_float64(fashion_small):
    from cswap.zoo.registry import ZOO
    from cswap.zoo.store import build

    for name in ("resnet20", "vgg"):
        model = randomize_batchnorm(build(ZOO[name])).double().eval()
        images = torch.randn(6, 1, 28, 28, dtype=torch.float64)
        labels = torch.arange(6) % 10
        space = discover_units(model, images[:1])
        rng = np.random.default_rng(0)
        units = sorted(rng.choice(len(space), 40, replace=False).tolist())
        # a dead unit: zero input weights in every consumer, so its effect is exactly zero
        dead = space.groups[1].unit_ids[0]
        units.append(dead)
        for target in space.units[dead].targets:
            model.get_submodule(target.layer).weight.data[:, list(target.indices)] = 0
        naive = causal_effects(
            model, space, images, labels, units=units, prefix_reuse=False, units_per_pass=1
        )
        for prefix, per_pass in ((True, 1), (False, 7), (True, 7), (True, 0), (True, None)):
            fast = causal_effects(
                model,
                space,
                images,
                labels,
                units=units,
                batch_size=4,
                already_removed=[],
                prefix_reuse=prefix,
                units_per_pass=per_pass,
            )
            assert np.allclose(fast.relative_effects, naive.relative_effects, rtol=1e-6, atol=1e-9)
            assert np.allclose(fast.baseline, naive.baseline, rtol=1e-12)
            # the dead unit: exactly 0 one unit per pass; batched BLAS sums in another order
            assert np.abs(fast.relative_effects[-1]).max() <= 1e-12
        assert hook_count(model) == 0


def test_batched_interventions_are_exact_with_compensation_and_prior_removals():
    from cswap.compensation import measure_means
    from cswap.zoo.registry import ZOO
    from cswap.zoo.store import build
    from test_vit import spread_weights

    tiny = randomize_batchnorm(TinyNet()).double().eval()
    for model in (tiny, spread_weights(build(ZOO["vit"])).double()):
        shape = (1, 14, 14) if isinstance(model, TinyNet) else (1, 28, 28)
        images = torch.randn(5, *shape, dtype=torch.float64)
        labels = torch.arange(5) % 10
        space = discover_units(model, images[:1])
        compensation = measure_means(model, space, images)
        rng = np.random.default_rng(1)
        chosen = rng.choice(len(space), 30, replace=False).tolist()
        already, units = chosen[:6], chosen[6:]
        settings = dict(units=units, already_removed=already, compensation=compensation)
        naive = causal_effects(
            model, space, images, labels, prefix_reuse=False, units_per_pass=1, **settings
        )
        for prefix in (False, True):
            fast = causal_effects(
                model,
                space,
                images,
                labels,
                batch_size=3,
                prefix_reuse=prefix,
                units_per_pass=5,
                **settings,
            )
            assert np.allclose(fast.relative_effects, naive.relative_effects, rtol=1e-6, atol=1e-9)
        assert hook_count(model) == 0
