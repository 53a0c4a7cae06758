"""Committed zoo weights (safetensors) and their manifest: load, verify, evaluate, record."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Subset

from cswap.data.fashion_mnist import FashionMNIST
from cswap.data.splits import fashion_mnist_split
from cswap.errors import CswapError
from cswap.measure import accuracy, count_macs, count_params
from cswap.zoo.architectures import BUILDERS
from cswap.zoo.registry import ZooEntry, get_entry

WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"
TEST_SLICE = (0, 1000)  # the fixed slice of the test split that the test suite re-evaluates


@dataclass(frozen=True)
class ZooEvaluation:
    name: str
    test_accuracy: float
    test_images: int
    params: int
    macs: int

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "test_accuracy": self.test_accuracy,
            "test_images": self.test_images,
            "params": self.params,
            "macs": self.macs,
        }


def read_manifest(path: Path = MANIFEST) -> dict:
    if not path.is_file():
        return {"models": {}}
    return json.loads(path.read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build(entry: ZooEntry) -> nn.Module:
    return BUILDERS[entry.architecture](**entry.config)


def load_zoo_model(name: str, *, weights_dir: Path = WEIGHTS_DIR, verify: bool = True) -> nn.Module:
    """The zoo model ``name`` with its committed weights, in eval mode."""
    entry = get_entry(name)
    weights = weights_dir / f"{name}.safetensors"
    if not weights.is_file():
        raise CswapError(
            f"Zoo model {name!r} has no weights at {weights}.",
            f"train it with `cswap zoo train {name}` (runs for up to ~90 minutes on 2 CPU cores).",
        )
    if verify:
        recorded = read_manifest(weights_dir / "manifest.json")["models"].get(name, {})
        expected = recorded.get("sha256")
        if expected and sha256_file(weights) != expected:
            raise CswapError(
                f"{weights} does not match the sha256 in the manifest.",
                f"restore it with `git checkout -- {weights}` or retrain it.",
            )
    model = build(entry)
    load_state_dict_checked(model, load_file(str(weights)), source=str(weights))
    return model.eval()


def load_state_dict_checked(model: nn.Module, state: dict, *, source: str) -> None:
    """``load_state_dict`` with one clear error when the weights don't fit the architecture."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in own
        if key in state and tuple(state[key].shape) != tuple(own[key].shape)
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        if mismatched:
            details.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[0]})")
        raise CswapError(
            f"The weights in {source} do not fit the architecture: {'; '.join(details)}.",
            "pass the weights file saved from this very architecture "
            "(same name, number of classes and input size).",
        )
    model.load_state_dict(state)


def evaluate_zoo_model(
    name: str,
    model: nn.Module | None = None,
    *,
    test_slice: tuple[int, int] | None = None,
    batch_size: int = 500,
    device: str = "cpu",
) -> ZooEvaluation:
    """Accuracy on the Fashion-MNIST test split (or a slice of it), params and MACs."""
    entry = get_entry(name)
    model = load_zoo_model(name) if model is None else model
    model = model.to(device).eval()
    test = FashionMNIST("test", preprocessing=entry.preprocessing)
    indices = range(len(test)) if test_slice is None else range(*test_slice)
    loader = DataLoader(Subset(test, list(indices)), batch_size=batch_size)
    example = test[0][0].unsqueeze(0).to(device)
    return ZooEvaluation(
        name=name,
        test_accuracy=accuracy(model, loader, device),
        test_images=len(indices),
        params=count_params(model),
        macs=count_macs(model, example),
    )


def record(
    name: str,
    model: nn.Module,
    *,
    training_seconds: float,
    command: str,
    weights_dir: Path = WEIGHTS_DIR,
) -> dict:
    """Save weights as safetensors and write the model's manifest entry (atomically)."""
    entry = get_entry(name)
    weights_dir.mkdir(parents=True, exist_ok=True)
    weights = weights_dir / f"{name}.safetensors"
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(weights))
    full = evaluate_zoo_model(name, model)
    sliced = evaluate_zoo_model(name, model, test_slice=TEST_SLICE)
    manifest_path = weights_dir / "manifest.json"
    manifest = read_manifest(manifest_path)
    manifest["split"] = fashion_mnist_split().fingerprint()
    manifest["models"][name] = {
        "name": name,
        "architecture": entry.architecture,
        "description": entry.description,
        "config": entry.config,
        "preprocessing": entry.preprocessing.to_dict(),
        "test_accuracy": full.test_accuracy,
        "test_slice": {
            "start": TEST_SLICE[0],
            "stop": TEST_SLICE[1],
            "accuracy": sliced.test_accuracy,
        },
        "params": full.params,
        "macs": full.macs,
        "seed": entry.recipe.seed,
        "recipe": entry.recipe.to_dict(),
        "training_command": command,
        "training_seconds": round(training_seconds, 1),
        "torch_version": torch.__version__,
        "sha256": sha256_file(weights),
    }
    _write_json_atomic(manifest_path, manifest)
    return manifest["models"][name]


def _write_json_atomic(path: Path, data: dict) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as stream:
        json.dump(data, stream, indent=1)
        stream.write("\n")
    os.replace(temporary, path)
