"""Fashion-MNIST read from the original IDX .gz files (Debian's ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cswap.data.preprocessing import Preprocessing
from cswap.errors import CswapError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "CSWAP_FASHION_MNIST_DIR"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def locate(root: str | Path | None = None) -> Path:
    """The directory holding the four IDX .gz files: ``root``, else $CSWAP_FASHION_MNIST_DIR,
    else the Debian package's directory."""
    if root is None:
        root = os.environ.get(ENV_VAR) or DEBIAN_DIR
    root = Path(root)
    missing = [name for pair in _FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise CswapError(
            f"Fashion-MNIST not found: {root} lacks {', '.join(missing)}.",
            "install it with `apt-get install -y dataset-fashion-mnist` (or `make setup`), "
            f"or point --data-dir / ${ENV_VAR} at a directory holding the original IDX .gz files.",
        )
    return root


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise CswapError(
            f"{path} is not an IDX file of the expected kind (magic {magic:#x}).",
            "re-install `dataset-fashion-mnist` or supply the original files.",
        )
    ndim = magic & 0xFF
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@lru_cache(maxsize=4)
def load_arrays(split: str, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw images (N, 1, 28, 28) uint8 and labels (N,) int64 of ``split`` ("train" or "test")."""
    if split not in _FILES:
        raise CswapError(f"Unknown Fashion-MNIST split {split!r}.", "use 'train' or 'test'.")
    directory = locate(root)
    image_file, label_file = _FILES[split]
    images = _read_idx(directory / image_file, 0x00000803)
    labels = _read_idx(directory / label_file, 0x00000801)
    if len(images) != len(labels):
        raise CswapError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels.")
    images_tensor = torch.from_numpy(images.copy()).unsqueeze(1)
    return images_tensor, torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """A Fashion-MNIST split as (preprocessed image, label) pairs; images stay uint8 in memory."""

    classes = CLASSES

    def __init__(
        self,
        split: str = "train",
        *,
        preprocessing: Preprocessing | None = None,
        root: str | Path | None = None,
    ) -> None:
        self.split = split
        self.preprocessing = preprocessing or Preprocessing()
        self.images, self.labels = load_arrays(split, None if root is None else str(root))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.preprocessing(self.images[index]), int(self.labels[index])

    def batch(self, indices: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed images and labels for many indices at once (fast path for training)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return self.preprocessing(self.images[indices]), self.labels[indices]
