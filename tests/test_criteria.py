import numpy as np
import pytest
import torch

from conftest import TinyNet
from cswap.criteria import criterion_scores, magnitude_scores, ranking_from_scores
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
        owned = [first.weight[i], first.bias[i : i + 1], second.weight[:, i]]
        l1 = sum(float(t.abs().sum()) for t in owned)
        l2 = sum(float(t.pow(2).sum()) for t in owned) ** 0.5
        assert magnitude_scores(model, space, 1)[unit.id] == pytest.approx(l1, rel=1e-6)
        assert magnitude_scores(model, space, 2)[unit.id] == pytest.approx(l2, rel=1e-6)


def test_every_criterion_scores_every_unit_and_random_is_seeded():
    model = TinyNet().eval()
    space = discover_units(model, torch.zeros(1, 1, 14, 14))
    for name in ("l1", "l2", "random"):
        assert criterion_scores(name, model, space).shape == (len(space),)
    a = criterion_scores("random", model, space, seed=1)
    assert np.array_equal(a, criterion_scores("random", model, space, seed=1))
    assert not np.array_equal(a, criterion_scores("random", model, space, seed=2))
    with pytest.raises(ValueError):
        criterion_scores("magic", model, space)


def test_ranking_puts_the_least_important_first_and_skips_removed():
    ranking = ranking_from_scores(np.array([3.0, 1.0, 2.0, 1.0]), removed=[2])
    assert ranking.order == (1, 3, 0)
