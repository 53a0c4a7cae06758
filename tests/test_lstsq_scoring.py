"""Scoring under lstsq compensation measures the removal that pruning applies.

The oracle is written independently of cswap's refit: it records each consumer's inputs on the
unpruned model, solves the ridge problem as a stacked least-squares system with numpy, writes the
refitted weights into a copy of the model and runs it. The closed-form update cswap scores with
(one inverse per consumer per round) must agree with it in float64, on every scoring path.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TinyNet, randomize_batchnorm
from cswap.compensation import measure_means
from cswap.intervene import BaseRemoval, consumer_masks, hook_count, removed, removed_each
from cswap.scoring import causal_effects
from cswap.units import discover_units

RIDGE = 1e-3


def _inputs(model, layers, images):
    """Each layer's input on ``images`` (the unpruned model)."""
    found = {}
    handles = [
        model.get_submodule(layer).register_forward_pre_hook(
            lambda _m, inputs, layer=layer: found.__setitem__(layer, inputs[0].detach().clone())
        )
        for layer in layers
    ]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return found


def _rows(module, x):
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    else:
        patches = nn.functional.unfold(
            x, module.kernel_size, module.dilation, module.padding, module.stride
        )
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return np.concatenate([rows.numpy(), np.ones((len(rows), 1))], axis=1)


def _oracle_model(model, space, units, inputs):
    """A copy of ``model`` whose consumers of ``units`` are refitted by numpy least squares."""
    copy_ = copy.deepcopy(model)
    for (layer, _dim), indices in consumer_masks(space, units).items():
        module = copy_.get_submodule(layer)
        rows = _rows(module, inputs[layer])
        ridge_refit(module, model.get_submodule(layer), indices, rows, rows)
    return copy_


def ridge_refit(module, original, indices, rows, pruned_rows):
    """Write into ``module`` the numpy ridge refit of ``original`` with input channels
    ``indices`` removed: from ``pruned_rows`` (its unfolded inputs, ones column last) to the
    original outputs ``rows @ theta0``, ridge RIDGE times the mean diagonal of the Gram of
    ``rows``, as a stacked least-squares system."""
    weight = original.weight.detach().numpy()
    flat = weight.reshape(weight.shape[0], -1)
    per_channel = flat.shape[1] // weight.shape[1]
    bias = original.bias.detach().numpy() if original.bias is not None else np.zeros(len(flat))
    theta = np.concatenate([flat.T, bias[None, :]])
    gone = np.zeros(weight.shape[1], dtype=bool)
    gone[sorted(set(indices))] = True
    keep = np.concatenate([np.repeat(~gone, per_channel), [True]])
    scale = RIDGE * (rows**2).sum(0).mean() / len(rows)
    n = np.sqrt(len(rows))
    system = np.concatenate([pruned_rows[:, keep] / n, np.sqrt(scale) * np.eye(keep.sum())])
    target = np.concatenate([rows @ theta / n, np.sqrt(scale) * theta[keep]])
    solution = np.linalg.lstsq(system, target, rcond=None)[0]
    new = np.zeros_like(flat)
    new[:, keep[:-1]] = solution[:-1].T
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(new.reshape(weight.shape)))
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(len(flat), dtype=torch.float64))
        module.bias.copy_(torch.from_numpy(solution[-1]))


def _true_class(model, images, labels):
    with torch.no_grad():
        return torch.softmax(model(images), 1).gather(1, labels.view(-1, 1)).squeeze(1).numpy()


