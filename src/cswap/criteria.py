"""Non-causal ranking criteria over the same unit space (the baselines' side of the comparison).

Every criterion gives one score per unit (higher = more important) and ranks the remaining units
from least to most important, so the progressive schedule (or a one-shot cut) can use it exactly
as it uses C-SWAP's causal ranking. Scores are computed from the slices a unit owns in every layer
of its group (producer rows, norm entries, consumer columns), like Torch-Pruning's group
importance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cswap.categorize import Ranking
from cswap.units import UnitSpace

CRITERIA = ("l1", "l2", "random")


def _slice_values(module: nn.Module, side: str, indices: Sequence[int]) -> list[torch.Tensor]:
    index = torch.tensor(list(indices), dtype=torch.long)
    values = []
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        dim = 0 if side == "out" or weight.dim() == 1 else 1
        values.append(weight.detach().index_select(dim, index.to(weight.device)))
    bias = getattr(module, "bias", None)
    if side == "out" and isinstance(bias, torch.Tensor):
        values.append(bias.detach().index_select(0, index.to(bias.device)))
    return values


def magnitude_scores(model: nn.Module, space: UnitSpace, p: int = 1) -> np.ndarray:
    """Group L1 (p=1) or L2 (p=2) norm of every parameter slice a unit owns."""
    modules = dict(model.named_modules())
    scores = np.zeros(len(space))
    for unit in space.units:
        total = 0.0
        for layer, side, indices in unit.slices:
            for values in _slice_values(modules[layer], side, indices):
                total += float(values.abs().pow(p).sum())
        scores[unit.id] = total ** (1.0 / p)
    return scores


def random_scores(space: UnitSpace, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(len(space)).astype(np.float64)


def criterion_scores(name: str, model: nn.Module, space: UnitSpace, *, seed: int = 0) -> np.ndarray:
    if name == "l1":
        return magnitude_scores(model, space, 1)
    if name == "l2":
        return magnitude_scores(model, space, 2)
    if name == "random":
        return random_scores(space, seed)
    raise ValueError(f"Unknown criterion {name!r}; known: {', '.join(CRITERIA)}.")


def ranking_from_scores(scores: np.ndarray, removed: Sequence[int] = ()) -> Ranking:
    """Remaining units, least important first (ties broken by unit id)."""
    gone = set(removed)
    order = sorted((u for u in range(len(scores)) if u not in gone), key=lambda u: (scores[u], u))
    return Ranking(order=tuple(order), scores={u: float(scores[u]) for u in order})
