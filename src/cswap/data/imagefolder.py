"""A user's own images: ``ROOT/<class name>/<image>``, classes sorted by name (as torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cswap.data.preprocessing import Preprocessing
from cswap.errors import CswapError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageFolder(Dataset):
    """Images under ``root/<class>/``; decoded lazily, preprocessed for the model.

    ``class_names`` fixes the class -> index mapping (e.g. the model's own label order); by default
    the sorted sub-directory names are used. One class directory is enough (label-free use, or
    a run that tests that class alone).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        preprocessing: Preprocessing | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.preprocessing = preprocessing or Preprocessing()
        if not self.root.is_dir():
            raise CswapError(
                f"Image folder {self.root} does not exist or is not a directory.",
                "pass imagefolder:PATH with PATH holding one sub-directory of images per class.",
            )
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.classes = list(class_names) if class_names is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise CswapError(
                f"Image folder {self.root} has class directories {unknown} that the model does "
                "not know.",
                "rename them to the model's class names or remove them.",
            )
        samples = []
        for index, name in enumerate(self.classes):
            directory = self.root / name
            if directory.is_dir():
                samples += [
                    (path, index)
                    for path in sorted(directory.rglob("*"))
                    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                ]
        if not samples:
            raise CswapError(
                f"Image folder {self.root} holds no images (looked for {', '.join(IMAGE_SUFFIXES)} "
                "files in one sub-directory per class).",
                "put the images in ROOT/<class name>/ sub-directories.",
            )
        self.samples = samples
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def load_raw(self, index: int) -> torch.Tensor:
        """The decoded image as uint8 (C, H, W), grey kept as one channel."""
        path, _ = self.samples[index]
        try:
            with Image.open(path) as image:
                mode = "L" if image.mode in ("L", "I;16", "I", "1") else "RGB"
                array = np.asarray(image.convert(mode))
        except OSError as error:
            raise CswapError(
                f"Cannot decode image {path}: {error}.", "remove or replace the file."
            ) from error
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.preprocessing(self.load_raw(index)), int(self.labels[index])
