"""Measurements every report shares: parameters, MACs, CPU latency and accuracy.

MACs are counted at the aten level with ``torch.utils.flop_counter``: module-level counters
(Torch-Pruning's, thop, ptflops) undercount convolutions whose module overrides ``forward``.
PyTorch ships no formula for the CPU fused attention kernel, so one is registered here; without it
a ViT's attention would count zero and head removal would not show in MACs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils import flop_counter

_CPU_SDPA_OPS = [
    getattr(torch.ops.aten, name)
    for name in ("_scaled_dot_product_flash_attention_for_cpu",)
    if hasattr(torch.ops.aten, name)
]


def _register_cpu_attention_formula() -> None:
    registry = flop_counter.flop_registry
    missing = [op for op in _CPU_SDPA_OPS if op not in registry and op.default not in registry]
    if not missing:
        return

    @flop_counter.register_flop_formula(missing)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_attention_formula()


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (batch size included).

    The flop counter reports 2 FLOPs per multiply-accumulate for matmuls, convolutions and
    attention, so MACs = FLOPs / 2.
    """
    was_training = model.training
    model.eval()
    try:
        counter = flop_counter.FlopCounterMode(display=False)
        with counter:
            model(example_input)
        return counter.get_total_flops() // 2
    finally:
        model.train(was_training)


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = 1,
) -> float:
    """Median wall time in milliseconds of one forward pass on ``example_input``.

    Runs on the tensor's device; ``threads`` fixes torch's intra-op threads for the measurement
    (restored afterwards) so numbers from different runs compare.
    """
    previous_threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        synchronize = (
            torch.cuda.synchronize if example_input.device.type == "cuda" else (lambda: None)
        )
        for _ in range(warmup):
            model(example_input)
        synchronize()
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(example_input)
            synchronize()
            timings.append((time.perf_counter() - start) * 1000.0)
        return statistics.median(timings)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions and labels over ``batches`` of (images, labels), on the CPU."""
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    try:
        for images, batch_labels in batches:
            logits = model(images.to(device))
            predictions.append(logits.argmax(dim=1).cpu())
            labels.append(torch.as_tensor(batch_labels).cpu())
    finally:
        model.train(was_training)
    return torch.cat(predictions), torch.cat(labels)


def accuracy(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: str = "cpu"
) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    predictions, labels = predict(model, batches, device)
    if len(labels) == 0:
        raise ValueError("accuracy() got no samples.")
    return float((predictions == labels).float().mean())


@dataclass(frozen=True)
class PairedLatency:
    """Two models timed in alternation on the same input and threads (ms per image).

    ``ratio`` is the median of the per-round ratios after / before: drift of the machine (other
    jobs, frequency scaling) hits both models of a round alike and cancels in it.
    """

    batch: int
    threads: int
    rounds: int
    before_ms: float  # median per image
    after_ms: float
    before_quartiles: tuple[float, float]
    after_quartiles: tuple[float, float]
    ratio: float  # after / before, median over rounds
    ratio_quartiles: tuple[float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0])
    q = statistics.quantiles(values, n=4, method="inclusive")
    return (q[0], q[2])


def paired_latency(
    before: nn.Module,
    after: nn.Module,
    example_input: torch.Tensor,
    *,
    batch: int = 1,
    threads: int = 1,
    budget_s: float = 6.0,
    min_rounds: int = 7,
    max_rounds: int = 40,
) -> PairedLatency:
    """Alternating timings of ``before`` and ``after`` on a batch of ``batch`` images.

    Each round times both models once (the order alternates between rounds); a timing repeats the
    forward pass until it lasts ~20 ms, so the timer's resolution never dominates. The number of
    rounds fits ``budget_s`` (within ``min_rounds`` .. ``max_rounds``).
    """
    images = example_input[:1].expand(batch, *example_input.shape[1:]).contiguous().cpu()
    models = [before.cpu().eval(), after.cpu().eval()]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for model in models:  # warm up: allocator, caches, lazy initialisation
                for _ in range(3):
                    model(images)
            single = max(_time(model, images, 1) for model in models)
            inner = max(1, round(0.02 / max(single, 1e-6)))
            rounds = int(min(max_rounds, max(min_rounds, budget_s / (2 * single * inner))))
            times: list[list[float]] = [[], []]
            for index in range(rounds):
                order = (0, 1) if index % 2 == 0 else (1, 0)
                for which in order:
                    elapsed = _time(models[which], images, inner)
                    times[which].append(elapsed * 1000.0 / batch)
    finally:
        torch.set_num_threads(previous_threads)
    ratios = [a / b for a, b in zip(times[1], times[0], strict=True)]
    return PairedLatency(
        batch=batch,
        threads=threads,
        rounds=rounds,
        before_ms=statistics.median(times[0]),
        after_ms=statistics.median(times[1]),
        before_quartiles=_quartiles(times[0]),
        after_quartiles=_quartiles(times[1]),
        ratio=statistics.median(ratios),
        ratio_quartiles=_quartiles(ratios),
    )


def _time(model: nn.Module, images: torch.Tensor, repeats: int) -> float:
    """Seconds per forward pass, averaged over ``repeats`` back-to-back passes."""
    start = time.perf_counter()
    for _ in range(repeats):
        model(images)
    return (time.perf_counter() - start) / repeats
