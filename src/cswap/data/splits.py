"""Seeded, documented splits.

Fashion-MNIST: a seeded permutation of the 60,000 training images; the first 55,000 train the zoo,
the last 5,000 are the *held-out pool* from which calibration and validation are drawn (disjoint).
The 10,000-image test split is used only for final numbers, never for a decision.

ImageFolder: per class, a seeded shuffle; the last ``test_fraction`` of each class (optional) is the
test split, the rest is the pool. Calibration is drawn from the pool, validation is the rest of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

FASHION_MNIST_TRAIN_SIZE = 55_000
FASHION_MNIST_HELDOUT_SIZE = 5_000
FASHION_MNIST_SPLIT_SEED = 0


@dataclass(frozen=True)
class TrainHeldoutSplit:
    """Indices into the Fashion-MNIST training split."""

    seed: int
    train: np.ndarray
    heldout: np.ndarray

    def fingerprint(self) -> dict:
        """What a manifest records: the seed, the held-out indices and a hash of the train ones."""
        return {
            "seed": self.seed,
            "train_size": len(self.train),
            "train_sha256": indices_sha256(self.train),
            "heldout_indices": self.heldout.tolist(),
        }


def indices_sha256(indices: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(indices, dtype=np.int64)).tobytes()).hexdigest()


def fashion_mnist_split(seed: int = FASHION_MNIST_SPLIT_SEED) -> TrainHeldoutSplit:
    order = np.random.default_rng(seed).permutation(
        FASHION_MNIST_TRAIN_SIZE + FASHION_MNIST_HELDOUT_SIZE
    )
    return TrainHeldoutSplit(
        seed=seed,
        train=np.sort(order[:FASHION_MNIST_TRAIN_SIZE]),
        heldout=np.sort(order[FASHION_MNIST_TRAIN_SIZE:]),
    )


def stratified_pool_test_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test) indices: per class, a seeded shuffle, the last ``test_fraction`` to test."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    rng = np.random.default_rng(seed)
    pool, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_test = round(test_fraction * len(members))
        pool.append(members[: len(members) - n_test])
        test.append(members[len(members) - n_test :])
    return np.sort(np.concatenate(pool)), np.sort(np.concatenate(test))
