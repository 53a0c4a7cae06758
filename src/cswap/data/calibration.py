"""Calibration and validation sets drawn from a held-out pool, disjoint by construction.

Calibration: ``per_class`` samples of every class, seeded. The pool is shuffled once with the seed
and each class takes its first ``per_class`` eligible members in that order, so a larger
``per_class`` gives a superset of a smaller one. A class with fewer eligible samples contributes
all it has (recorded in ``short_classes``).

``correct_only`` (DEFAULT True) keeps only samples the unpruned model classifies correctly: the
causal score is relative to the true-class probability sigma(x), and on a misclassified sample
sigma(x) can be tiny, so r = (sigma* - sigma) / sigma explodes and one sample dominates xi. The
predecessor paper also used correctly classified samples only.

Label-free mode: the labels are the unpruned model's own top-1 predictions, for unlabeled images.
Class balance then follows the predictions: each *predicted* class gets up to ``per_class``
samples, classes the model never predicts get none, and a rarely predicted class may be short.
Validation accuracy in label-free mode is agreement with the unpruned model's top-1.

Validation: the rest of the pool (every sample, correct or not), or a seeded subset of
``validation_size`` of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cswap.errors import CswapError

log = logging.getLogger("cswap")


@dataclass(frozen=True)
class CalibrationSplit:
    """Indices into the pool dataset, with the labels the method uses for each of them."""

    calibration: np.ndarray
    calibration_labels: np.ndarray
    validation: np.ndarray
    validation_labels: np.ndarray
    per_class: int
    seed: int
    correct_only: bool
    label_free: bool
    short_classes: dict[int, int] = field(default_factory=dict)
    note: str | None = None  # why the calibration set holds one class only, when it does

    def summary(self) -> dict:
        return {
            "calibration_size": len(self.calibration),
            "validation_size": len(self.validation),
            "per_class": self.per_class,
            "seed": self.seed,
            "correct_only": self.correct_only,
            "label_free": self.label_free,
            "short_classes": {str(k): v for k, v in self.short_classes.items()},
            "note": self.note,
        }


class LabeledSubset(Dataset):
    """``dataset[indices[i]]`` with its label replaced by ``labels[i]``."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, labels: np.ndarray) -> None:
        if len(indices) != len(labels):
            raise ValueError("indices and labels differ in length.")
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.dataset[int(self.indices[index])]
        return image, int(self.labels[index])


@torch.no_grad()
def model_predictions(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    *,
    batch_size: int = 256,
    device: str = "cpu",
) -> np.ndarray:
    """Top-1 predictions of ``model`` on ``dataset[indices]``."""
    was_training = model.training
    model.eval()
    subset = LabeledSubset(dataset, indices, np.zeros(len(indices), dtype=np.int64))
    predictions = []
    try:
        for images, _ in DataLoader(subset, batch_size=batch_size):
            predictions.append(model(images.to(device)).argmax(dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)


def draw_calibration(
    pool: np.ndarray,
    labels: np.ndarray | None,
    *,
    per_class: int = 50,
    seed: int = 0,
    predictions: np.ndarray | None = None,
    correct_only: bool = True,
    label_free: bool = False,
    validation_size: int | None = None,
) -> CalibrationSplit:
    """Split ``pool`` (dataset indices) into a class-balanced calibration set and validation.

    ``labels`` and ``predictions`` are aligned with ``pool``. ``predictions`` (the unpruned model's
    top-1) are needed for ``correct_only`` and for ``label_free``.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if len(pool) == 0:
        raise CswapError("The calibration pool is empty.", "supply data with at least two images.")
    if per_class < 1:
        raise CswapError(
            f"per_class must be >= 1, got {per_class}.", "use e.g. --calib-per-class 50."
        )
    if label_free:
        if predictions is None:
            raise ValueError("label_free needs the model's predictions.")
        used_labels = np.asarray(predictions, dtype=np.int64)
        eligible = np.ones(len(pool), dtype=bool)
    else:
        if labels is None:
            raise CswapError(
                "The data has no labels.", "use label-free mode (--label-free / label_free=True)."
            )
        used_labels = np.asarray(labels, dtype=np.int64)
        eligible = np.ones(len(pool), dtype=bool)
        if correct_only:
            if predictions is None:
                raise ValueError("correct_only needs the model's predictions.")
            eligible = np.asarray(predictions) == used_labels
    if len(used_labels) != len(pool):
        raise ValueError("labels/predictions must be aligned with pool.")

    order = np.random.default_rng(seed).permutation(len(pool))
    chosen: list[int] = []
    short: dict[int, int] = {}
    for label in np.unique(used_labels):
        members = order[(used_labels[order] == label) & eligible[order]]
        taken = members[:per_class]
        if len(taken) < per_class:
            short[int(label)] = len(taken)
        chosen += taken.tolist()
    positions = np.sort(np.asarray(chosen, dtype=np.int64))
    if not len(positions):
        raise CswapError(
            f"None of the {len(pool)} labelled images is classified correctly by the model, so "
            "calibrating on correct images leaves nothing.",
            "check that the data's labels are the model's class indices (and the model its "
            "trained weights); or use --label-free, or --no-correct-only.",
        )
    note = None
    if len(np.unique(used_labels[positions])) < 2:
        note = _one_class_note(used_labels, eligible, label_free, correct_only)
        log.warning(note)
    if validation_size is not None and validation_size < 1:
        raise CswapError(
            f"validation_size {validation_size} leaves no image to validate on.",
            "use e.g. --validation-size 2000, or leave it out to use the rest of the pool.",
        )
    rest = np.setdiff1d(np.arange(len(pool)), positions)
    if validation_size is not None and validation_size < len(rest):
        rest = np.sort(np.random.default_rng(seed + 1).choice(rest, validation_size, replace=False))
    if len(rest) == 0:
        raise CswapError(
            "No images are left for validation after drawing the calibration set.",
            "lower --calib-per-class or supply more images.",
        )
    return CalibrationSplit(
        calibration=pool[positions],
        calibration_labels=used_labels[positions],
        validation=pool[rest],
        validation_labels=used_labels[rest],
        per_class=per_class,
        seed=seed,
        correct_only=correct_only and not label_free,
        label_free=label_free,
        short_classes=short,
        note=note,
    )


def _one_class_note(labels, eligible, label_free: bool, correct_only: bool) -> str:
    """Why the calibration set holds one class, in the user's terms: C-SWAP then tests that
    class alone (its per-class test is one-sided over it); baselines need no class at all."""
    classes = len(np.unique(labels))
    tested = "the class-conditional test runs on that class alone"
    if label_free:
        return (
            f"The model assigns every one of the {len(labels)} images to one class: {tested} "
            "(a randomly initialised model often predicts one class: load its trained weights "
            "with --weights FILE)."
        )
    if correct_only and classes >= 2:
        kept = len(np.unique(labels[eligible]))
        accuracy = float(np.mean(eligible))
        return (
            f"The model classifies only {accuracy:.1%} of the {len(labels)} labelled images "
            f"correctly, so calibrating on correct images keeps {kept} of the data's {classes} "
            f"classes: {tested}. Check that the data's labels are the model's class indices "
            "(and the model its trained weights); or use --label-free, or --no-correct-only."
        )
    return f"The data hold {classes} class: {tested}."
