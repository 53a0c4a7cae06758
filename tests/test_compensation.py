"""Mean compensation: compensated masking == pruned + folded model; exact where it must be."""

import pytest
import torch
from torch import nn

from conftest import TinyNet, randomize_batchnorm
from cswap.compensation import measure_means
from cswap.errors import CswapError
from cswap.export import load, save_model
from cswap.intervene import hook_count, removed
from cswap.models import load_model
from cswap.surgery import check_equivalence, prune_copy
from cswap.units import discover_units
from cswap.zoo.registry import ZOO
from cswap.zoo.store import build
from test_units import _random_subset
from test_vit import spread_weights

MODELS = {
    "zoo:resnet20": (lambda: randomize_batchnorm(build(ZOO["resnet20"]).eval()), (6, 1, 28, 28)),
    "zoo:vgg": (lambda: randomize_batchnorm(build(ZOO["vgg"]).eval()), (6, 1, 28, 28)),
    "zoo:vit": (lambda: spread_weights(build(ZOO["vit"])), (6, 1, 28, 28)),
    "torchvision:resnet18": (
        lambda: randomize_batchnorm(load_model("torchvision:resnet18?num_classes=10").model.eval()),
        (3, 3, 64, 64),
    ),
    "torchvision:mobilenet_v2": (
        lambda: randomize_batchnorm(
            load_model("torchvision:mobilenet_v2?num_classes=10").model.eval()
        ),
        (3, 3, 64, 64),
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["mean", "lstsq"])
def test_compensated_masking_equals_pruned_and_folded(name, mode):
    factory, shape = MODELS[name]
    model = factory()
    images = torch.randn(*shape)
    space = discover_units(model, images[:1])
    compensation = measure_means(model, space, images, mode=mode)
    units = _random_subset(space, 0, fraction=0.3)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    pruned = prune_copy(model, space, units, images[:1], compensation)
    with torch.no_grad():
        with removed(model, space, units, compensation):
            compensated = model(images)
        with removed(model, space, units):
            plain = model(images)
        assert torch.allclose(compensated, pruned(images), rtol=1e-4, atol=1e-5)
        # compensation changes the outputs (the test can fail) ...
        assert not torch.allclose(compensated, plain, rtol=1e-4, atol=1e-5)
    check_equivalence(model, pruned, space, units, images, compensation=compensation)
    # ... and the user's model is untouched: no folded value, no hook left behind
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert hook_count(model) == 0


class ConstantChannelNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> pool -> linear, where channel 2 of the first conv is
    constant (zero weights, a positive bias): removing it with compensation is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=0, bias=True)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.hidden = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():
            self.conv1.weight[2] = 0.0
            self.conv1.bias[2] = 0.7
            self.hidden.weight[1] = 0.0
            self.hidden.bias[1] = 1.3

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3))
        return self.head(torch.relu(self.hidden(x)))


def test_a_constant_unit_removed_with_compensation_changes_no_output():
    torch.manual_seed(0)
    model = randomize_batchnorm(ConstantChannelNet().eval())
    images = torch.randn(8, 1, 10, 10)
    space = discover_units(model, images[:1])
    channel = next(u.id for u in space.units if u.layers[0] == "conv1" and u.index == 2)
    neuron = next(u.id for u in space.units if u.layers[0] == "hidden" and u.index == 1)
    compensation = measure_means(model, space, images[:3])  # other images: still constant
    with torch.no_grad():
        reference = model(images)
        for units in ([channel], [neuron], [channel, neuron]):
            pruned = prune_copy(model, space, units, images[:1], compensation)
            assert torch.allclose(pruned(images), reference, rtol=1e-5, atol=1e-6)
            with removed(model, space, units):  # without compensation the output moves
                assert not torch.allclose(model(images), reference, atol=1e-3)
    # conv2 has no bias: the constant went into bn2's running mean, no parameter was added
    folded = prune_copy(model, space, [channel], images[:1], compensation)
    assert folded.conv2.bias is None
    assert not torch.equal(folded.bn2.running_mean, model.bn2.running_mean)


