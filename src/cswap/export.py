"""Saving and loading pruned models without pickle, and ONNX export.

``OUT/model/spec.json`` holds the base model spec (how to rebuild the unpruned architecture), the
removed units as ``{root layer: [original indices]}``, the example input shape used to trace the
dependency graph, the preprocessing and the library versions; ``OUT/model/model.safetensors`` the
pruned weights; ``spec.json``'s ``sha256`` holds hashes of the plan and of the weights, checked on
loading so that an edited or incomplete directory is refused. Loading rebuilds the base model,
replays the removal through Torch-Pruning and loads the weights (shapes checked), so no code
object is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cswap.adapters import canonicalize
from cswap.compensation import add_zero_biases
from cswap.data.preprocessing import Preprocessing
from cswap.errors import CswapError, first_line
from cswap.models import load_model
from cswap.surgery import apply_plan
from cswap.zoo.store import load_state_dict_checked, sha256_file

FORMAT = "cswap-pruned-model/2"
LEGACY_FORMATS = ("cswap-pruned-model/1",)  # no integrity hashes: loaded with a warning
SPEC_FILE = "spec.json"
WEIGHTS_FILE = "model.safetensors"
PLAN_KEYS = ("base_model", "removed", "example_input_shape")
log = logging.getLogger("cswap")


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("cswap", "torch", "torchvision", "torch-pruning", "timm", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def is_saved_model(path: str | Path) -> bool:
    path = Path(path)
    return (path / "model" / SPEC_FILE).is_file() or (path / SPEC_FILE).is_file()


def save_model(
    directory: str | Path,
    model: nn.Module,
    *,
    base_spec: str | None,
    plan: dict[str, list[int]],
    example_shape: tuple[int, ...],
    preprocessing: Preprocessing | None,
    class_names: tuple[str, ...] | None = None,
) -> Path:
    """Write spec.json + model.safetensors into ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    spec = {
        "format": FORMAT,
        "base_model": base_spec,
        "removed": {root: [int(i) for i in indices] for root, indices in plan.items()},
        "example_input_shape": [1, *example_shape[1:]],
        "preprocessing": None if preprocessing is None else preprocessing.to_dict(),
        "class_names": list(class_names) if class_names else None,
        "versions": library_versions(),
    }
    spec["sha256"] = {"plan": _plan_hash(spec), "weights": sha256_file(directory / WEIGHTS_FILE)}
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    return directory


def _plan_hash(spec: dict) -> str:
    plan = json.dumps({key: spec.get(key) for key in PLAN_KEYS}, sort_keys=True)
    return hashlib.sha256(plan.encode()).hexdigest()


def read_spec(path: str | Path) -> tuple[Path, dict]:
    """The saved model's directory and spec, checked: complete, readable and unmodified."""
    path = Path(path)
    directory = path / "model" if (path / "model" / SPEC_FILE).is_file() else path
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise CswapError(
            f"{path} holds no saved pruned model (no model/{SPEC_FILE}).",
            "pass the --out directory of a finished `cswap prune` run.",
        )
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CswapError(
            f"{spec_path} is not readable JSON ({first_line(error)}).",
            "restore the file, or prune and save the model again.",
        ) from error
    if not isinstance(spec, dict) or spec.get("format") not in (FORMAT, *LEGACY_FORMATS):
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise CswapError(
            f"{spec_path} has format {found!r}, expected {FORMAT!r}.",
            "save it again with this version of cswap.",
        )
    _check_integrity(directory, spec)
    return directory, spec


def _check_integrity(directory: Path, spec: dict) -> None:
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CswapError(
            f"{directory} is incomplete: {WEIGHTS_FILE} is missing.",
            "copy the whole directory that `cswap prune --out` wrote, or prune again.",
        )
    if spec["format"] in LEGACY_FORMATS:
        log.warning("%s predates integrity hashes: it cannot be checked for edits", directory)
        return
    recorded = spec.get("sha256") or {}
    for part, actual in (("plan", _plan_hash(spec)), ("weights", sha256_file(weights))):
        if recorded.get(part) != actual:
            what = "removal plan in spec.json" if part == "plan" else WEIGHTS_FILE
            raise CswapError(
                f"{directory} was modified after it was saved: its {what} does not match the "
                "hash recorded at saving.",
                "restore the original files, or prune and save the model again.",
            )


def load(path: str | Path, base_model: nn.Module | None = None) -> nn.Module:
    """The pruned model saved in ``path`` (an OUT directory or its model/ sub-directory).

    ``base_model``: a fresh, unpruned instance of the architecture, for models built in Python
    (their spec cannot be rebuilt from a string); it is pruned in place and returned.
    """
    directory, spec = read_spec(path)
    if base_model is None:
        if not spec.get("base_model"):
            raise CswapError(
                f"{directory} was saved from a model built in Python: cswap cannot rebuild it.",
                "pass a fresh instance: cswap.load(path, base_model=MyModel()).",
            )
        base = spec["base_model"]
        # a model pruned twice names the first run's directory as its base: load that first
        base_model = load(base) if is_saved_model(base) else load_model(base).model
    example = torch.zeros(spec["example_input_shape"])
    model = apply_plan(canonicalize(base_model).eval(), spec["removed"], example)
    state = load_file(str(directory / WEIGHTS_FILE))
    # mean compensation may have given a bias-free layer a bias: recreate it, values follow
    bias_layers = [key.removesuffix(".bias") for key in state if key.endswith(".bias")]
    add_zero_biases(model, [layer for layer in bias_layers if _lacks_bias(model, layer)])
    load_state_dict_checked(model, state, source=str(directory / WEIGHTS_FILE))
    return model.eval()


def _lacks_bias(model: nn.Module, layer: str) -> bool:
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        return False
    return isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d) and module.bias is None


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path) -> Path:
    """Write an ONNX file with a dynamic batch axis (legacy TorchScript exporter: it needs no
    ``onnxscript``)."""
    import warnings

    path = Path(path)
    model = model.eval().to("cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is fine
            torch.onnx.export(
                model,
                (example_input[:1].to("cpu"),),
                str(path),
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
    except ImportError as error:
        raise CswapError(
            f"ONNX export needs the onnx package: {error}.", "pip install 'cswap[onnx]'."
        ) from error
    except torch.onnx.errors.OnnxExporterError as error:
        path.unlink(missing_ok=True)
        raise CswapError(
            f"The model cannot be exported to ONNX: {str(error).splitlines()[0]}",
            "the pruned weights are saved in model/ anyway; export without --export onnx.",
        ) from error
    return path
