import numpy as np
import pytest
import torch
from torch import nn

from cswap.data.calibration import LabeledSubset, draw_calibration, model_predictions
from cswap.data.fashion_mnist import FashionMNIST
from cswap.data.preprocessing import Preprocessing
from cswap.data.spec import resolve_data
from cswap.errors import CswapError


def _pool(n_per_class=30, classes=5):
    labels = np.repeat(np.arange(classes), n_per_class)
    pool = np.arange(1000, 1000 + len(labels))  # dataset indices, not positions
    return pool, labels


def test_calibration_is_class_balanced_and_disjoint_from_validation():
    pool, labels = _pool()
    split = draw_calibration(pool, labels, per_class=7, predictions=labels, seed=0)
    assert np.array_equal(np.bincount(split.calibration_labels), [7] * 5)
    assert len(np.intersect1d(split.calibration, split.validation)) == 0
    assert np.array_equal(np.sort(np.concatenate([split.calibration, split.validation])), pool)
    assert split.short_classes == {}


def test_calibration_is_seeded_and_nested_in_per_class():
    pool, labels = _pool()
    first = draw_calibration(pool, labels, per_class=5, predictions=labels, seed=4)
    again = draw_calibration(pool, labels, per_class=5, predictions=labels, seed=4)
    other = draw_calibration(pool, labels, per_class=5, predictions=labels, seed=5)
    larger = draw_calibration(pool, labels, per_class=9, predictions=labels, seed=4)
    assert np.array_equal(first.calibration, again.calibration)
    assert not np.array_equal(first.calibration, other.calibration)
    assert set(first.calibration) <= set(larger.calibration)


def test_correct_only_skips_misclassified_samples_and_reports_short_classes():
    pool, labels = _pool(n_per_class=10, classes=3)
    predictions = labels.copy()
    predictions[labels == 2] = 0  # class 2 never classified correctly ...
    predictions[np.flatnonzero(labels == 1)[:7]] = 0  # ... class 1 only 3 times
    split = draw_calibration(pool, labels, per_class=5, predictions=predictions)
    positions = np.searchsorted(pool, split.calibration)
    assert np.all(predictions[positions] == labels[positions])
    assert split.short_classes == {1: 3, 2: 0}
    # Validation keeps every remaining sample, misclassified ones included.
    assert len(split.validation) == len(pool) - len(split.calibration)


def test_correct_only_off_keeps_misclassified_samples():
    pool, labels = _pool(n_per_class=10, classes=3)
    predictions = np.zeros_like(labels)
    split = draw_calibration(pool, labels, per_class=4, predictions=predictions, correct_only=False)
    assert np.array_equal(np.bincount(split.calibration_labels), [4, 4, 4])


def test_label_free_uses_the_model_predictions_as_labels():
    pool, _ = _pool(n_per_class=10, classes=3)
    predictions = np.array([0] * 25 + [1] * 3 + [2] * 2)
    split = draw_calibration(pool, None, per_class=4, predictions=predictions, label_free=True)
    assert np.array_equal(np.bincount(split.calibration_labels), [4, 3, 2])
    assert split.short_classes == {1: 3, 2: 2}
    positions = np.searchsorted(pool, split.validation)
    assert np.array_equal(split.validation_labels, predictions[positions])


def test_validation_size_caps_validation():
    pool, labels = _pool()
    split = draw_calibration(pool, labels, per_class=2, predictions=labels, validation_size=17)
    assert len(split.validation) == 17
    assert len(np.intersect1d(split.calibration, split.validation)) == 0


def test_one_class_is_tested_alone_and_empty_data_are_refused():
    split = draw_calibration(
        np.arange(10), np.zeros(10, dtype=int), per_class=3, correct_only=False
    )
    assert len(split.calibration) == 3 and set(split.calibration_labels) == {0}
    assert (
        split.note == "The data hold 1 class: the class-conditional test runs on that class alone."
    )
    with pytest.raises(CswapError, match="None of the 10 labelled images is classified correctly"):
        draw_calibration(
            np.arange(10), np.zeros(10, dtype=int), per_class=3, predictions=np.ones(10, dtype=int)
        )
    with pytest.raises(CswapError, match="empty"):
        draw_calibration(np.arange(0), np.zeros(0, dtype=int), per_class=3, correct_only=False)
    with pytest.raises(CswapError, match="label-free"):
        draw_calibration(np.arange(10), None, per_class=3)


def test_fashion_mnist_calibration_validation_and_test_are_disjoint():
    source = resolve_data("fashion-mnist", Preprocessing())
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    predictions = model_predictions(model, source.dataset, source.pool)
    split = draw_calibration(
        source.pool, source.pool_labels, per_class=20, predictions=predictions, correct_only=False
    )
    assert len(split.calibration) == 200
    assert len(split.validation) == 4_800
    # Calibration and validation come from the held-out pool of the *training* split, never the
    # test split (a different dataset object), and never the zoo's 55k training images.
    assert source.test_dataset is not source.dataset
    from cswap.data.splits import fashion_mnist_split

    train = fashion_mnist_split().train
    assert len(np.intersect1d(split.calibration, train)) == 0
    assert len(np.intersect1d(split.validation, train)) == 0


def test_labeled_subset_overrides_labels():
    dataset = FashionMNIST("test")
    subset = LabeledSubset(dataset, np.array([5, 6]), np.array([9, 9]))
    image, label = subset[1]
    assert label == 9 and torch.equal(image, dataset[6][0])
