"""The control variate of staged scoring (cswap.control).

The proxy (reverse mode, every unit at once) is checked against an independent oracle: the
second-order KL from the derivative of the logits along each unit's removal, by forward-mode
autodiff through the model with the removal applied by hand. The
estimator's unbiasedness is checked against exact effects on every image: averaged over every
subset of the images it equals their mean KL.
"""

import itertools

import numpy as np
import pytest
import torch

from cswap.compensation import measure_means
from cswap.control import ControlVariate, fit_coefficients, second_order_proxy
from cswap.scoring import causal_effects
from test_lstsq_scoring import make_setting


@pytest.fixture(scope="module")
def setting():
    return make_setting(seed=11, images=16, classes=4)


def _second_order_kl(model, space, unit, images, means):
    """1/2 dz^T (diag p - p p^T) dz per image, with dz the derivative of the logits along the
    removal (the unit's consumer inputs moved towards their means), by forward-mode autodiff."""
    import torch.autograd.forward_ad as fwad

    modules = dict(model.named_modules())

    def hook(target, t):
        def move(_module, inputs):
            x = inputs[0]
            shape = [1] * x.dim()
            shape[target.dim] = -1
            mask = torch.zeros(x.shape[target.dim], dtype=x.dtype)
            mask[list(target.indices)] = 1.0
            mean = means[target.layer].to(x).view(shape)
            return (x - t * mask.view(shape) * (x - mean), *inputs[1:])

        return move

    with torch.no_grad(), fwad.dual_level():
        t = fwad.make_dual(
            torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        )
        handles = [
            modules[target.layer].register_forward_pre_hook(hook(target, t))
            for target in space.units[unit].targets
        ]
        try:
            out = fwad.unpack_dual(model(images))
        finally:
            for handle in handles:
                handle.remove()
    p = torch.softmax(out.primal, dim=1)
    dz = out.tangent
    centred = dz - (p * dz).sum(1, keepdim=True)
    return (0.5 * (p * centred**2).sum(1)).numpy()


def test_proxy_is_the_second_order_kl_of_the_removal(setting):
    model, space, images, _, lstsq, _ = setting
    # a residual-coupled channel, a channel read by two convs, a hidden neuron, a head input
    units = [2, 6, 10, 27]
    proxy = second_order_proxy(model, space, units, images, means=lstsq.means, batch_size=5)
    assert proxy.shape == (len(units), len(images))
    for row, unit in enumerate(units):
        oracle = _second_order_kl(model, space, unit, images, lstsq.means)
        assert proxy[row] == pytest.approx(oracle, rel=1e-9, abs=1e-18)
        assert proxy[row].max() > 0


def test_proxy_without_means_moves_the_inputs_to_zero(setting):
    model, space, images, _, _, _ = setting
    zeros = {layer: torch.zeros_like(mean) for layer, mean in setting[4].means.items()}
    proxy = second_order_proxy(model, space, [3], images[:4])
    oracle = _second_order_kl(model, space, 3, images[:4], zeros)
    assert proxy[0] == pytest.approx(oracle, rel=1e-9, abs=1e-18)
    assert proxy[0].max() > 0


def test_control_variate_is_unbiased_and_narrower_on_exact_effects(setting):
    """Over every subset of 3 of the 16 images, the corrected mean of the mean-compensated
    removal averages to its mean KL over all 16 (exact scoring of every image), with the
    coefficients held fixed; where c = 1 its spread over the subsets is a small part of the
    plain subset mean's."""
    model, space, images, labels, _, _ = setting
    mean = measure_means(model, space, images, mode="mean")
    units = list(range(len(space)))
    exact = causal_effects(model, space, images, labels, compensation=mean)
    kl = exact.kl[np.argsort(exact.unit_ids)]
    proxy = second_order_proxy(model, space, units, images, means=mean.means)
    index = {unit: unit for unit in units}
    every = np.arange(len(images))
    coefficients = fit_coefficients(space, index, proxy, units, kl, every)
    # the second group's large removals are far from second order (correlation 0.27): dropped
    by_group = {space.units[u].group: c for u, c in coefficients.items()}
    assert by_group == {0: 1.0, 1: 0.0, 2: 1.0, 3: 1.0}
    control = ControlVariate(index, proxy, coefficients)
    plain, corrected = [], []
    for subset in itertools.combinations(range(len(images)), 3):
        columns = np.array(subset)
        plain.append(kl[:, columns].mean(axis=1))
        corrected.append(control.adjusted(units, kl[:, columns], columns).mean(axis=1))
    plain, corrected = np.array(plain), np.array(corrected)
    assert corrected.mean(axis=0) == pytest.approx(kl.mean(axis=1), rel=1e-9, abs=1e-15)
    assert plain.mean(axis=0) == pytest.approx(kl.mean(axis=1), rel=1e-9, abs=1e-15)
    on = [u for u in units if coefficients[u]]
    assert corrected.var(axis=0)[on].sum() < 0.1 * plain.var(axis=0)[on].sum()
    off = [u for u in units if not coefficients[u]]
    assert (corrected[:, off] == plain[:, off]).all()


def test_coefficients_drop_a_group_whose_pilots_the_proxy_does_not_narrow(setting):
    space = setting[1]
    groups = {}
    for unit in space.units:
        groups.setdefault(unit.group, []).append(unit.id)
    first, second, third = list(groups.values())[:3]
    rng = np.random.default_rng(0)
    proxy = rng.random((len(space), 6))
    columns = np.array([0, 2, 3, 5])
    noise = 0.01 * rng.random(len(columns))
    # the first group's pilots follow their proxy (KL = X + small noise); the second's move
    # against it (KL - X varies 9 / 4 times as much as KL)
    kl = np.stack([proxy[first[0], columns] + noise, 1.0 - 2.0 * proxy[second[0], columns]])
    index = {unit.id: unit.id for unit in space.units}
    coefficients = fit_coefficients(space, index, proxy, [first[0], second[0]], kl, columns)
    assert all(coefficients[u] == 1.0 for u in first)
    assert all(coefficients[u] == 0.0 for u in second)
    assert all(coefficients[u] == 1.0 for u in third)  # no pilot: nothing against it