def make_setting(seed: int, images: int, classes: int):
    """(model, space, images, labels, lstsq compensation, each consumer's recorded inputs): a
    float64 TinyNet with random BatchNorm statistics."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(TinyNet(width=4)).double().eval()
    x = torch.randn(images, 1, 14, 14, dtype=torch.float64)
    labels = torch.arange(images) % classes
    space = discover_units(model, x[:1])
    # every consumer refitted, however few rows (exactness, not generalization, is tested here)
    lstsq = measure_means(model, space, x, mode="lstsq", ridge=RIDGE, min_rows=0)
    layers = {target.layer for unit in space.units for target in unit.targets}
    return model, space, x, labels, lstsq, _inputs(model, layers, x)


@pytest.fixture(scope="module")
def setting():
    return make_setting(seed=3, images=24, classes=10)


def _pick(space):
    """A unit of the residual-coupled stem group (two conv consumers), one read by a conv only,
    one read by the Linear through a flatten, one read by the head; and a base removal."""
    by_root = {group.root: group.unit_ids for group in space.groups}
    residual = by_root["body.3"]
    conv_only = by_root["body.0"]
    flattened = by_root["down.0"]
    hidden = by_root["hidden"]
    base = (residual[0], conv_only[1], flattened[2], hidden[3])
    scored = [residual[1], conv_only[0], flattened[0], hidden[0], hidden[5]]
    return base, scored


@pytest.mark.parametrize(
    "path",
    [
        dict(prefix_reuse=False, units_per_pass=1),
        dict(prefix_reuse=True, units_per_pass=1),
        dict(prefix_reuse=False, units_per_pass=3),
        dict(prefix_reuse=True, units_per_pass=3),
    ],
    ids=["full-pass", "prefix", "batched", "batched-prefix"],
)
def test_lstsq_scoring_equals_a_brute_force_refit_then_removal(setting, path):
    model, space, images, labels, lstsq, inputs = setting
    base, scored = _pick(space)
    effects = causal_effects(
        model,
        space,
        images,
        labels,
        units=scored,
        already_removed=base,
        compensation=lstsq,
        batch_size=16,
        **path,
    )
    reference = _true_class(_oracle_model(model, space, base, inputs), images, labels)
    np.testing.assert_allclose(effects.baseline, reference, rtol=1e-9, atol=1e-12)
    for row, unit in enumerate(scored):
        sigma = _true_class(_oracle_model(model, space, [*base, unit], inputs), images, labels)
        expected = (sigma - reference) / reference
        np.testing.assert_allclose(effects.relative_effects[row], expected, rtol=1e-7, atol=1e-9)
    assert hook_count(model) == 0


def test_a_duplicated_neuron_scores_no_effect_under_lstsq_but_does_under_the_mean():
    """The defect the scoring fix is for: refitting moves a duplicate onto its twin exactly, so
    its refitted removal changes nothing, while the mean replacement scores a large effect."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    with torch.no_grad():
        model[0].weight[3] = model[0].weight[2]
        model[0].bias[3] = model[0].bias[2]
    x = torch.randn(200, 3, dtype=torch.float64)
    labels = model(x).argmax(1)
    space = discover_units(model, x[:1])
    twin = next(u.id for u in space.units if u.index == 3)
    lstsq = measure_means(model, space, x, mode="lstsq", ridge=1e-9)
    mean = measure_means(model, space, x, mode="mean")
    refitted = causal_effects(model, space, x, labels, units=[twin], compensation=lstsq)
    shifted = causal_effects(model, space, x, labels, units=[twin], compensation=mean)
    assert np.abs(refitted.relative_effects).max() < 1e-6
    assert np.abs(shifted.xi).max() > 1e-3


def test_batched_lstsq_interventions_remove_every_hook(setting):
    model, space, images, _labels, lstsq, _ = setting
    base, scored = _pick(space)
    with pytest.raises(RuntimeError), removed_each(model, space, base, scored[:2], lstsq):
        model(images[:5])  # 5 rows cannot be split into 2 copies
    assert hook_count(model) == 0


def test_the_lstsq_pruned_model_equals_an_independent_refit(setting):
    """Physical removal + fold against the numpy oracle (not cswap's own refit on both sides)."""
    from cswap.surgery import prune_copy

    model, space, images, _labels, lstsq, inputs = setting
    base, scored = _pick(space)
    units = [*base, *scored]
    pruned = prune_copy(model, space, units, images[:1], lstsq)
    with torch.no_grad():
        expected = _oracle_model(model, space, units, inputs)(images)
        assert torch.allclose(pruned(images), expected, rtol=1e-7, atol=1e-9)
        assert not torch.allclose(model(images), expected, atol=1e-3)


