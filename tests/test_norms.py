"""Channels behind a normalization over channels: recomputed over the kept ones = removal."""

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from cswap.compensation import measure_means
from cswap.intervene import BaseRemoval, hook_count, removed, removed_each
from cswap.measure import count_macs, count_params
from cswap.norms import channel_dim, renormalized
from cswap.scoring import causal_effects
from cswap.surgery import check_equivalence, prune_copy, verify_groups
from cswap.units import discover_units


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm over dim 1 of an (N, C, H, W) tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ScaledLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass whose forward is not a normalization cswap can recompute."""

    def forward(self, x):
        return 2 * super().forward(x) + x


def _affine(norm: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
        norm.bias.copy_(torch.rand(norm.bias.shape, generator=generator) - 0.5)
    return norm


@pytest.mark.parametrize(
    ("norm", "shape", "dim"),
    [
        (nn.LayerNorm(6), (4, 5, 6), -1),
        (ChannelsFirstLayerNorm(6), (4, 6, 3, 3), 1),
        (nn.GroupNorm(1, 6), (4, 6, 3, 3), 1),
    ],
)
def test_the_normalization_over_kept_channels_is_the_smaller_normalization(norm, shape, dim):
    """Oracle: a fresh module of the same kind built on the kept channels only."""
    norm = _affine(norm, 0)
    assert channel_dim(norm) == dim
    kept = [0, 2, 3, 5]
    if isinstance(norm, nn.GroupNorm):
        smaller = nn.GroupNorm(1, len(kept))
    else:
        smaller = type(norm)(len(kept))
    with torch.no_grad():
        smaller.weight.copy_(norm.weight[kept])
        smaller.bias.copy_(norm.bias[kept])
    x = torch.randn(*shape) * 3 + 1
    keep = torch.zeros(1, 6)
    keep[0, kept] = 1
    out = renormalized(norm, x, keep, dim)
    expected = smaller(x.index_select(dim, torch.tensor(kept)))
    torch.testing.assert_close(out.index_select(dim, torch.tensor(kept)), expected)
    assert out.index_select(dim, torch.tensor([1, 4])).abs().max() == 0
    # two stacked copies, each with its own kept channels
    both = torch.cat([x, x])
    rows = torch.stack([keep[0], torch.ones(6)])
    stacked = renormalized(norm, both, rows, dim)
    torch.testing.assert_close(stacked[: len(x)], out)
    torch.testing.assert_close(stacked[len(x) :], norm(x))


def test_normalizations_that_cannot_be_recomputed_are_recognised():
    assert channel_dim(nn.GroupNorm(2, 6)) is None
    assert channel_dim(nn.LayerNorm([6, 4])) is None
    assert channel_dim(ScaledLayerNorm(6)) is None
    assert channel_dim(nn.LocalResponseNorm(2)) is None


def _convnext(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=10)
    for index, module in enumerate(model.modules()):
        if isinstance(module, nn.LayerNorm):
            _affine(module, index)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layer_scale" in name:  # trained layer scales are far from their 1e-6 init
                parameter.uniform_(0.2, 1.0)
    return model.eval()


def test_a_convnext_residual_stream_behind_layernorms_is_units_and_removal_equals_masking():
    model = _convnext()
    x = torch.randn(3, 3, 32, 32)
    space = discover_units(model, x[:1])
    assert space.excluded == ()
    streams = {g.root: g for g in space.groups if not g.root.endswith("block.3")}
    assert sorted(streams) == ["features.0.0", "features.2.1"]
    first = space.units[streams["features.0.0"].unit_ids[0]]
    # the stem's LayerNorm, each block's LayerNorm, and the downsampling LayerNorm
    assert sorted(n.layer for n in first.norms) == [
        "features.0.1",
        "features.1.0.block.2",
        "features.1.1.block.2",
        "features.2.0",
    ]
    assert verify_groups(model, space, x[:1]) == {}
    units = [u for g in space.groups for u in g.unit_ids[1::3]]
    pruned = prune_copy(model, space, units, x[:1])
    assert check_equivalence(model, pruned, space, units, x) < 1e-5
    with torch.no_grad():
        assert not torch.allclose(pruned(x), model(x), atol=1e-3)  # the removal changes something
    assert pruned.features[1][0].block[2].normalized_shape == (16 - len(range(1, 16, 3)),)
    assert space.params_after(units) == count_params(pruned)
    assert space.macs_after(units) == count_macs(pruned, x[:1])
    assert hook_count(model) == 0


def test_a_convnext_with_lstsq_compensation_prunes_to_what_is_masked():
    model = _convnext(1)
    x = torch.randn(24, 3, 32, 32)
    space = discover_units(model, x[:1])
    lstsq = measure_means(model, space, x, mode="lstsq", ridge=1e-3)
    units = [u for g in space.groups for u in g.unit_ids[::4]]
    pruned = prune_copy(model, space, units, x[:1], lstsq)
    assert check_equivalence(model, pruned, space, units, x[:4], compensation=lstsq) < 1e-4


def test_batched_and_open_base_interventions_recompute_the_norms_as_removed_does():
    model = _convnext(2)
    x = torch.randn(4, 3, 32, 32)
    space = discover_units(model, x[:1])
    stream = next(g for g in space.groups if g.root == "features.0.0")
    base, scored = list(stream.unit_ids[:2]), list(stream.unit_ids[2:5])
    with torch.no_grad():
        expected = []
        for unit in scored:
            with removed(model, space, [*base, unit]):
                expected.append(model(x))
        with removed_each(model, space, base, scored):
            stacked = model(torch.cat([x] * len(scored)))
        torch.testing.assert_close(stacked, torch.cat(expected), rtol=1e-5, atol=1e-5)
        with BaseRemoval(model, space, base, None) as open_base:
            for unit, out in zip(scored, expected, strict=True):
                with open_base.plus(unit):
                    assert torch.equal(model(x), out)
    assert hook_count(model) == 0


def test_causal_effects_through_recomputed_norms_are_the_same_with_prefix_reuse():
    model = _convnext(3)
    x = torch.randn(12, 3, 32, 32)
    labels = model(x).argmax(1)
    space = discover_units(model, x[:1])
    units = [g.unit_ids[1] for g in space.groups]
    plain = causal_effects(model, space, x, labels, units=units, prefix_reuse=False)
    reused = causal_effects(model, space, x, labels, units=units, prefix_reuse=True)
    np.testing.assert_allclose(reused.relative_effects, plain.relative_effects, atol=1e-9)
    assert np.abs(plain.relative_effects).max() > 1e-4


def test_a_one_group_groupnorm_is_recomputed_and_a_two_group_one_excludes_with_the_reason():
    def net(groups: int) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            _affine(nn.GroupNorm(groups, 8), 1),
            nn.ReLU(),
            nn.Conv2d(8, 6, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 4),
        )
        return model.eval()

    x = torch.randn(3, 3, 10, 10)
    model = net(1)
    space = discover_units(model, x[:1])
    group = next(g for g in space.groups if g.root == "0")
    assert [n.layer for n in space.units[group.unit_ids[0]].norms] == ["1"]
    units = list(group.unit_ids[::3])
    pruned = prune_copy(model, space, units, x[:1])
    assert check_equivalence(model, pruned, space, units, x) < 1e-5
    space = discover_units(net(2), x[:1])
    (excluded,) = [g for g in space.excluded if g.root == "0"]
    assert "2 groups" in excluded.reason and "unequal size" in excluded.reason


def test_convnext_v2_global_response_norms_are_recomputed_and_every_group_prunes():
    """timm's ConvNeXt-V2: LayerNorms on the residual streams, a GRN on every MLP's hidden
    neurons (channels last). Before, every group was excluded; now none is, and removing any
    mix of units equals masking them, with exact accounting."""
    import timm

    from cswap.norms import is_grn

    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", num_classes=10).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "grn" in name or "norm" in name:  # GRN starts at zero: make it matter
                parameter.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)
    x = torch.randn(2, 3, 32, 32)
    space = discover_units(model, x[:1])
    assert space.excluded == ()
    hidden = space.units[space.groups[0].unit_ids[0]]
    assert space.groups[0].root == "stages.0.blocks.0.mlp.fc1"
    assert [n.layer for n in hidden.norms] == ["stages.0.blocks.0.mlp.grn"]
    assert is_grn(model.get_submodule("stages.0.blocks.0.mlp.grn"))
    assert verify_groups(model, space, x[:1]) == {}
    units = [u for g in space.groups for u in g.unit_ids[1::3]]
    pruned = prune_copy(model, space, units, x[:1])
    assert check_equivalence(model, pruned, space, units, x) < 1e-5
    assert pruned.stages[0].blocks[0].mlp.grn.weight.shape == (160 - len(range(1, 160, 3)),)
    assert space.params_after(units) == count_params(pruned)
    assert space.macs_after(units) == count_macs(pruned, x[:1])


def test_units_that_renormalize_get_no_closed_form_estimate_and_are_scored_exactly():
    """The closed-form estimate is the consumers' refit error; removing a residual channel also
    renormalizes every other channel at each LayerNorm, which it does not see."""
    from cswap.estimate import reconstruction_costs

    model = _convnext(4)
    x = torch.randn(24, 3, 32, 32)
    space = discover_units(model, x[:1])
    lstsq = measure_means(model, space, x, mode="lstsq", ridge=1e-3)
    units = [unit.id for unit in space.units]
    costs = reconstruction_costs(space, lstsq.with_base(model, space, []), units)
    renormalizing = {unit.id for unit in space.units if unit.norms}
    assert renormalizing and not renormalizing & set(costs)
    assert set(costs) == set(units) - renormalizing
