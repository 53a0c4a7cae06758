import numpy as np
import pytest
import torch

from cswap.data.imagefolder import ImageFolder
from cswap.data.preprocessing import Preprocessing
from cswap.data.spec import resolve_data
from cswap.errors import CswapError


def test_images_are_preprocessed_for_the_model(image_folder):
    folder = ImageFolder(image_folder, preprocessing=Preprocessing((28, 28), 1, (0.5,), (0.5,)))
    assert folder.classes == ["cat", "dog", "owl"]
    assert len(folder) == 36
    image, label = folder[13]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label == 1
    assert torch.equal(torch.bincount(folder.labels), torch.tensor([12, 12, 12]))


def test_rgb_model_preprocessing(image_folder):
    preprocessing = Preprocessing((16, 16), 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    image, _ = ImageFolder(image_folder, preprocessing=preprocessing)[0]
    assert image.shape == (3, 16, 16)
    assert float(image.min()) >= -1.0 - 1e-6 and float(image.max()) <= 1.0 + 1e-6


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(CswapError, match="holds no images"):
        ImageFolder(tmp_path)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(CswapError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")


def test_one_class_is_enough(image_folder):
    for name in ("dog", "owl"):
        for file in (image_folder / name).iterdir():
            file.unlink()
        (image_folder / name).rmdir()
    folder = ImageFolder(image_folder)
    assert len(folder) == 12 and set(folder.labels.tolist()) == {0}


def test_imagefolder_spec_with_a_seeded_test_split(image_folder):
    source = resolve_data(f"imagefolder:{image_folder}?test_fraction=0.25&seed=1", Preprocessing())
    assert len(source.test) == 9 and len(source.pool) == 27
    assert len(np.intersect1d(source.pool, source.test)) == 0
    assert np.array_equal(np.bincount(source.pool_labels), [9, 9, 9])
    plain = resolve_data(f"imagefolder:{image_folder}", Preprocessing())
    assert len(plain.test) == 0 and plain.test_dataset is None


def test_unknown_data_spec_is_refused():
    with pytest.raises(CswapError, match="Unknown data spec"):
        resolve_data("cifar10", Preprocessing())
    with pytest.raises(CswapError, match="Malformed option"):
        resolve_data("imagefolder:/x?test_fraction", Preprocessing())
