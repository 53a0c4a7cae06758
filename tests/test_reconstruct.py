"""Error correction: the kept removal refitted on the pruned model's own inputs.

The oracle is sequential and written with numpy: a copy of the model with the removed input
columns zeroed at every consumer, then, layer by layer in the order they run, that layer's input
recorded *in the copy* (so upstream refits are included), the ridge problem against the
unpruned model's outputs solved as a stacked least-squares system, and the solution written into
the copy. cswap's corrected compensation, folded into the physically pruned model, must compute
what the oracle's copy computes (float64).
"""

import copy

import pytest
import torch

from cswap.compensation import measure_means
from cswap.intervene import consumer_masks, hook_count, removed
from cswap.reconstruct import propagated
from cswap.surgery import check_equivalence, prune_copy
from test_lstsq_scoring import RIDGE, _inputs, _pick, _rows, make_setting, ridge_refit

ORDER = ("body.0", "body.3", "down.0", "hidden", "head")  # TinyNet's consumers as they run


def _oracle(model, space, units, originals):
    masks = dict(consumer_masks(space, units))
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for (layer, _dim), indices in masks.items():
            copy_.get_submodule(layer).weight[:, sorted(set(indices))] = 0.0
    for layer in ORDER:
        indices = next((v for (name, _), v in masks.items() if name == layer), None)
        if indices is None:
            continue
        module = copy_.get_submodule(layer)
        pruned_rows = _rows(module, _inputs(copy_, [layer], originals["images"])[layer])
        rows = _rows(module, originals[layer])
        ridge_refit(module, model.get_submodule(layer), indices, rows, pruned_rows)
    return copy_


@pytest.fixture(scope="module")
def setting():
    return make_setting(seed=5, images=24, classes=10)


def test_the_corrected_pruned_model_equals_a_sequential_numpy_refit(setting):
    model, space, images, _labels, lstsq, inputs = setting
    base, scored = _pick(space)
    units = [*base, *scored]
    before = {key: value.clone() for key, value in model.state_dict().items()}
    corrected = propagated(model, space, units, lstsq, images, batch_size=7)
    assert set(corrected.fitted) == set(ORDER) and not corrected.shifts
    pruned = prune_copy(model, space, units, images[:1], corrected)
    oracle = _oracle(model, space, units, inputs | {"images": images})
    with torch.no_grad():
        assert torch.allclose(pruned(images), oracle(images), rtol=1e-7, atol=1e-9)
        with removed(model, space, units, corrected):
            assert torch.allclose(model(images), oracle(images), rtol=1e-7, atol=1e-9)
        # the correction changes the model (the test can fail): the plain refit is not it
        plain = prune_copy(model, space, units, images[:1], lstsq)
        assert not torch.allclose(plain(images), oracle(images), atol=1e-4)
        # on the calibration data the correction is closer to the unpruned model
        target = model(images)
        assert (oracle(images) - target).square().mean() < (plain(images) - target).square().mean()
    # the first layer that runs sees no upstream removal: its fit is the plain refit
    dim_indices = set(dict(consumer_masks(space, units))[("body.0", 1)])
    expected, _ = lstsq.refit(model.get_submodule("body.0"), "body.0", dim_indices)
    assert torch.allclose(corrected.fitted["body.0"][1], expected, atol=1e-9)
    check_equivalence(model, pruned, space, units, images, compensation=corrected)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert hook_count(model) == 0


def test_a_mean_compensated_layer_gets_the_shift_that_restores_its_mean_output(setting):
    model, space, images, _labels, _lstsq, inputs = setting
    # 24 images: the Linear layers (65 and 17 features, one row per image) are mean-compensated
    compensation = measure_means(model, space, images, mode="lstsq", ridge=RIDGE)
    assert {"hidden", "head"} <= set(compensation.fallback)
    base, scored = _pick(space)
    units = [*base, *scored]
    corrected = propagated(model, space, units, compensation, images)
    assert {"hidden", "head"} == set(corrected.shifts)
    outputs = {}
    with torch.no_grad(), removed(model, space, units, corrected):
        handles = [
            model.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, name=name: outputs.__setitem__(name, out.clone())
            )
            for name in ("hidden", "head")
        ]
        model(images)
        for handle in handles:
            handle.remove()
    for name in ("hidden", "head"):
        original = torch.nn.functional.linear(
            inputs[name], *[p.detach() for p in model.get_submodule(name).parameters()]
        )
        assert torch.allclose(outputs[name].mean(0), original.mean(0), atol=1e-9)
    # the plain mean fold does not restore it (upstream removals moved the kept inputs too)
    with torch.no_grad(), removed(model, space, units, compensation):
        handle = model.get_submodule("head").register_forward_hook(
            lambda _m, _i, out: outputs.__setitem__("plain", out.clone())
        )
        model(images)
        handle.remove()
    original = torch.nn.functional.linear(
        inputs["head"], *[p.detach() for p in model.get_submodule("head").parameters()]
    )
    assert not torch.allclose(outputs["plain"].mean(0), original.mean(0), atol=1e-6)


def test_output_divergence_is_the_mean_kl_from_the_unpruned_softmax(setting):
    from cswap.evaluate import output_divergence

    model, space, images, labels, lstsq, _inputs = setting
    base, scored = _pick(space)
    units = [*base, *scored]
    batches = [(images[:10], labels[:10]), (images[10:], labels[10:])]
    corrected = propagated(model, space, units, lstsq, images)
    values = output_divergence(model, space, units, batches, [None, lstsq, corrected])
    with torch.no_grad():
        reference = torch.log_softmax(model(images), 1)
        for value, compensation in zip(values, [None, lstsq, corrected], strict=True):
            with removed(model, space, units, compensation):
                logp = torch.log_softmax(model(images), 1)
            expected = torch.nn.functional.kl_div(
                logp, reference, log_target=True, reduction="batchmean"
            )
            assert value == pytest.approx(float(expected), rel=1e-9)
    assert values[0] > values[1] > 0  # the refit moves the outputs less than plain removal
    assert output_divergence(model, space, (), batches, [None]) == [0.0]
    assert hook_count(model) == 0


def test_no_removal_is_no_correction(setting):
    model, space, images, _labels, lstsq, _inputs = setting
    assert propagated(model, space, (), lstsq, images) is lstsq
