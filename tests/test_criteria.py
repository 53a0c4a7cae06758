import numpy as np
import pytest
import torch

from conftest import TinyNet, randomize_batchnorm
from cswap.criteria import (
    CRITERIA,
    bn_scale_scores,
    criterion_scores,
    fpgm_scores,
    lrp_scores,
    magnitude_scores,
    ranking_from_scores,
    taylor_scores,
)
from cswap.errors import CswapError
from cswap.intervene import hook_count
from cswap.units import discover_units


def test_magnitude_is_the_group_norm_of_every_owned_slice():
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    ).eval()
    space = discover_units(model, torch.zeros(1, 3))
    assert len(space) == 4  # the hidden neurons
    first, second = model[0], model[2]
    for unit in space.units:
        i = unit.index
        owned = [t.detach() for t in (first.weight[i], first.bias[i : i + 1], second.weight[:, i])]
        l1 = sum(float(t.abs().sum()) for t in owned)
        l2 = sum(float(t.pow(2).sum()) for t in owned) ** 0.5
        assert magnitude_scores(model, space, 1)[unit.id] == pytest.approx(l1, rel=1e-6)
        assert magnitude_scores(model, space, 2)[unit.id] == pytest.approx(l2, rel=1e-6)


def test_every_criterion_scores_every_unit_and_random_is_seeded():
    model = randomize_batchnorm(TinyNet().eval())
    images, labels = torch.randn(12, 1, 14, 14), torch.arange(12) % 10
    space = discover_units(model, images[:1])
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for name in CRITERIA:
        scores = criterion_scores(name, model, space, images=images, labels=labels, batch_size=5)
        assert scores.shape == (len(space),), name
        assert not np.isnan(scores).any(), name
    # scoring leaves the model as it was: weights, BN statistics, hooks, gradients
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    a = criterion_scores("random", model, space, seed=1)
    assert np.array_equal(a, criterion_scores("random", model, space, seed=1))
    assert not np.array_equal(a, criterion_scores("random", model, space, seed=2))
    with pytest.raises(CswapError, match="Unknown criterion"):
        criterion_scores("magic", model, space)
    with pytest.raises(CswapError, match="needs calibration images"):
        criterion_scores("taylor", model, space)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()


def test_lrp_on_a_two_layer_network_equals_the_hand_computed_relevance():
    model = _mlp()
    x = torch.randn(6, 3)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    space = discover_units(model, x[:1])
    scores = lrp_scores(model, space, x, y, batch_size=4)
    # epsilon rule at the output layer, relevance starting as the true class's logit z_c:
    # R_j = a_j * w_cj * z_c / (z_c + eps)  ~=  a_j * w_cj, summed over the samples
    with torch.no_grad():
        hidden = torch.relu(model[0](x))
        weights = model[2].weight[y]  # (samples, hidden): w_{c_n j}
        expected = (hidden * weights).sum(0)
    for unit in space.units:
        assert scores[unit.id] == pytest.approx(float(expected[unit.index]), rel=1e-4, abs=1e-6)


def test_taylor_is_the_first_order_loss_change_of_removing_the_unit():
    model = _mlp().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    space = discover_units(model, x[:1])
    scores = taylor_scores(model, space, x, y)
    step = 1e-6
    for unit in space.units:
        # scale the unit's input of the consumer by (1 - step): dL/dstep = -x * dL/dx per sample

        def shrink(_m, inputs, index=unit.index):
            z = inputs[0].clone()
            z[:, index] = z[:, index] * (1 - step)
            return (z,)

        with torch.no_grad():
            base = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            handle = model[2].register_forward_pre_hook(shrink)
            moved = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            handle.remove()
        expected = ((moved - base) / step).abs().mean()
        assert scores[unit.id] == pytest.approx(float(expected), rel=1e-4, abs=1e-9)


def test_bn_scale_and_fpgm():
    model = randomize_batchnorm(TinyNet().eval())
    space = discover_units(model, torch.zeros(1, 1, 14, 14))
    scores = bn_scale_scores(model, space)
    hidden = [u.id for u in space.units if u.layers[0] == "hidden"]
    assert np.isinf(scores[hidden]).all()  # no BatchNorm: never chosen
    body = next(u for u in space.units if u.layers[0] == "body.0" and u.index == 3)
    assert scores[body.id] == pytest.approx(float(model.body[1].weight[3].detach().abs()))
    with pytest.raises(CswapError, match="no unit of this model has one"):
        bn_scale_scores(_mlp(), discover_units(_mlp(), torch.zeros(1, 3)))
    # fpgm: two identical filters sit nearest the others' median -> lowest in a 3-filter group
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 4, 2)
    ).eval()
    with torch.no_grad():
        conv[0].weight[:] = torch.tensor([1.0, 1.0, 5.0]).view(3, 1, 1, 1)
    conv_space = discover_units(conv, torch.zeros(1, 1, 2, 2))
    fpgm = fpgm_scores(conv, conv_space)
    assert fpgm[0] == pytest.approx(fpgm[1]) and fpgm[2] > fpgm[0]
    assert fpgm.mean() == pytest.approx(1.0)


def test_ranking_puts_the_least_important_first_and_skips_removed():
    ranking = ranking_from_scores(np.array([3.0, 1.0, 2.0, 1.0]), removed=[2])
    assert ranking.order == (1, 3, 0)
