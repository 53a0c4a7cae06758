"""Units, exact interventions and physical removal: masked == pruned, exact accounting."""

import random

import pytest
import torch

from conftest import TinyNet, randomize_batchnorm
from cswap.errors import CswapError
from cswap.intervene import hook_count, removed
from cswap.measure import count_macs, count_params
from cswap.models import load_model
from cswap.surgery import EquivalenceError, check_equivalence, prune_copy
from cswap.units import classifier_layers, discover_units
from cswap.zoo.registry import ZOO
from cswap.zoo.store import build


def _random_subset(space, seed, fraction=0.4):
    rng = random.Random(seed)
    units = []
    for group in space.groups:
        count = min(group.size - 1, max(1, int(group.size * fraction)))
        units += rng.sample(group.unit_ids, count)
    return units


MODELS = {
    "zoo:resnet20": (lambda: build(ZOO["resnet20"]), (3, 1, 28, 28)),
    "zoo:vgg": (lambda: build(ZOO["vgg"]), (3, 1, 28, 28)),
    "torchvision:resnet18": (
        lambda: load_model("torchvision:resnet18?num_classes=10").model,
        (2, 3, 64, 64),
    ),
    "torchvision:vgg11_bn": (
        lambda: load_model("torchvision:vgg11_bn?num_classes=10").model,
        (2, 3, 64, 64),
    ),
    "torchvision:mobilenet_v2": (
        lambda: load_model("torchvision:mobilenet_v2?num_classes=10").model,
        (2, 3, 64, 64),
    ),
    "tiny": (lambda: TinyNet(), (3, 1, 14, 14)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_output_equals_physically_pruned_output(name, seed):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = randomize_batchnorm(factory().eval(), seed)
    batch = torch.randn(*shape)
    space = discover_units(model, batch[:1])
    units = _random_subset(space, seed)
    pruned = prune_copy(model, space, units, batch[:1])
    with removed(model, space, units):
        masked = model(batch)
    assert torch.allclose(masked, pruned(batch), rtol=1e-4, atol=1e-5)
    # the masked model really differs from the unpruned one (the test can fail)
    assert not torch.allclose(masked, model(batch), rtol=1e-4, atol=1e-5)
    # exact accounting of what the removal saves
    assert space.params_after(units) == count_params(pruned)
    assert space.macs_after(units) == count_macs(pruned, batch[:1])
    assert hook_count(model) == 0


def test_tiny_net_units_cover_the_couplings():
    model = TinyNet()
    space = discover_units(model, torch.zeros(1, 1, 14, 14))
    roots = {group.root: group for group in space.groups}
    # stem and body[3] share the residual stream: one group of 8 units spanning both
    stream = next(group for group in space.groups if "stem.0" in group.layers)
    assert stream.size == 8 and {"body.3", "body.0", "down.0"} <= set(stream.layers)
    assert roots["body.0"].size == 8 and "stem.0" not in roots["body.0"].layers
    assert roots["down.0"].size == 16 and "hidden" in roots["down.0"].layers
    assert roots["hidden"].kind == "neuron" and roots["hidden"].size == 16
    assert space.protected_layers == ("head",)
    assert len(space) == 8 + 8 + 16 + 16
    # a flattened channel is 4 input features of the hidden layer
    unit = space.units[roots["down.0"].unit_ids[3]]
    hidden_target = next(t for t in unit.targets if t.layer == "hidden")
    assert len(hidden_target.indices) == 4


def test_ignored_layers_and_unknown_names():
    model = TinyNet()
    space = discover_units(model, torch.zeros(1, 1, 14, 14), ignored_layers=["hidden"])
    assert "hidden" not in {group.root for group in space.groups}
    with pytest.raises(CswapError, match="not in the model"):
        discover_units(model, torch.zeros(1, 1, 14, 14), ignored_layers=["nope"])


def test_a_model_that_is_not_a_classifier_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    with pytest.raises(CswapError, match="not an image classifier"):
        classifier_layers(model, torch.zeros(1, 1, 8, 8))


def test_hooks_are_removed_when_the_forward_raises():
    model = TinyNet().eval()
    space = discover_units(model, torch.zeros(1, 1, 14, 14))
    x = torch.randn(2, 1, 14, 14)
    before = model(x)
    with pytest.raises(RuntimeError), removed(model, space, [0, 9, 20]):
        model(torch.randn(2, 3, 14, 14))  # wrong channel count: raises inside the context
    assert hook_count(model) == 0
    assert torch.equal(model(x), before)


def test_equivalence_check_fails_loudly_on_a_mismatch():
    model = randomize_batchnorm(TinyNet().eval())
    x = torch.randn(2, 1, 14, 14)
    space = discover_units(model, x[:1])
    pruned = prune_copy(model, space, [0, 1], x[:1])
    with pytest.raises(EquivalenceError, match="mis-coupled"):
        check_equivalence(model, pruned, space, [0, 2], x)  # not what was pruned


def test_grouped_convolutions_are_excluded_with_the_reason():
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    x = torch.randn(2, 1, 6, 6)
    model(x)
    space = discover_units(model.eval(), x[:1])
    reasons = " ".join(group.reason for group in space.excluded)
    assert "grouped convolution" in reasons
    units = [group.unit_ids[0] for group in space.groups]
    pruned = prune_copy(model, space, units, x[:1])
    with removed(model, space, units):
        assert torch.allclose(model(x), pruned(x), rtol=1e-4, atol=1e-5)


def test_ignoring_a_container_ignores_the_layers_inside_it():
    model = TinyNet()
    space = discover_units(model, torch.zeros(1, 1, 14, 14), ignored_layers=["body"])
    assert not any(group.root.startswith("body") for group in space.groups)
