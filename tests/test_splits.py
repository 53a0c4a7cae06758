import numpy as np
import pytest

from cswap.data.splits import fashion_mnist_split, indices_sha256, stratified_pool_test_split


def test_fashion_mnist_split_is_55k_train_and_5k_heldout_disjoint_and_complete():
    split = fashion_mnist_split()
    assert len(split.train) == 55_000 and len(split.heldout) == 5_000
    assert len(np.intersect1d(split.train, split.heldout)) == 0
    assert np.array_equal(np.union1d(split.train, split.heldout), np.arange(60_000))


def test_fashion_mnist_split_is_seeded():
    assert np.array_equal(fashion_mnist_split(0).heldout, fashion_mnist_split(0).heldout)
    assert not np.array_equal(fashion_mnist_split(0).heldout, fashion_mnist_split(1).heldout)


def test_fingerprint_hash_identifies_the_train_indices():
    split = fashion_mnist_split()
    fingerprint = split.fingerprint()
    assert fingerprint["train_sha256"] == indices_sha256(split.train[::-1])
    assert fingerprint["train_sha256"] != indices_sha256(split.train[1:])


def test_stratified_split_takes_the_fraction_of_every_class():
    labels = np.repeat(np.arange(4), 10)
    pool, test = stratified_pool_test_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(pool, test)) == 0
    assert np.array_equal(np.bincount(labels[test]), [2, 2, 2, 2])
    assert np.array_equal(np.bincount(labels[pool]), [8, 8, 8, 8])
    again, _ = stratified_pool_test_split(labels, 0.2, seed=3)
    assert np.array_equal(pool, again)


def test_stratified_split_rejects_a_fraction_of_one():
    with pytest.raises(ValueError):
        stratified_pool_test_split(np.zeros(4, dtype=int), 1.0, seed=0)
