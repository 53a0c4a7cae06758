"""Units, exact interventions and physical removal: masked == pruned, exact accounting."""

import random

import pytest
import torch

import cswap
from conftest import TinyNet, randomize_batchnorm
from cswap.errors import CswapError
from cswap.intervene import hook_count, removed
from cswap.measure import count_macs, count_params
from cswap.models import load_model
from cswap.surgery import EquivalenceError, check_equivalence, prune_copy, verify_groups
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


class SplitNet(torch.nn.Module):
    """A fixed channel split (as in MixNet): Torch-Pruning couples the split's input channels,
    but the forward pass hard-codes the split sizes, so removing one of them breaks it."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        self.c = nn.Conv2d(4, 6, 3, padding=1)
        self.d = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        x = torch.relu(self.a(x))
        x1, x2 = torch.split(x, [4, 4], dim=1)
        y = torch.relu(self.b(x1) + self.c(x2))
        return self.head(torch.relu(self.d(y)).mean((2, 3)))


def test_a_group_whose_removal_breaks_the_model_is_excluded_with_the_reason():
    from cswap.surgery import verify_groups

    torch.manual_seed(0)
    model = SplitNet().eval()
    example = torch.randn(1, 1, 8, 8)
    space = discover_units(model, example)
    assert sorted(g.root for g in space.groups) == ["a", "b", "d"]
    failed = verify_groups(model, space, example)
    assert list(failed) == ["a"]
    assert failed["a"].startswith("removing a unit fails (RuntimeError: split_with_sizes")
    tiny, tiny_example = TinyNet().eval(), torch.randn(1, 1, 14, 14)
    assert verify_groups(tiny, discover_units(tiny, tiny_example), tiny_example) == {}
    # end to end: the run goes on without that group, and the report says why
    images = torch.randn(30, 1, 8, 8)
    data = torch.utils.data.TensorDataset(images, torch.arange(30) % 10)
    result = cswap.prune(
        model,
        data,
        validation=data,
        target_params=0.1,
        method="l1",
        mode="oneshot",
        compensate="none",
        correct_only=False,
        progress=False,
    )
    excluded = {g["root"]: g["reason"] for g in result.report["excluded_groups"]}
    assert excluded["a"] == failed["a"]
    assert result.report["stop_reason"] == "target_reached"
    assert {g["root"] for g in result.report["groups"]} == {"b", "d"}


def test_running_out_of_memory_while_verifying_is_one_error_not_excluded_groups(monkeypatch):
    from cswap import surgery

    model, example = TinyNet().eval(), torch.randn(1, 1, 14, 14)
    space = discover_units(model, example)

    def no_room(*_args, **_kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate"
        )

    monkeypatch.setattr(surgery, "apply_plan", no_room)
    with pytest.raises(CswapError, match="Out of memory while removing units from a copy"):
        surgery.verify_groups(model, space, example)


def test_equivalence_is_judged_on_the_output_scale():
    """A random-init Inception-v3 outputs ~1e8: float error of a millionth of that scale on an
    output near zero fails an elementwise tolerance, yet it is no mis-coupling; a wrong removal
    (differences on the output's own scale) must still fail."""

    class Perturbed(torch.nn.Module):  # the pruned model plus float-error-sized noise
        def __init__(self, inner, amount):
            super().__init__()
            self.inner, self.amount = inner, amount

        def forward(self, x):
            out = self.inner(x).clone()
            out[:, 0] += self.amount  # class 0's logit is exactly 0 (below)
            return out

    model = randomize_batchnorm(TinyNet().eval())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                module.weight.mul_(300.0)
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight[0].zero_()
        last.bias[0].zero_()
    x = torch.randn(2, 1, 14, 14)
    space = discover_units(model, x[:1])
    pruned = prune_copy(model, space, [0, 1], x[:1])
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert scale > 1e6
    noisy = Perturbed(pruned, 1e-6 * scale)
    assert check_equivalence(model, noisy, space, [0, 1], x) == pytest.approx(1e-6 * scale, rel=0.1)
    with pytest.raises(EquivalenceError, match="mis-coupled"):
        check_equivalence(model, Perturbed(pruned, 1e-3 * scale), space, [0, 1], x)
    with pytest.raises(EquivalenceError, match="mis-coupled"):
        check_equivalence(model, pruned, space, [0, 2], x)


def test_a_channels_last_swin_keeps_the_residual_streams_it_cannot_remove_out_by_verification():
    """torchvision's Swin keeps channels last and partitions windows with views and slices that
    Torch-Pruning maps as if dimension 1 were the channels (its grouping of the residual stream
    ran out of memory on Swin-T). Those operations are cut out of the graph, so its residual
    streams group without exhausting memory; but the attention reads them through F.linear on
    the qkv weight, which the graph does not see as a consumer, so removing a residual channel
    fails: verification on a copy excludes those groups with the reason, and the MLPs' hidden
    neurons are the units, removing them equal to masking them."""
    from torchvision.models.swin_transformer import SwinTransformer

    from cswap.session import Options, _verified_units

    torch.manual_seed(0)
    model = SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1, 1],
        num_heads=[2, 2, 2],
        window_size=[4, 4],
        num_classes=10,
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    space = _verified_units(model, x[:1], Options())
    assert [(g.root, g.size) for g in space.groups] == [
        ("features.1.0.mlp.0", 64),
        ("features.3.0.mlp.0", 128),
        ("features.5.0.mlp.0", 256),
    ]
    streams = {g.root: g.reason for g in space.excluded if g.root.endswith("mlp.3")}
    assert sorted(streams) == ["features.1.0.mlp.3", "features.3.0.mlp.3", "features.5.0.mlp.3"]
    assert all(reason.startswith("removing a unit fails") for reason in streams.values())
    units = [unit for group in space.groups for unit in group.unit_ids[1::2]]
    pruned = prune_copy(model, space, units, x[:1])
    assert check_equivalence(model, pruned, space, units, x) < 1e-5
    assert pruned.features[5][0].mlp[0].out_features == 128


def test_verification_excludes_a_group_behind_a_channel_mixing_op_cswap_does_not_know():
    """A custom normalization across channels is invisible to the dependency graph: masking a
    channel there is not removing it. Verification removes half of every group from a copy,
    so the error (which grows with what is removed) shows and the group is excluded."""

    class ChannelMeanNorm(torch.nn.Module):
        def forward(self, x):
            return x / (x.abs().mean(dim=1, keepdim=True) + 1e-3)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3),
        torch.nn.ReLU(),
        ChannelMeanNorm(),
        torch.nn.Conv2d(32, 8, 3),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 4),
    ).eval()
    x = torch.randn(1, 3, 10, 10)
    space = discover_units(model, x)
    assert [g.root for g in space.groups] == ["0", "3"]
    failed = verify_groups(model, space, x)
    assert list(failed) == ["0"]
    assert failed["0"].startswith("removing a unit is not what masking it computes")
