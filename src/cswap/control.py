"""The control variate of staged exact scoring (cswap.banded): fewer images per verdict.

A unit in the band is first scored exactly on a few images, and decided on their mean KL when
that mean is far enough from the cut. Its per-image KL varies a lot from image to image, so the
mean of 8 images is often not precise enough, and the unit is scored on more. A cheap per-image
proxy of the same KL, known on *every* calibration image, removes much of that variation:

    X_u(x) = 1/2 sum_c p_c(x) (d log p_c(x) / dh . delta_u(x))^2

the KL of unit u's removal to second order in the change delta_u(x) it makes to its consumers'
inputs (to the channel's mean with compensation, to 0 without), in the Fisher metric of the
model's own predictive distribution (every class when few, else labels drawn from p(x), as
``output_sensitivity`` does). One forward and one backward pass per draw and batch gives it for
every unit at once.

X_u is the second-order expansion of the very KL that is scored when the removal moves the
unit's inputs to their means (mean compensation, or a consumer that lstsq mean-compensates for
too few calibration rows) or to 0 (no compensation): per image it tracks the exact KL closely
(correlation 1.00 on zoo:vgg's classifier neurons). A consumer refitted by lstsq absorbs most of
the removal, so the mean fold's X is then another intervention's: on zoo:vgg's convolutions its
correlation with the refitted removal's KL is 0.2-0.9 and the best coefficient varies tenfold
within a layer (a pooled one made the subsample means worse). Only units whose every consumer
is mean-folded (or uncompensated) get the control variate.

The estimate of unit u's mean KL over the N calibration images from the images S it was scored on:

    m_u = mean_S(KL_u) - c_u (mean_S(X_u) - mean_N(X_u)),  c_u in {0, 1}

**Guarantee.** For a coefficient c_u fixed independently of S, and any draw of S in which every
image has the same chance to be drawn (our stratified systematic samples), E[m_u] is exactly the
mean KL over the N images: the correction has expectation 0 whatever c_u is. Its variance is
Var(KL - c X) / |S| (finite-population corrected): with c = 1, the variance of the expansion's
per-image error instead of the KL's. c_u = 1 for the units above, set to 0 for a whole group when
its pilot units (scored on every first-stage image before the band) show no narrowing (the
summed variance of KL - X not below that of KL); the pilots are other units, so c_u depends on
the images only through that check. The standard error that decides whether a unit goes on is
that of the corrected per-image values; ``cswap bench-speed`` measures the decisions against
exact scoring on every image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cswap.criteria import consumer_inputs, reduce_captures
from cswap.estimate import label_draws
from cswap.units import UnitSpace


@dataclass(frozen=True)
class ControlVariate:
    """Per unit: the proxy X on every calibration image (``proxy`` rows by ``index``) and the
    coefficient c (0 where none was fitted)."""

    index: dict[int, int]
    proxy: np.ndarray  # (units, images)
    coefficient: dict[int, float]

    def adjusted(self, unit_ids: Sequence[int], kl: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Per-image KL - c (X - mean X over every image), for the rows ``unit_ids`` of ``kl``
        measured on the calibration images ``columns``: the same mean in expectation, lower
        variance where X follows the KL. Units without a proxy are returned unchanged."""
        adjusted = np.array(kl, dtype=np.float64, copy=True)
        for row, unit in enumerate(unit_ids):
            c = self.coefficient.get(unit, 0.0)
            if unit not in self.index or c == 0.0:
                continue
            x = self.proxy[self.index[unit]]
            adjusted[row] -= c * (x[columns] - x.mean())
        return adjusted


def second_order_proxy(
    model: nn.Module,
    space: UnitSpace,
    units: Sequence[int],
    images: torch.Tensor,
    *,
    means: dict[str, torch.Tensor] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    draws: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """(len(units), images): X_u(x) for each unit and image (module docstring); ``means``: per
    consumer layer, the input means a compensated removal moves the unit's inputs to (None:
    to 0). ``model`` as it computes now (run it inside ``cswap.intervene.removed`` for the
    current removal)."""
    columns = [[] for _ in units]
    index = _unit_index(space, units)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    store: dict[str, list] = {}

    def delta_times_grad(layer: str, entry: dict) -> torch.Tensor:
        x = entry["x"]
        if means is not None and layer in means:
            shape = [1] * x.dim()
            shape[entry["dim"]] = -1
            x = x - means[layer].to(x).view(shape)
        return x * entry["grad"]

    try:
        with torch.enable_grad(), consumer_inputs(model, space, store):
            for start in range(0, len(images), batch_size):
                store.clear()
                batch = images[start : start + batch_size].to(device).requires_grad_(True)
                log_p = torch.log_softmax(model(batch), dim=1)
                total = torch.zeros(len(batch), len(units), dtype=torch.float64)
                for weight, chosen in label_draws(log_p.detach().exp(), draws, generator):
                    picked = log_p.gather(1, chosen.view(-1, 1)).sum()
                    torch.autograd.grad(picked, batch, retain_graph=True)  # fills the captures
                    per_layer = reduce_captures(store, len(batch), delta_times_grad)
                    linear = _sum_per_unit(per_layer, index, len(batch), len(units))
                    total += weight.double().cpu().view(-1, 1) * linear**2
                for column, values in zip(columns, (total / 2).T, strict=True):
                    column.append(values.numpy())
    finally:
        store.clear()
        model.train(was_training)
    return np.stack([np.concatenate(parts) for parts in columns]) if units else np.zeros((0, 0))


def _unit_index(space: UnitSpace, units: Sequence[int]) -> dict[str, tuple]:
    """Per consumer layer: (position of the unit in ``units``, input index) pairs as tensors."""
    pairs: dict[str, tuple[list[int], list[int]]] = {}
    for position, unit in enumerate(units):
        for target in space.units[unit].targets:
            at, channels = pairs.setdefault(target.layer, ([], []))
            at.extend([position] * len(target.indices))
            channels.extend(target.indices)
    return {layer: (torch.tensor(at), torch.tensor(ch)) for layer, (at, ch) in pairs.items()}


def _sum_per_unit(per_layer, index, samples: int, count: int) -> torch.Tensor:
    """(samples, units): each unit's sum over its consumer inputs."""
    values = torch.zeros(samples, count, dtype=torch.float64)
    for layer, (at, channels) in index.items():
        if layer in per_layer:
            values.index_add_(1, at, per_layer[layer][:, channels])
    return values


def fit_coefficients(
    space: UnitSpace,
    index: dict[int, int],
    proxy: np.ndarray,
    pilot_ids: Sequence[int],
    pilot_kl: np.ndarray,
    columns: np.ndarray,
) -> dict[int, float]:
    """Per unit of ``index`` (units whose removal the proxy expands): 1, unless the pilot units
    of its group (rows of ``pilot_kl``, measured on the images ``columns``) show that
    subtracting the proxy does not narrow their per-image KL (sum over them of the variance of
    KL - X not below that of KL); then 0."""
    sums: dict[int, list[float]] = {}
    for row, unit in enumerate(pilot_ids):
        if unit not in index:
            continue
        y = pilot_kl[row]
        residual = y - proxy[index[unit]][columns]
        entry = sums.setdefault(space.units[unit].group, [0.0, 0.0])
        entry[0] += float(residual.var())
        entry[1] += float(y.var())
    narrower = {group: with_proxy < without for group, (with_proxy, without) in sums.items()}
    return {unit: float(narrower.get(space.units[unit].group, True)) for unit in index}
