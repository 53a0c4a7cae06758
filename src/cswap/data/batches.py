"""Batches of a dataset, kept in memory when small (re-read through a DataLoader when not)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of preprocessed images kept in memory


class Batches:
    """Re-iterable (images, labels) batches of a map-style dataset, in dataset order."""

    def __init__(
        self, dataset: Dataset, batch_size: int, *, memory_budget: int = DEFAULT_MEMORY_BUDGET
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("Batches of an empty dataset.")
        self.dataset = dataset
        self.batch_size = batch_size
        first, _ = dataset[0]
        self.sample_shape = tuple(first.shape)
        self._cached: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if first.numel() * first.element_size() * len(dataset) <= memory_budget:
            self._cached = list(self._load())

    def _load(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)
        for images, labels in loader:
            yield images, torch.as_tensor(labels, dtype=torch.long)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._cached) if self._cached is not None else self._load()

    def __len__(self) -> int:
        return len(self.dataset)
