"""The cheap damage estimate and the band of exactly scored units (cswap.estimate, cswap.banded).

The removal cost is checked against an independent oracle: numpy least squares on the recorded
consumer inputs, the objective evaluated at the fresh refit with and without the unit.
"""

import functools
import math

import numpy as np
import pytest
import torch

from cswap import banded
from cswap.banded import banded_categorization
from cswap.categorize import ESTIMATED, CategoryConfig, categorize
from cswap.compensation import consumer_indices, measure_means
from cswap.control import ControlVariate, fit_coefficients, second_order_proxy
from cswap.estimate import (
    BandConfig,
    EstimateFit,
    calibration_sample,
    early_samples,
    exact_band,
    fit_scale,
    output_sensitivity,
    reconstruction_costs,
    sample_spread,
    split_samples,
)
from cswap.scoring import causal_effects
from test_lstsq_scoring import RIDGE, _rows, make_setting


@pytest.fixture(scope="module")
def setting():
    return make_setting(seed=5, images=30, classes=3)


def _objective(module, rows, gone_channels):
    """min over theta (zero on the gone channels) of mean |rows (theta - theta0)|^2 + l |theta -
    theta0|^2 over every feature (a removed feature's penalty is the constant l |theta0|^2)."""
    weight = module.weight.detach().numpy()
    flat = weight.reshape(weight.shape[0], -1)
    per_channel = flat.shape[1] // weight.shape[1]
    bias = module.bias.detach().numpy() if module.bias is not None else np.zeros(len(flat))
    theta0 = np.concatenate([flat.T, bias[None, :]])
    gone = np.zeros(weight.shape[1], dtype=bool)
    gone[sorted(gone_channels)] = True
    keep = np.concatenate([np.repeat(~gone, per_channel), [True]])
    scale = RIDGE * (rows**2).sum(0).mean() / len(rows)
    a = rows / np.sqrt(len(rows))
    system = np.concatenate([a[:, keep], np.sqrt(scale) * np.eye(keep.sum())])
    target = np.concatenate([a @ theta0, np.sqrt(scale) * theta0[keep]])
    solution = np.linalg.lstsq(system, target, rcond=None)[0]
    theta = np.zeros_like(theta0)
    theta[keep] = solution
    error = a @ (theta - theta0)
    return (error**2).sum(0) + scale * ((theta - theta0) ** 2).sum(0)  # per output column


def test_removal_cost_is_the_growth_of_the_refit_objective(setting):
    model, space, _images, _labels, lstsq, inputs = setting
    by_root = {group.root: group.unit_ids for group in space.groups}
    base = (by_root["body.3"][0], by_root["hidden"][3], by_root["down.0"][1])
    compensation = lstsq.with_base(model, space, base)
    candidates = [by_root["body.3"][1], by_root["body.0"][0], by_root["down.0"][0]]
    candidates += [by_root["hidden"][5]]
    layers = {t.layer for unit in candidates for t in space.units[unit].targets}
    generator = torch.Generator().manual_seed(0)
    weights = {
        layer: torch.rand(model.get_submodule(layer).weight.shape[0], generator=generator)
        for layer in layers
    }
    costs = reconstruction_costs(space, compensation, candidates)
    weighted = reconstruction_costs(space, compensation, candidates, weights)
    assert sorted(costs) == sorted(candidates) == sorted(weighted)
    base_inputs = consumer_indices(space, base)
    for unit in candidates:
        expected = expected_weighted = 0.0
        for target in space.units[unit].targets:
            module = model.get_submodule(target.layer)
            rows = _rows(module, inputs[target.layer])
            before = set(base_inputs.get(target.layer, (0, []))[1])
            after = before | set(target.indices)
            growth = _objective(module, rows, after) - _objective(module, rows, before)
            expected += growth.sum()
            expected_weighted += (growth * weights[target.layer].numpy()).sum()
        assert costs[unit] == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert weighted[unit] == pytest.approx(expected_weighted, rel=1e-6, abs=1e-12)
        assert costs[unit] > 0


