"""Non-causal ranking criteria over the same unit space (the baselines' side of the comparison).

Every criterion gives one score per unit (higher = more important) and ranks the remaining units
from least to most important, so the progressive schedule or a one-shot cut uses it exactly as it
uses C-SWAP's causal ranking. All of them see the very same units (coupled channel groups, MLP
neurons, attention heads), so a comparison measures the criterion and nothing else.

- ``l1`` / ``l2``: norm of every parameter slice a unit owns in every layer of its group (producer
  rows, norm entries, consumer columns), like Torch-Pruning's group magnitude importance.
- ``random``: a seeded permutation.
- ``taylor``: first-order estimate of the loss change when the unit is removed, per sample:
  ``|sum over the unit's consumer inputs of x * dL/dx|`` (Molchanov et al. 2017, on activations:
  removing a unit is zeroing exactly those inputs), averaged over the calibration samples;
  L = cross-entropy with the calibration labels.
- ``bn_scale``: ``|gamma|`` of the unit's BatchNorm entries (network slimming); units without a
  BatchNorm (Linear neurons, heads) score +inf and are never chosen. CNNs only.
- ``fpgm``: distance of the unit's producer weights to the other units of its group (sum of
  Euclidean distances, He et al. 2019); the group's units nearest the geometric median are the
  most replaceable. Normalised by the group's mean so groups of different sizes compare.
- ``lrp``: LRP relevance reaching the unit, summed over the calibration samples ("Pruning by
  Explaining", Yeom et al. 2021), computed with Zennit's EpsilonPlusFlat composite (z+ rule for
  convolutions, epsilon for Linears, flat for the first layer; BatchNorm merged into a preceding
  convolution where the two sit in one Sequential) starting from the true class's logit. A unit's
  relevance is the sum over its consumer inputs. Not offered for ViTs: Zennit has no conservative
  rules for softmax attention and LayerNorm (AttnLRP), and plain gradients there would make the
  "relevance" a gradient x input heuristic under another name.

Global ranking. Raw scores are not comparable across layers (a first-layer filter with 9 weights
has a far smaller norm than a neuron with 4,096 inputs: ranked raw, global L1 removes every
filter of the first convolution but one and the model collapses to chance). As Torch-Pruning does
by default (its ``mean`` group normaliser), every criterion except ``random`` divides a unit's
score by the mean absolute score of its group before the global ranking.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from cswap.categorize import Ranking
from cswap.errors import CswapError
from cswap.units import UnitSpace

CRITERIA = ("l1", "l2", "taylor", "bn_scale", "fpgm", "lrp", "random")
NEEDS_DATA = ("taylor", "lrp")


def _index_sums(module: nn.Module, side: str, p: int) -> np.ndarray:
    """Per index of the layer's ``side`` dimension: the sum of |value|^p of the weight slice
    (and, on the out side, the bias entry) that index owns."""
    weight = getattr(module, "weight", None)
    total = None
    if isinstance(weight, torch.Tensor):
        dim = 0 if side == "out" or weight.dim() == 1 else 1
        others = tuple(d for d in range(weight.dim()) if d != dim)
        # one temporary of the weight's own dtype, summed in float64 (no double copy of a
        # large weight: on ViT-L those copies held a gigabyte)
        values = weight.detach().abs().pow(p)
        total = values.sum(others, dtype=torch.float64) if others else values.double()
    bias = getattr(module, "bias", None)
    if side == "out" and isinstance(bias, torch.Tensor):
        entries = bias.detach().double().abs().pow(p)
        total = entries if total is None else total + entries
    return np.zeros(0) if total is None else total.cpu().numpy()


def magnitude_scores(model: nn.Module, space: UnitSpace, p: int = 1) -> np.ndarray:
    """Group L1 (p=1) or L2 (p=2) norm of every parameter slice a unit owns."""
    modules = dict(model.named_modules())
    sums: dict[tuple[str, str], np.ndarray] = {}
    scores = np.zeros(len(space))
    for unit in space.units:
        total = 0.0
        for layer, side, indices in unit.slices:
            if (layer, side) not in sums:
                sums[layer, side] = _index_sums(modules[layer], side, p)
            if len(sums[layer, side]):
                total += float(sums[layer, side][list(indices)].sum())
        scores[unit.id] = total ** (1.0 / p)
    return scores


def random_scores(space: UnitSpace, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(len(space)).astype(np.float64)


def bn_scale_scores(model: nn.Module, space: UnitSpace) -> np.ndarray:
    """Sum of |gamma| over the unit's BatchNorm entries; +inf for units without one."""
    modules = dict(model.named_modules())
    scores = np.full(len(space), np.inf)
    for unit in space.units:
        gammas = [
            modules[layer].weight.detach()[list(indices)].abs().sum()
            for layer, side, indices in unit.slices
            if side == "out"
            and isinstance(modules[layer], nn.modules.batchnorm._BatchNorm)
            and modules[layer].weight is not None
        ]
        if gammas:
            scores[unit.id] = float(sum(gammas))
    if np.isinf(scores).all():
        raise CswapError(
            "bn_scale ranks units by their BatchNorm scale, but no unit of this model has one.",
            "use another method (l1, taylor, fpgm, cswap, ...).",
        )
    return scores