def test_fold_adds_a_bias_where_there_is_neither_bias_nor_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)
    ).eval()
    x = torch.randn(10, 6)
    space = discover_units(model, x[:1])
    compensation = measure_means(model, space, x)
    units = [u.id for u in space.units if u.layers[0] == "0"][:3]
    pruned = prune_copy(model, space, units, x[:1], compensation)
    assert pruned[2].bias is not None
    with torch.no_grad(), removed(model, space, units, compensation):
        assert torch.allclose(model(x), pruned(x), rtol=1e-5, atol=1e-6)
    # saving and loading recreates the added bias
    plan = space.removal_plan(units)
    save_model(
        tmp_path, pruned, base_spec=None, plan=plan, example_shape=(1, 6), preprocessing=None
    )
    fresh = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)
    )
    loaded = load(tmp_path, base_model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


class PaddedNet(nn.Module):
    def __init__(self, padding: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=padding)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=padding)
        side = 8 if padding else 4
        self.head = nn.Linear(4 * side * side, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def test_ideal_replacement_differs_from_the_fold_only_at_padded_borders():
    torch.manual_seed(0)
    images = torch.randn(5, 1, 8, 8)
    for padding in (0, 1):
        model = PaddedNet(padding).eval()
        space = discover_units(model, images[:1])
        compensation = measure_means(model, space, images)
        units = [u.id for u in space.units if u.layers[0] == "conv1"][:2]
        outputs = {}
        for ideal in (False, True):
            captured = []
            with torch.no_grad(), removed(model, space, units, compensation, ideal=ideal):
                handle = model.conv2.register_forward_hook(
                    lambda _m, _i, output, store=captured: store.append(output)
                )
                model(images)
                handle.remove()
            outputs[ideal] = captured[0]
        gap = (outputs[False] - outputs[True]).abs()
        if padding == 0:
            assert gap.max() < 1e-5  # no padding: the fold is the mean replacement
        else:
            assert gap[..., 1:-1, 1:-1].max() < 1e-5  # interior: identical
            assert gap.max() > 1e-3  # borders: the padded taps never saw the mean


def test_lstsq_moves_a_duplicate_neuron_onto_its_twin_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():  # neuron 3 duplicates neuron 1: removing it loses nothing
        model[0].weight[3] = model[0].weight[1]
        model[0].bias[3] = model[0].bias[1]
    x = torch.randn(40, 3, dtype=torch.float64)
    space = discover_units(model, x[:1])
    twin = next(u.id for u in space.units if u.index == 3)
    exact = measure_means(model, space, x[:20], mode="lstsq", ridge=1e-12)
    mean = measure_means(model, space, x[:20], mode="mean")
    with torch.no_grad():
        reference = model(x)  # also on images the fit never saw
        refit = prune_copy(model, space, [twin], x[:1], exact)
        assert torch.allclose(refit(x), reference, rtol=1e-8, atol=1e-8)
        assert refit[2].weight.shape == (2, 3)
        folded = prune_copy(model, space, [twin], x[:1], mean)
        assert not torch.allclose(folded(x), reference, atol=1e-3)  # the mean cannot do this


def test_lstsq_falls_back_to_the_mean_for_a_layer_too_wide_for_its_gram_matrix():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 9000), nn.ReLU(), nn.Linear(9000, 16), nn.ReLU(), nn.Linear(16, 2)
    ).eval()
    x = torch.randn(80, 3)  # 4 rows per feature of the narrow layer (16 + 1 features)
    space = discover_units(model, x[:1])
    lstsq = measure_means(model, space, x, mode="lstsq", memory_gb=1.0)
    assert set(lstsq.fallback) == {"2"} and "memory budget of 1 GiB" in lstsq.fallback["2"]
    assert not lstsq.refits("2") and lstsq.refits("4")
    assert set(lstsq.grams) == {"4"}  # no 9,001^2 matrix was built
    wide = [u.id for u in space.units if u.targets[0].layer == "2"][:50]
    narrow = [u.id for u in space.units if u.targets[0].layer == "4"][:5]
    units = wide + narrow
    mean = measure_means(model, space, x, mode="mean")
    with torch.no_grad():
        pruned = prune_copy(model, space, units, x[:1], lstsq)
        with removed(model, space, units, lstsq):
            masked = model(x)
        assert torch.allclose(pruned(x), masked, rtol=1e-4, atol=1e-5)
        # the wide layer got exactly the mean fold, the narrow one a refit
        by_mean = prune_copy(model, space, units, x[:1], mean)
        assert torch.allclose(pruned[2].bias, by_mean[2].bias, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(pruned[4].weight, by_mean[4].weight)


@pytest.mark.parametrize(
    ("model", "shape", "few", "enough"),
    [  # Linear: one row per image, 9 + 1 features -> 40 images; conv 3x3 with stride 2 on a
        # 5x5 input: 4 rows per image (2x2 outputs), 4 * 9 + 1 features -> 37 images
        (lambda: nn.Sequential(nn.Linear(3, 9), nn.ReLU(), nn.Linear(9, 2)), (3,), 39, 40),
        (
            lambda: nn.Sequential(
                nn.Conv2d(1, 4, 3),
                nn.ReLU(),
                nn.Conv2d(4, 2, 3, stride=2),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            ),
            (1, 7, 7),
            36,
            37,
        ),
    ],
)
def test_lstsq_refits_only_layers_with_four_calibration_rows_per_feature(model, shape, few, enough):
    torch.manual_seed(0)
    model = model().eval()
    x = torch.randn(enough, *shape)
    space = discover_units(model, x[:1])
    short = measure_means(model, space, x[:few], mode="lstsq")
    assert set(short.fallback) == {"2"} and not short.refits("2") and not short.grams
    assert f"{few * (4 if len(shape) == 3 else 1):,} rows" in short.fallback["2"]
    assert "lstsq_min_rows" in short.fallback["2"]
    assert measure_means(model, space, x, mode="lstsq").refits("2")
    assert measure_means(model, space, x[:few], mode="lstsq", min_rows=1.0).refits("2")
    with torch.no_grad(), removed(model, space, [0], short):  # the mean fold, not a refit
        masked = model(x)
    mean = measure_means(model, space, x[:few], mode="mean")
    with torch.no_grad(), removed(model, space, [0], mean):
        assert torch.equal(masked, model(x))


def test_compensation_needs_images():
    model = TinyNet().eval()
    space = discover_units(model, torch.zeros(1, 1, 14, 14))
    with pytest.raises(CswapError, match="needs calibration images"):
        measure_means(model, space, torch.zeros(0, 1, 14, 14))