def test_output_sensitivity_is_the_diagonal_fisher_per_output_channel(setting):
    """Oracle: one sample and one class at a time, the gradient of log p_c with respect to the
    layer's output by autograd on that sample alone."""
    model, _space, images, *_ = setting
    layers = ["body.3", "hidden"]
    found = output_sensitivity(model, layers, images[:7], batch_size=3)
    expected = {layer: 0.0 for layer in layers}
    for x in images[:7]:
        captured = {}
        handles = [
            model.get_submodule(layer).register_forward_hook(
                lambda _m, _i, out, layer=layer, into=captured: into.__setitem__(layer, out)
            )
            for layer in layers
        ]
        log_p = torch.log_softmax(model(x[None]), 1)[0]
        for handle in handles:
            handle.remove()
        for c in range(len(log_p)):
            grads = torch.autograd.grad(
                log_p[c], [captured[layer] for layer in layers], retain_graph=True
            )
            for layer, grad in zip(layers, grads, strict=True):
                squares = grad[0] ** 2
                per_channel = squares.sum(dim=(1, 2)) if squares.dim() == 3 else squares
                expected[layer] = expected[layer] + log_p[c].exp().detach() * per_channel
    for layer in layers:
        np.testing.assert_allclose(found[layer].numpy(), (expected[layer] / 7).numpy(), rtol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated on the model


def test_no_estimate_without_a_refit(setting):
    model, space, images, *_ = setting
    mean = measure_means(model, space, images, mode="mean")
    assert reconstruction_costs(space, mean, [0, 1]) == {}
    assert reconstruction_costs(space, None, [0, 1]) == {}


def test_calibration_sample_spreads_over_each_group(setting):
    _model, space, *_ = setting
    group = max(space.groups, key=lambda g: len(g.unit_ids))
    units = list(group.unit_ids)
    costs = {u: float(10 - i) for i, u in enumerate(units)}  # the last unit is the cheapest
    chosen = calibration_sample(space, costs, per_group=3)
    by_cost = sorted(units, key=lambda u: costs[u])
    middle = by_cost[round((len(units) - 1) / 2)]
    assert chosen == sorted({by_cost[0], middle, by_cost[-1]})
    assert calibration_sample(space, costs, per_group=len(units) + 1) == sorted(units)


def test_fit_scale_recovers_per_group_scales(setting):
    _model, space, *_ = setting
    groups = [g for g in space.groups if len(g.unit_ids) >= 3][:2]
    costs, exact = {}, {}
    for scale, group in zip((2.0, 0.5), groups, strict=True):
        for i, unit in enumerate(group.unit_ids[:3]):
            costs[unit] = float(i + 1)
            exact[unit] = scale * (i + 1) * (1.1 if (i, scale) == (0, 2.0) else 1.0)
    dead = groups[0].unit_ids[3]
    costs[dead], exact[dead] = 0.0, 0.0  # carries no scale information
    near_dead = groups[1].unit_ids[3]  # exact KL at float32's noise floor: no information either
    costs[near_dead], exact[near_dead] = 1e-7, 4e-14
    fit = fit_scale(space, costs, exact, min_sd=0.0)
    first = math.log(2.0) + math.log(1.1) / 3
    assert fit.log_scale[groups[0].id] == pytest.approx(first)
    assert fit.log_scale[groups[1].id] == pytest.approx(math.log(0.5))
    deviations = [math.log(1.1) * 2 / 3, -math.log(1.1) / 3, -math.log(1.1) / 3]
    assert fit.sd == pytest.approx(math.sqrt(sum(d * d for d in deviations) / (6 - 2)))
    assert fit_scale(space, costs, exact, min_sd=1.0).sd == 1.0
    other = groups[1].unit_ids[0]
    # a group whose sampled units are all at the noise floor takes the median of the others
    third = next(g for g in space.groups if g.id not in (groups[0].id, groups[1].id))
    quiet = {unit: 1e-7 for unit in third.unit_ids[:2]}
    fit = fit_scale(space, costs | quiet, exact | dict.fromkeys(quiet, 3e-14), min_sd=0.0)
    assert fit.log_scale[third.id] == pytest.approx((first + math.log(0.5)) / 2)
    assert fit.log_scale[groups[0].id] == pytest.approx(first)
    fitted = EstimateFit({groups[1].id: math.log(0.5)}, 1.0)
    assert fitted.damage(space, {dead: 4.0, other: 4.0}) == {other: pytest.approx(2.0)}


def test_exact_band_covers_the_cut_and_its_margin():
    estimated = {1: 1.0, 2: 2.0, 3: 3.0, 4: 10.0, 5: 40.0}
    per_cost = {u: 1.0 for u in estimated}
    params = {1: 5.0, 2: 5.0, 3: 5.0, 4: 5.0, 5: 5.0}
    # the cheapest 10 parameters end at unit 2 (key 2.0); within a factor 2: keys in [1, 4]
    assert exact_band(estimated, per_cost, params, 10.0, 2.0) == {1, 2, 3}
    assert exact_band(estimated, per_cost, params, 10.0, 5.0) == {1, 2, 3, 4}
    assert exact_band(estimated, per_cost, params, 100.0, 1.0) == {1, 2, 3, 4, 5}  # not reached
    # a cap keeps the units closest to the edge (ratios 1, 1.5, 2, 5 from key 2.0)
    assert exact_band(estimated, per_cost, params, 10.0, 5.0, limit=2) == {2, 3}
    assert exact_band(estimated, per_cost, params, 10.0, 5.0, limit=3) == {1, 2, 3}
    assert exact_band(estimated, per_cost, params, 10.0, 5.0, limit=9) == {1, 2, 3, 4}
    per_cost[5] = 100.0  # a cheap unit per parameter saved comes first
    assert exact_band(estimated, per_cost, params, 5.0, 1.0) == {5}
    assert exact_band(estimated, per_cost, params, 10.0, 1.0) == {1}  # far below: estimated
    assert exact_band(estimated, per_cost, params, 10.0, 3.0) == {5, 1, 2, 3}


def _banded(setting, z, horizon, **band):
    model, space, images, labels, lstsq, _ = setting
    score = functools.partial(causal_effects, model, space, compensation=lstsq)
    return banded_categorization(
        score,
        model,
        space,
        lstsq,
        (),
        images=images,
        labels=labels,
        horizon=horizon,
        cost_kind="params",
        band=BandConfig(z=z, per_group=2, **band),
        category_config=CategoryConfig(min_class_size=5),
    )


def test_banded_round_scores_exactly_near_the_cut_and_estimates_the_rest(setting):
    model, space, images, labels, lstsq, _ = setting
    exact = causal_effects(model, space, images, labels, compensation=lstsq)
    full = categorize(exact, CategoryConfig(min_class_size=5))
    row = {int(u): i for i, u in enumerate(full.unit_ids)}
    wide = _banded(setting, z=50.0, horizon=space.params_total)
    assert wide.estimated == 0 and wide.exact == len(space)
    assert list(wide.categorization.categories) == list(full.categories)
    np.testing.assert_allclose(wide.categorization.kl, full.kl)
    narrow = _banded(setting, z=0.1, horizon=1.0)
    c = narrow.categorization
    assert narrow.estimated > 0 and narrow.exact + narrow.estimated == len(space)
    assert c.unit_ids.tolist() == sorted(c.unit_ids.tolist())
    for i, unit in enumerate(c.unit_ids.tolist()):
        if c.categories[i] == ESTIMATED:
            assert math.isnan(c.xi[i]) and c.kl[i] >= 0
        else:  # an exactly scored unit has exactly the full scoring's values
            assert c.xi[i] == full.xi[row[unit]] and c.kl[i] == full.kl[row[unit]]
            assert c.categories[i] == full.categories[row[unit]]
    assert c.counts()[ESTIMATED] == narrow.estimated


def test_two_stage_band_equals_one_pass_scoring_or_the_subsample_mean(setting):
    """Units kept to the second stage carry exactly the effects of one pass over every image;
    units decided on the first stage carry the mean KL of exactly the first stage's images."""
    model, space, images, labels, lstsq, _ = setting
    exact = causal_effects(model, space, images, labels, compensation=lstsq)
    full = categorize(exact, CategoryConfig(min_class_size=5))
    row = {int(u): i for i, u in enumerate(full.unit_ids)}
    band = dict(sample_fraction=0.3, min_samples=4, min_relative_se=0.01)
    first_rows = split_samples(labels.numpy(), BandConfig(**band))
    assert first_rows is not None and len(first_rows) == 9  # ceil(0.3 * 30)
    two = _banded(setting, z=2.0, horizon=0.5 * space.params_total, **band)
    one = _banded(setting, z=2.0, horizon=0.5 * space.params_total, sample_fraction=0.0)
    c = two.categorization
    assert two.sampled and two.exact + two.estimated == len(space)
    categories = dict(zip(c.unit_ids.tolist(), c.categories, strict=True))
    assert all(categories[u] == ESTIMATED for u in two.sampled)
    fully = {u for u, k in categories.items() if k != ESTIMATED}
    assert fully and len(fully) < one.exact  # the second stage kept only some units
    # the estimate outside both stages, composed from its parts: the output sensitivity on the
    # subsample, the refit's removal costs, the scale fitted to the sample units' subsample means
    layers = sorted({t.layer for u in space.units for t in u.targets})
    sensitivity = output_sensitivity(model, layers, images[torch.as_tensor(first_rows)])
    costs = reconstruction_costs(space, lstsq.with_base(model, space, []), row, sensitivity)
    sample = calibration_sample(space, costs, 2) + [u for u in row if u not in costs]
    means = {u: exact.kl[row[u], first_rows].mean() for u in sample}
    estimate = fit_scale(space, costs, means, 0.25).damage(space, costs)
    outside = []
    for i, unit in enumerate(c.unit_ids.tolist()):
        if unit in two.sampled:
            mean = exact.kl[row[unit], first_rows].mean()
            assert c.kl[i] == pytest.approx(mean, rel=1e-9) and math.isnan(c.xi[i])
        elif unit in fully:
            assert c.xi[i] == pytest.approx(full.xi[row[unit]], rel=1e-9, abs=1e-15)
            assert c.kl[i] == pytest.approx(full.kl[row[unit]], rel=1e-9, abs=1e-15)
            assert c.categories[i] == full.categories[row[unit]]
        else:
            assert c.kl[i] == pytest.approx(estimate[unit], rel=1e-9)
            outside.append(unit)
    assert outside  # some units were left to the estimate
    # every unit scored went through the first stage; the fully scored ones the second too
    share = len(first_rows) / len(labels)
    assert two.passes == pytest.approx(len(fully) + len(two.sampled) * share)


@pytest.mark.parametrize("control_variate", [False, True], ids=["plain", "control-variate"])
def test_an_early_stage_settles_units_on_its_own_images_and_the_rest_as_before(
    setting, control_variate, monkeypatch
):
    """With an early stage (3 of the first stage's 9 images), every unit carries the mean KL of
    exactly the images of the last stage that scored it, or the effects of one pass over every
    image; the passes count each unit at the share of the images it was scored on. With the
    control variate (lstsq that mean-compensates the Linear layers, 30 rows for 32 and 64
    features), the means of the mean-folded units are corrected by it: the proxy
    (cswap.control) and its coefficients checked on the first scoring (the pilot units on the
    first stage's images); the refitted units keep plain means."""
    model, space, images, labels, lstsq, _ = setting
    if control_variate:
        lstsq = measure_means(model, space, images, mode="lstsq", ridge=RIDGE, min_rows=4)
        assert lstsq.fallback and set(lstsq.grams)  # some layers mean-folded, some refitted
    exact = causal_effects(model, space, images, labels, compensation=lstsq)
    full = categorize(exact, CategoryConfig(min_class_size=5))
    row = {int(u): i for i, u in enumerate(full.unit_ids)}
    band = dict(sample_fraction=0.3, min_samples=4, min_relative_se=0.01)
    early = dict(early_fraction=0.25, early_min_samples=2)
    first_rows = split_samples(labels.numpy(), BandConfig(**band))
    early_rows = first_rows[early_samples(labels.numpy()[first_rows], BandConfig(**early))]
    assert len(first_rows) == 9 and len(early_rows) == 3 and set(early_rows) < set(first_rows)
    calls = []  # (units, images) of every exact scoring

    controls = []
    monkeypatch.setattr(
        banded, "ControlVariate", lambda *a: controls.append(ControlVariate(*a)) or controls[-1]
    )

    def score(**kwargs):
        calls.append((list(kwargs["units"]), len(kwargs["images"])))
        return causal_effects(model, space, compensation=lstsq, **kwargs)

    three = banded_categorization(
        score, model, space, lstsq, (), images=images, labels=labels,
        horizon=0.5 * space.params_total, cost_kind="params",
        band=BandConfig(z=2.0, per_group=2, **band, **early, control_variate=control_variate),
        category_config=CategoryConfig(min_class_size=5),
    )  # fmt: skip
    last = {u: size for units, size in calls for u in units}  # images of its last stage
    # the scale's sample on the first stage (9); the band early (3), then on the first stage's
    # other images (6); the rest of the images (21)
    sizes = {size for _, size in calls}
    assert sizes == {3, 6, 9, 21} if not control_variate else sizes <= {3, 6, 9, 21}
    assert three.passes == pytest.approx(sum(len(u) * n / len(labels) for u, n in calls))
    c = three.categorization
    stages = {3: early_rows, 6: first_rows, 9: first_rows}
    control = _expected_control(model, space, images, lstsq, exact, row, calls[0][0], first_rows)
    assert len(controls) == int(control_variate)
    if control_variate:
        assert controls[0].index == control.index and 1.0 in control.coefficient.values()
        assert controls[0].coefficient == control.coefficient
        assert controls[0].proxy == pytest.approx(control.proxy, rel=1e-9, abs=1e-18)
        corrected = [u for u in three.sampled if control.coefficient.get(u)]
        assert corrected  # some decided units carry a corrected mean
    for i, unit in enumerate(c.unit_ids.tolist()):
        if unit in three.sampled:  # the mean of exactly the images it was scored on
            columns = stages[last[unit]]
            kl = exact.kl[row[unit], columns][None, :]
            if control_variate:
                kl = control.adjusted([unit], kl, columns)
            assert c.kl[i] == pytest.approx(kl.mean(), rel=1e-6, abs=1e-14)
        elif c.categories[i] != ESTIMATED:  # scored on every image
            assert last[unit] == 21
            assert c.kl[i] == pytest.approx(full.kl[row[unit]], rel=1e-9, abs=1e-15)
    settled_early = [u for u in three.sampled if last[u] == 3]
    if not control_variate:  # (the other compensation moves the units elsewhere)
        assert settled_early and len(settled_early) < len(three.sampled)


def _expected_control(model, space, images, lstsq, exact, row, pilots, first_rows):
    """The control variate from its parts: the proxy of every mean-folded unit on every image,
    the coefficients checked on the pilot units' exact effects on the first stage's images."""
    units = [u.id for u in space.units if not any(lstsq.refits(t.layer) for t in u.targets)]
    proxy = second_order_proxy(model, space, units, images, means=lstsq.means)
    index = {unit: i for i, unit in enumerate(units)}
    pilot_kl = exact.kl[[row[u] for u in pilots]][:, first_rows]
    coefficients = fit_coefficients(space, index, proxy, pilots, pilot_kl, first_rows)
    return ControlVariate(index, proxy, coefficients)


def test_split_samples_keeps_each_labels_share_and_is_seeded():
    labels = np.repeat(np.arange(4), [40, 40, 12, 8])
    config = BandConfig(sample_fraction=0.25, min_samples=8)
    rows = split_samples(labels, config, seed=3)
    assert len(rows) == 25 and list(rows) == sorted(set(rows.tolist()))
    counts = np.bincount(labels[rows], minlength=4)
    assert all(abs(counts[k] - 0.25 * n) <= 1 for k, n in enumerate((40, 40, 12, 8)))
    assert np.array_equal(rows, split_samples(labels, config, seed=3))
    assert not np.array_equal(rows, split_samples(labels, config, seed=4))
    assert split_samples(labels, BandConfig(sample_fraction=0.25, min_samples=60)) is None
    assert split_samples(labels, BandConfig(sample_fraction=0.0)) is None


def test_sample_spread_is_the_relative_standard_error_of_the_subsample_mean():
    kl = np.array([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    config = BandConfig(z=2.0, min_relative_se=0.1)
    spread = sample_spread(kl, total=16, config=config)
    error = np.std([1, 2, 3, 6], ddof=1) / 2 * math.sqrt(1 - 4 / 16)
    assert spread[0] == pytest.approx(math.exp(2.0 * error / 3.0))
    assert spread[1] == pytest.approx(math.exp(0.2))  # no change on any image: the floor
    assert spread[2] == pytest.approx(math.exp(0.2))  # no spread: the floor


def test_output_sensitivity_label_draws_are_seeded(setting):
    """Fewer draws than classes samples labels: the same seed gives the same sensitivity, and
    the global random state neither changes it nor is changed."""
    model, _space, images, *_ = setting
    layers = ["hidden"]
    torch.manual_seed(1)
    first = output_sensitivity(model, layers, images[:6], draws=3, seed=5)["hidden"]
    state = torch.get_rng_state()
    torch.manual_seed(2)
    again = output_sensitivity(model, layers, images[:6], draws=3, seed=5)["hidden"]
    other = output_sensitivity(model, layers, images[:6], draws=3, seed=6)["hidden"]
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.manual_seed(1)
    output_sensitivity(model, layers, images[:6], draws=3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)


def _growth(module, rows, before, channel_sets, weights):
    """Oracle: objective growth of removing each set after the ones before it (numpy lstsq)."""
    gone, previous, steps = set(before), None, []
    previous = _objective(module, rows, gone)
    for channels in channel_sets:
        gone |= set(channels)
        now = _objective(module, rows, gone)
        steps.append(((now - previous) * weights).sum())
        previous = now
    return np.array(steps)


def test_sequential_costs_add_up_to_the_growth_of_the_refit_of_the_union(setting):
    model, space, _images, _labels, lstsq, inputs = setting
    by_root = {group.root: group.unit_ids for group in space.groups}
    base = (by_root["body.3"][0], by_root["down.0"][1])
    compensation = lstsq.with_base(model, space, base)
    base_inputs = consumer_indices(space, base)
    for root in ("body.3", "down.0", "hidden"):
        order = [u for u in reversed(by_root[root]) if u not in base][:4]
        for position, target in enumerate(space.units[order[0]].targets):
            module = model.get_submodule(target.layer)
            rows = _rows(module, inputs[target.layer])
            sets = [space.units[u].targets[position].indices for u in order]
            basis = compensation.bases[target.layer][1]
            weights = torch.rand(module.weight.shape[0], generator=torch.Generator().manual_seed(1))
            before = base_inputs.get(target.layer, (0, []))[1]
            expected = _growth(module, rows, before, sets, weights.numpy())
            found = basis.sequential(sets, weights)
            assert found == pytest.approx(expected, rel=1e-6, abs=1e-12)
            assert found[0] == pytest.approx(basis.removal_cost(sets[0], weights), rel=1e-9)


def test_joint_damage_adds_the_refits_interaction_along_each_groups_order(setting):
    from cswap.estimate import joint_damage

    model, space, _images, _labels, lstsq, inputs = setting
    compensation = lstsq.with_base(model, space, ())
    group = next(g for g in space.groups if g.root == "body.0")
    units = list(group.unit_ids)
    rng = np.random.default_rng(0)
    kl = {u: float(v) for u, v in zip(units, rng.uniform(0.01, 1.0, len(units)), strict=True)}
    costs = {u: 10.0 for u in units}
    joint = joint_damage(space, compensation, kl, costs)
    assert sorted(joint) == sorted(units)
    order = sorted(units, key=lambda u: kl[u])
    along = np.zeros(len(order))
    alone = np.zeros(len(order))
    for position, target in enumerate(space.units[order[0]].targets):
        module = model.get_submodule(target.layer)
        rows = _rows(module, inputs[target.layer])
        ones = np.ones(module.weight.shape[0])
        sets = [space.units[u].targets[position].indices for u in order]
        along += _growth(module, rows, (), sets, ones)
        alone += [_growth(module, rows, (), [s], ones)[0] for s in sets]
    scale = np.median([kl[u] / a for u, a in zip(order, alone, strict=True)])
    values = [kl[u] + scale * (s - a) for u, s, a in zip(order, along, alone, strict=True)]
    values = np.maximum(values, 0)
    expected = np.maximum.accumulate(values)  # equal costs: the running maximum of the damage
    assert [joint[u] for u in order] == pytest.approx(expected, rel=1e-6)
    assert joint[order[0]] == pytest.approx(kl[order[0]], rel=1e-9)  # first: its own KL
    # mean compensation has no refit: no joint damage
    mean = measure_means(model, space, _images, mode="mean")
    assert joint_damage(space, mean, kl, costs) == {}


def test_ranking_uses_the_joint_damage_where_it_was_estimated():
    from dataclasses import replace

    from cswap.categorize import RankConfig, causal_ranking

    effects_kl = np.array([0.1, 0.2, 0.3, 0.4])
    categorization = _categorization_with(effects_kl)
    joint = replace(categorization, joint=np.array([0.1, 0.9, np.nan, 0.5]))
    costs = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    assert causal_ranking(joint, RankConfig(), costs).order == (0, 2, 3, 1)
    assert causal_ranking(joint, RankConfig(joint=False), costs).order == (0, 1, 2, 3)
    assert causal_ranking(categorization, RankConfig(), costs).order == (0, 1, 2, 3)


def _categorization_with(kl: np.ndarray):
    from cswap.categorize import NEUTRAL, Categorization

    n = len(kl)
    return Categorization(
        unit_ids=np.arange(n),
        xi=np.zeros(n),
        tested_classes=np.zeros(0, dtype=np.int64),
        class_means=np.zeros((n, 0)),
        class_p_values=np.ones((n, 0)),
        detrimental_p_values=np.ones(n),
        categories=np.full(n, NEUTRAL, dtype=object),
        config=CategoryConfig(),
        log_ratio=-kl,
        kl=kl,
    )


def test_mean_basis_is_the_growth_of_the_mean_folds_output_error():
    """A Linear consumer with too few calibration rows for a refit: its estimate is the mean
    square of W_S (x_S - mu_S) plus the cross term with the base removal's own error, computed
    here directly on the recorded inputs (numpy), for one set and along a sequence."""
    from torch import nn

    from cswap.units import discover_units

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 4)).double().eval()
    x = torch.randn(20, 3, dtype=torch.float64)  # 20 rows for 13 features: mean-compensated
    space = discover_units(model, x[:1])
    lstsq = measure_means(model, space, x, mode="lstsq")
    assert "2" in lstsq.fallback and not lstsq.refits("2")
    inputs = torch.relu(model[0](x)).detach().numpy()
    weight = model[2].weight.detach().numpy()
    weights = np.linspace(0.5, 2.0, 4)

    def error(gone):  # mean square of the fold's output error per output, weighted and summed
        gone = sorted(gone)
        centred = inputs[:, gone] - inputs[:, gone].mean(0)
        return ((centred @ weight[:, gone].T) ** 2).mean(0) @ weights

    base = [space.units[i].id for i in (0, 5)]
    compensation = lstsq.with_base(model, space, base)
    basis = compensation.estimator("2")
    assert basis is not None and compensation.bases == {}
    channel = [space.units[u].targets[0].indices[0] for u in range(12)]
    before = {channel[u] for u in base}
    sets = [[channel[u]] for u in (3, 7, 1)]
    torch_weights = torch.tensor(weights)
    assert basis.removal_cost(sets[0], torch_weights) == pytest.approx(
        error(before | {channel[3]}) - error(before), rel=1e-9
    )
    expected, gone = [], set(before)
    for channels in sets:
        expected.append(error(gone | set(channels)) - error(gone))
        gone |= set(channels)
    assert basis.sequential(sets, torch_weights) == pytest.approx(expected, rel=1e-9)
    costs = reconstruction_costs(space, compensation, [3, 7], {"2": torch_weights})
    assert costs[3] == pytest.approx(expected[0], rel=1e-9)