def fpgm_scores(model: nn.Module, space: UnitSpace) -> np.ndarray:
    """Sum of distances to the group's other units (producer weights), over the group's mean."""
    modules = dict(model.named_modules())
    scores = np.zeros(len(space))
    for group in space.groups:
        vectors = []
        for unit_id in group.unit_ids:
            parts = [
                modules[layer].weight.detach().index_select(0, torch.tensor(list(indices)))
                for layer, side, indices in space.units[unit_id].slices
                if side == "out"
                and isinstance(getattr(modules[layer], "weight", None), torch.Tensor)
                and modules[layer].weight.dim() >= 2
            ]
            vectors.append(torch.cat([part.flatten() for part in parts]).double())
        matrix = torch.stack(vectors)
        distances = torch.cdist(matrix, matrix).sum(1).numpy()
        mean = distances.mean()
        scores[list(group.unit_ids)] = distances / mean if mean > 0 else distances
    return scores


@contextmanager
def consumer_inputs(model: nn.Module, space: UnitSpace, store: dict[str, list]) -> Iterator[None]:
    """Per consumer layer: its own copy of the input (so that a tensor read by several layers
    gets each layer's share of the gradient) and, after backward, the gradient at that copy, both
    summed over every axis but the batch and the unit axis."""
    modules = dict(model.named_modules())
    dims = {target.layer: target.dim for unit in space.units for target in unit.targets}

    def recorder(layer: str, dim: int):
        def hook(_module: nn.Module, inputs: tuple) -> tuple:
            x = inputs[0].clone()
            entry = {"x": x.detach(), "dim": dim}
            store.setdefault(layer, []).append(entry)
            if x.requires_grad:
                x.register_hook(lambda grad: entry.__setitem__("grad", grad.detach()))
            return (x, *inputs[1:])

        return hook

    handles = [
        modules[layer].register_forward_pre_hook(recorder(layer, dim), prepend=True)
        for layer, dim in dims.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def per_sample(entry: dict, value: torch.Tensor) -> torch.Tensor:
    """(batch, size of the unit axis): summed over every other axis (positions, tokens)."""
    dim = entry["dim"] % value.dim()
    moved = value.movedim(dim, -1)
    return moved.reshape(moved.shape[0], -1, moved.shape[-1]).sum(1).double().cpu()


def reduce_captures(store: dict[str, list], samples: int, value=None) -> dict[str, torch.Tensor]:
    """Per consumer layer: (samples, unit axis) sums of ``value(layer, entry)`` over every call
    of the layer, from what ``consumer_inputs`` captured; ``value`` returning None means x * grad
    (calls that got no gradient count as zero)."""
    per_layer = {}
    for layer, entries in store.items():
        total = torch.zeros(samples, entries[0]["x"].shape[entries[0]["dim"]], dtype=torch.float64)
        for entry in entries:
            if entry.get("grad") is None:
                continue
            chosen = value(layer, entry) if value is not None else None
            total = total + per_sample(
                entry, entry["x"] * entry["grad"] if chosen is None else chosen
            )
        per_layer[layer] = total
    return per_layer


def unit_values(space: UnitSpace, per_layer: dict[str, torch.Tensor]) -> np.ndarray:
    """(samples, units): the sum over each unit's consumer inputs."""
    samples = next(iter(per_layer.values())).shape[0]
    values = torch.zeros(samples, len(space), dtype=torch.float64)
    for unit in space.units:
        for target in unit.targets:
            values[:, unit.id] += per_layer[target.layer][:, list(target.indices)].sum(1)
    return values.numpy()


def _gradient_pass(
    model: nn.Module,
    space: UnitSpace,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    relevance: bool,
    batch_size: int,
    device: str,
) -> np.ndarray:
    """(samples, units) of x * dL/dx (Taylor) or of LRP relevance at each unit's consumer inputs."""
    was_training = model.training
    model.eval()
    rows = []
    composite = None
    if relevance:
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat

        composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device).requires_grad_(True)
            target = labels[start : start + batch_size].to(device)
            store: dict[str, list] = {}
            with torch.enable_grad(), consumer_inputs(model, space, store):
                if composite is not None:
                    with composite.context(model) as modified:
                        logits = modified(batch)
                        chosen = torch.zeros_like(logits)
                        chosen.scatter_(1, target.view(-1, 1), 1.0)
                        # relevance starts as the true class's logit
                        torch.autograd.backward(logits, grad_tensors=chosen * logits.detach())
                else:
                    logits = model(batch)
                    loss = nn.functional.cross_entropy(logits, target, reduction="sum")
                    loss.backward()
            per_layer = reduce_captures(
                store, len(batch), lambda _layer, entry: entry["grad"] if relevance else None
            )
            rows.append(unit_values(space, per_layer))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return np.concatenate(rows)


