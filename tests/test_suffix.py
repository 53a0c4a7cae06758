"""Prefix reuse for a model torch.fx cannot trace: module-call replay against physical removal."""

import numpy as np
import torch
from torch import nn

from conftest import randomize_batchnorm
from cswap.intervene import hook_count
from cswap.scoring import causal_effects
from cswap.suffix import ModuleCallRunner, prefix_path, try_suffix_runner
from cswap.units import discover_units
from test_score import oracle_effects


class Block(nn.Module):
    """A residual block with its own forward: a branch on the input's shape (fx cannot trace
    it), one activation module called twice, an in-place residual add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(2 * channels)
        self.conv2 = nn.Conv2d(2 * channels, channels, 1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        if y.shape[-1] > 4:  # data-independent, but a Proxy in fx
            y = y * 0.5
        out = self.bn2(self.conv2(y))
        out += x
        return self.act(out)


class Pair(nn.Module):
    """A submodule returning a tuple: replay takes its children instead."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.left = nn.Conv2d(channels, channels, 1)
        self.right = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.left(x), self.right(x)


class CountingStem(nn.Conv2d):
    calls = 0

    def forward(self, x):
        CountingStem.calls += 1
        return super().forward(x)


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = CountingStem(1, 6, 3, padding=1)
        self.pair = Pair(6)
        self.blocks = nn.ModuleList([Block(6), Block(6)])
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = self.stem(x)
        x.relu_()  # the stem's output changed in place after it returned
        a, b = self.pair(x)
        x = a + b
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((2, 3)))


def _model() -> CustomNet:
    torch.manual_seed(0)
    return randomize_batchnorm(CustomNet()).double().eval()


def test_module_call_replay_is_exact_and_skips_the_prefix():
    model = _model()
    images = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    labels = torch.arange(7) % 10
    space = discover_units(model, images[:1])
    consumers = {t.layer for unit in space.units for t in unit.targets}
    runner = try_suffix_runner(model, consumers, images[:1])
    assert runner.kind == "module calls"  # fx fails on the shape branch
    assert prefix_path(model, consumers, images[:1]) == "module calls"
    assert "blocks.1.conv2" in runner.cut_index and "blocks.0.conv1" in runner.cut_index
    # a later block replays every call before it; the tuple-returning pair through its children
    plan = set(runner.plans["blocks.1.conv1"])
    assert {"stem", "pair.left", "pair.right", "blocks.0"} == plan

    oracle, base = oracle_effects(model, space, images, labels)
    naive = causal_effects(model, space, images, labels, prefix_reuse=False, batch_size=3)
    CountingStem.calls = 0
    fast = causal_effects(model, space, images, labels, prefix_reuse=True, batch_size=3)
    # fx's failed trace, the probe, then one full pass per batch: no unit's pass runs the stem
    assert CountingStem.calls == 2 + 3
    assert np.allclose(fast.relative_effects, oracle, rtol=1e-7, atol=1e-10)
    assert np.allclose(fast.baseline, base, rtol=1e-12)
    assert np.allclose(fast.relative_effects, naive.relative_effects, rtol=1e-9, atol=1e-12)
    # several units per pass: the replayed outputs are stacked once per unit like the input
    stacked = causal_effects(model, space, images, labels, batch_size=3, units_per_pass=4)
    assert np.allclose(stacked.relative_effects, oracle, rtol=1e-7, atol=1e-10)
    assert hook_count(model) == 0
    assert not any("forward" in vars(module) for module in model.modules())


def test_replay_of_an_output_changed_in_place_uses_a_copy():
    model = _model()
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    runner = ModuleCallRunner(model, {"blocks.1.conv1"}, images[:1])
    # the probe saw the in-place relu on the stem and the residual adds onto each bn2
    assert runner._in_place == {"stem", "blocks.0.bn2", "blocks.1.bn2"}
    with torch.no_grad():
        expected = model(images)
        first, caches = runner.full(images)
        cache = caches["blocks.1.conv1"]
        kept = cache["stem"].clone()
        for _ in range(2):  # a second replay would see a corrupted cache without the copy
            assert torch.equal(runner.run_from("blocks.1.conv1", cache), expected)
        assert torch.equal(cache["stem"], kept)
    assert torch.equal(first, expected)


def test_zoo_models_take_the_fx_path():
    from cswap.zoo.registry import ZOO
    from cswap.zoo.store import build

    model = build(ZOO["resnet20"]).eval()
    example = torch.randn(1, 1, 28, 28)
    space = discover_units(model, example)
    consumers = {t.layer for unit in space.units for t in unit.targets}
    assert prefix_path(model, consumers, example) == "fx graph"
