import gzip

import pytest
import torch

from cswap.data.fashion_mnist import CLASSES, FashionMNIST, load_arrays, locate
from cswap.data.preprocessing import Preprocessing
from cswap.errors import CswapError


def test_train_and_test_splits_have_the_original_sizes_and_types():
    train_images, train_labels = load_arrays("train")
    test_images, test_labels = load_arrays("test")
    assert train_images.shape == (60_000, 1, 28, 28)
    assert test_images.shape == (10_000, 1, 28, 28)
    assert train_images.dtype == torch.uint8
    assert train_labels.dtype == torch.int64
    for labels in (train_labels, test_labels):
        assert labels.min() == 0 and labels.max() == len(CLASSES) - 1
        # Fashion-MNIST is exactly balanced.
        assert torch.bincount(labels).unique().numel() == 1


def test_items_are_normalised_float_images_with_int_labels():
    dataset = FashionMNIST("test")
    image, label = dataset[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    # Normalised with the training-set mean/std: the test split's mean is close to 0.
    images, _ = dataset.batch(torch.arange(2000))
    assert abs(float(images.mean())) < 0.05


def test_preprocessing_for_an_rgb_model_resizes_and_repeats_channels():
    preprocessing = Preprocessing((32, 32), 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    image, _ = FashionMNIST("test", preprocessing=preprocessing)[3]
    assert image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_missing_dataset_names_the_install_command(tmp_path):
    with pytest.raises(CswapError, match="apt-get install -y dataset-fashion-mnist"):
        locate(tmp_path)


def test_other_directory_via_environment_variable(tmp_path, monkeypatch):
    source = locate()
    for file in source.glob("*.gz"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    monkeypatch.setenv("CSWAP_FASHION_MNIST_DIR", str(tmp_path))
    assert locate() == tmp_path


def test_a_file_of_the_wrong_kind_is_refused(tmp_path):
    source = locate()
    for file in source.glob("*.gz"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    # Swap images and labels: the magic numbers differ.
    with (
        gzip.open(source / "t10k-images-idx3-ubyte.gz") as images,
        gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as handle,
    ):
        handle.write(images.read(1000))
    with pytest.raises(CswapError, match="not an IDX file of the expected kind"):
        load_arrays("test", str(tmp_path))