def taylor_scores(
    model, space, images, labels, *, batch_size: int = 256, device: str = "cpu"
) -> np.ndarray:
    values = _gradient_pass(
        model, space, images, labels, relevance=False, batch_size=batch_size, device=device
    )
    return np.abs(values).mean(0)


def lrp_scores(
    model, space, images, labels, *, batch_size: int = 256, device: str = "cpu"
) -> np.ndarray:
    if any(unit.kind == "head" for unit in space.units) or any(
        isinstance(module, nn.LayerNorm) for module in model.modules()
    ):
        raise CswapError(
            "lrp is not offered for Vision Transformers: Zennit has no conservative rules for "
            "softmax attention and LayerNorm.",
            "use taylor, l1, fpgm or cswap on this model.",
        )
    values = _gradient_pass(
        model, space, images, labels, relevance=True, batch_size=batch_size, device=device
    )
    return values.sum(0)


def normalize_per_group(scores: np.ndarray, space: UnitSpace) -> np.ndarray:
    """Each score over the mean |score| of its group (infinite scores stay infinite)."""
    normalized = scores.astype(np.float64).copy()
    for group in space.groups:
        ids = np.asarray(group.unit_ids)
        values = normalized[ids]
        finite = np.isfinite(values)
        scale = np.abs(values[finite]).mean() if finite.any() else 0.0
        if scale > 0:
            normalized[ids[finite]] = values[finite] / scale
    return normalized


def criterion_scores(
    name: str, model: nn.Module, space: UnitSpace, *, seed: int = 0, **data
) -> np.ndarray:
    """One score per unit (higher = more important) for criterion ``name``, normalised per group
    (``raw_scores`` without the normalisation). ``data``: images, labels, batch_size, device."""
    if name == "random":
        return random_scores(space, seed)
    return normalize_per_group(raw_scores(name, model, space, **data), space)


def raw_scores(
    name: str,
    model: nn.Module,
    space: UnitSpace,
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> np.ndarray:
    """The criterion's own score per unit (not comparable across groups)."""
    if name in NEEDS_DATA and (images is None or labels is None or len(images) == 0):
        raise CswapError(f"The {name} criterion needs calibration images and labels.", "pass them.")
    if name == "l1":
        return magnitude_scores(model, space, 1)
    if name == "l2":
        return magnitude_scores(model, space, 2)
    if name == "bn_scale":
        return bn_scale_scores(model, space)
    if name == "fpgm":
        return fpgm_scores(model, space)
    if name == "taylor":
        return taylor_scores(model, space, images, labels, batch_size=batch_size, device=device)
    if name == "lrp":
        return lrp_scores(model, space, images, labels, batch_size=batch_size, device=device)
    raise CswapError(f"Unknown criterion {name!r}.", f"use one of {', '.join(CRITERIA)}.")


def ranking_from_scores(scores: np.ndarray, removed: Sequence[int] = ()) -> Ranking:
    """Remaining units, least important first (ties broken by unit id)."""
    gone = set(removed)
    order = sorted((u for u in range(len(scores)) if u not in gone), key=lambda u: (scores[u], u))
    return Ranking(order=tuple(order), scores={u: float(scores[u]) for u in order})