def test_an_open_base_removal_plus_a_unit_is_removed_of_both_bit_for_bit(setting):
    """BaseRemoval.plus replaces only the unit's consumer layers' hooks; the model then computes
    exactly what ``removed`` of the base and the unit computes (lstsq, mean and plain), an
    error inside ``plus`` restores the base, and leaving puts every weight back."""
    model, space, images, _labels, lstsq, _ = setting
    mean = measure_means(model, space, images, mode="mean")
    base, scored = _pick(space)
    intact = model(images)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for compensation in (lstsq, mean, None):
        with removed(model, space, base, compensation):
            base_out = model(images)
        with BaseRemoval(model, space, base, compensation) as open_base:
            for unit in scored:
                with open_base.suspended(), removed(model, space, [*base, unit], compensation):
                    expected = model(images)
                with open_base.plus(unit):
                    assert torch.equal(model(images), expected)
                assert torch.equal(model(images), base_out)
            with pytest.raises(RuntimeError), open_base.plus(scored[0]):
                raise RuntimeError("inside an intervention")
            assert torch.equal(model(images), base_out)
        assert hook_count(model) == 0 and torch.equal(model(images), intact)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_score_images_scores_a_label_stratified_subset_under_the_full_compensation(
    trained_tiny, fashion_small
):
    from torch.utils.data import TensorDataset

    from cswap.session import CausalRanker, make_options, measure_compensation, prepare

    _, _, x, y = fashion_small
    data, validation = TensorDataset(x[:120], y[:120]), TensorDataset(x[500:540], y[500:540])
    options = make_options({"score_images": 30, "correct_only": False, "min_class_size": 2})
    prepared = prepare(
        trained_tiny, data, validation, example_input=None, label_free=False, device="cpu",
        options=options,
    )  # fmt: skip
    images, labels = prepared.scoring_data(30, seed=0)
    assert len(labels) == 30 and prepared.scoring_data(0, seed=0)[0] is prepared.calibration_images
    assert prepared.calibration_info["scoring_size"] == 30  # the report says so
    # each class keeps its share of the 120 images to within one image
    full = np.bincount(prepared.calibration_labels.numpy(), minlength=10) * 30 / 120
    assert np.all(np.abs(np.bincount(labels.numpy(), minlength=10) - full) < 1)
    rows = {tuple(image.flatten().tolist()) for image in prepared.calibration_images}
    assert len({tuple(image.flatten().tolist()) for image in images} & rows) == 30
    compensation = measure_compensation(prepared, "lstsq", options)
    assert compensation.images == 120  # the refit's statistics: every calibration image
    ranker = CausalRanker(prepared, options, False, compensation, allow_critical=True)
    categorization = ranker.categorization(())
    oracle = causal_effects(
        prepared.model, prepared.space, images, labels, compensation=compensation
    )
    assert np.array_equal(categorization.unit_ids, oracle.unit_ids)
    assert np.allclose(categorization.kl, oracle.kl.mean(axis=1), rtol=1e-5, atol=1e-9)
    # the report's evidence comes from the same images, indexed in the calibration set
    from cswap.api import _evidence

    subset = set(prepared.scoring_indices(30, seed=0).tolist())
    units = [
        {"id": int(u), "xi": -1.0, "category": "critical", "removed_at_step": None}
        for u in categorization.unit_ids[:2]
    ]
    entries, _ = _evidence(prepared, units, compensation, options)
    with torch.no_grad():
        probabilities = torch.softmax(prepared.model(prepared.calibration_images), dim=1)
    assert [entry["unit"] for entry in entries] == [unit["id"] for unit in units]
    for item in (item for entry in entries for item in entry["images"]):
        image, label = item["image"], item["label"]
        assert image in subset and label == int(prepared.calibration_labels[image])
        assert item["p_label_before"] == pytest.approx(float(probabilities[image, label]), abs=1e-4)
