"""Refits of one removal on the inputs the pruned model itself computes (error correction).

The lstsq compensation (``cswap.compensation``) refits each consumer to reproduce its original
outputs from its original inputs: it needs only the unpruned model's Gram matrices, which is what
makes scoring thousands of removals cheap. For the one removal a run keeps, the consumer's inputs
are not the original ones: every layer upstream has lost units too, and its refit is not exact.
Refitting on those inputs instead corrects the error that reaches the layer (the reconstruction
of He et al. 2017, "Channel pruning for accelerating very deep neural networks", section 3.1):
for the consumers in the order they run, with x' its input in the model pruned and refitted so
far (zero at the removed indices), x its input in the unpruned model and theta0 its weights
(with the bias), theta_K minimises

    E |x'_K theta_K - x theta0|^2 + l |theta_K - theta0_K|^2,
    theta_K = (G'_KK + l I)^-1 (C_K: theta0 + l theta0_K),   G' = E[x'~ x'~^T], C = E[x'~ x~^T]

over the calibration images (x~: the unfolded input with a ones column, as the Gram matrices).
A layer mean-compensated for too few rows keeps its weights and gets the shift that restores its
mean output: (E[x~] - E[x'~]) theta0. The result is a ``Compensation`` whose ``refit`` and
``delta`` return these values for exactly this removal (other removals are refitted as before),
so masking, validation and the physical fold all compute the same corrected model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn

from cswap.compensation import (
    Compensation,
    consumer_indices,
    input_rows,
    kept_features,
    layer_theta,
)
from cswap.intervene import removed
from cswap.units import UnitSpace


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def propagated(
    model: nn.Module,
    space: UnitSpace,
    units: Iterable[int],
    compensation: Compensation,
    images: torch.Tensor,
    *,
    batch_size: int = 64,
    device: str = "cpu",
) -> Compensation:
    """``compensation`` with the consumers of ``units`` refitted on the pruned model's own
    inputs, layer by layer in the order they run (see the module docstring)."""
    units = tuple(sorted(set(units)))
    inputs = consumer_indices(space, units)
    if not units or not inputs:
        return compensation
    modules = dict(model.named_modules())
    fitted: dict[str, tuple[frozenset[int], torch.Tensor, torch.Tensor]] = {}
    shifts: dict[str, tuple[frozenset[int], torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        for layer in _execution_order(model, list(inputs), images[:1].to(device)):
            indices = frozenset(inputs[layer][1])
            current = replace(compensation, fitted=dict(fitted), shifts=dict(shifts))
            module = modules[layer]
            gram, cross, mean_gap = _paired_moments(
                model, space, units, current, module, images, batch_size, device
            )
            theta = layer_theta(module)
            if compensation.refits(layer):
                fit = _solve(compensation, layer, module, theta, gram, cross, indices)
                fitted[layer] = (indices, *fit)
            else:
                shifts[layer] = (indices, mean_gap @ theta)
    finally:
        model.train(was_training)
    return replace(compensation, fitted=fitted, shifts=shifts)


def _execution_order(model: nn.Module, layers: list[str], example: torch.Tensor) -> list[str]:
    """``layers`` in the order their first call runs on ``example``."""
    modules = dict(model.named_modules())
    seen: list[str] = []

    def recorder(name: str):
        def hook(_module, _inputs) -> None:
            if name not in seen:
                seen.append(name)

        return hook

    handles = [modules[name].register_forward_pre_hook(recorder(name)) for name in layers]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return seen + [name for name in layers if name not in seen]


def _capture(model: nn.Module, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``module``'s input on ``batch`` (after any hook already on it), stopping there."""
    captured: list[torch.Tensor] = []

    def hook(_module, inputs) -> None:
        captured.append(inputs[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        model(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def _paired_moments(model, space, units, current, module, images, batch_size, device):
    """(G', C, mean gap) of ``module``'s inputs over ``images``: pruned (x', zero at the
    removed inputs) against unpruned (x), with the ones column."""
    gram = cross = gap = None
    rows = 0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        original = input_rows(module, _capture(model, module, batch))
        with removed(model, space, units, current):
            pruned = input_rows(module, _capture(model, module, batch))
        g, c, d = pruned.T @ pruned, pruned.T @ original, (original - pruned).sum(0)
        gram, cross, gap = (g, c, d) if gram is None else (gram + g, cross + c, gap + d)
        rows += len(pruned)
    return (gram / rows).cpu(), (cross / rows).cpu(), (gap / rows).cpu()


def _solve(compensation, layer, module, theta, gram, cross, indices):
    """(weight, bias) minimising the propagated objective with inputs ``indices`` removed."""
    shape = module.weight.shape
    kept = kept_features(shape[1], (theta.shape[0] - 1) // shape[1], indices)
    scale = compensation.scale(layer)
    system = gram.index_select(0, kept).index_select(1, kept)
    system = system + scale * torch.eye(len(kept), dtype=torch.float64)
    rhs = cross.index_select(0, kept) @ theta + scale * theta.index_select(0, kept)
    full = torch.zeros_like(theta)
    full[kept] = torch.linalg.solve(system, rhs)
    return full[:-1].T.reshape(shape), full[-1]
