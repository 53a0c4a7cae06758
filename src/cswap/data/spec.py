"""Data spec strings for the CLI.

- ``fashion-mnist``: Fashion-MNIST from the IDX .gz files (Debian's ``dataset-fashion-mnist``, or
  ``--data-dir`` / $CSWAP_FASHION_MNIST_DIR). Pool = the 5,000 held-out training images (never
  seen by the zoo's training), test = the 10,000-image test split.
- ``imagefolder:PATH``: ``PATH/<class name>/<images>``. Pool = all images, or, with
  ``imagefolder:PATH?test_fraction=0.2``, a seeded per-class split whose last 20% is the test
  split (``&seed=N`` changes the seed, default 0). Without a test fraction there is no test split
  and final numbers are reported on validation only.

In both, calibration and validation are drawn from the pool (see ``cswap.data.calibration``).
The images are preprocessed for the model (``Preprocessing``), and the data source records how.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from cswap.data.fashion_mnist import CLASSES, FashionMNIST
from cswap.data.imagefolder import ImageFolder
from cswap.data.preprocessing import Preprocessing
from cswap.data.splits import fashion_mnist_split, stratified_pool_test_split
from cswap.errors import CswapError
from cswap.specs import parse_spec

DATA_SPEC_HELP = "fashion-mnist | imagefolder:PATH[?test_fraction=F&seed=N]"


@dataclass(frozen=True, eq=False)
class DataSource:
    """Where calibration / validation come from (the pool) and where final numbers come from."""

    spec: str
    dataset: Dataset
    pool: np.ndarray
    pool_labels: np.ndarray
    test_dataset: Dataset | None
    test: np.ndarray
    classes: tuple[str, ...]
    preprocessing: Preprocessing

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "pool_size": len(self.pool),
            "test_size": len(self.test),
            "classes": list(self.classes),
            "preprocessing": self.preprocessing.describe(),
        }


def resolve_data(
    spec: str,
    preprocessing: Preprocessing,
    *,
    data_dir: str | Path | None = None,
) -> DataSource:
    scheme, body, options = check_data_spec(spec)
    if scheme == "fashion-mnist":
        train = FashionMNIST("train", preprocessing=preprocessing, root=data_dir)
        test = FashionMNIST("test", preprocessing=preprocessing, root=data_dir)
        pool = fashion_mnist_split().heldout
        return DataSource(
            spec=spec,
            dataset=train,
            pool=pool,
            pool_labels=train.labels.numpy()[pool],
            test_dataset=test,
            test=np.arange(len(test)),
            classes=CLASSES,
            preprocessing=preprocessing,
        )
    if scheme == "imagefolder":
        test_fraction = float(options.get("test_fraction", 0.0))
        seed = int(options.get("seed", 0))
        folder = ImageFolder(body, preprocessing=preprocessing)
        labels = folder.labels.numpy()
        pool, test = stratified_pool_test_split(labels, test_fraction, seed)
        return DataSource(
            spec=spec,
            dataset=folder,
            pool=pool,
            pool_labels=labels[pool],
            test_dataset=folder if len(test) else None,
            test=test,
            classes=tuple(folder.classes),
            preprocessing=preprocessing,
        )
    raise AssertionError(scheme)  # check_data_spec knows every scheme


def check_data_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """(scheme, body, options) of a data spec, checked without reading any image."""
    scheme, body, options = parse_spec(spec, kind="data", help_text=DATA_SPEC_HELP)
    if scheme == "fashion-mnist" and not body and not options:
        return scheme, body, options
    if scheme != "imagefolder" or not body:
        raise CswapError(f"Unknown data spec {spec!r}.", f"use {DATA_SPEC_HELP}.")
    unknown = sorted(set(options) - {"test_fraction", "seed"})
    if unknown:
        raise CswapError(
            f"Unknown option(s) {unknown} in data spec {spec!r}.", f"use {DATA_SPEC_HELP}."
        )
    try:
        fraction = float(options.get("test_fraction", 0.0))
        int(options.get("seed", 0))
    except ValueError as error:
        raise CswapError(
            f"Data spec {spec!r}: {error}.", "test_fraction is a number, seed an integer."
        ) from error
    if not 0.0 <= fraction < 1.0:
        raise CswapError(
            f"test_fraction={fraction} in {spec!r} is outside [0, 1).", "use e.g. 0.2."
        )
    if not Path(body).is_dir():
        raise CswapError(
            f"Image folder {body} does not exist or is not a directory.",
            "pass imagefolder:PATH with PATH/<class name>/<images>.",
        )
    return scheme, body, options
