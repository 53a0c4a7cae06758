"""Model spec strings: where a model comes from and the preprocessing it expects.

- ``zoo:NAME``: a reference model with its committed weights (``cswap zoo list``).
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME)``, random init; options are passed
  to the builder, e.g. ``torchvision:resnet18?num_classes=10``.
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)``, options likewise, e.g.
  ``timm:vit_tiny_patch16_224?num_classes=10&img_size=32``.
- ``hf:PATH``: a local Hugging Face model directory (``config.json``, and weights if present;
  without weights the model is randomly initialised from the config).

Model hubs are not contacted (downloads fail offline): users with downloaded weights pass them with
``weights=FILE`` / ``--weights FILE`` (safetensors, or a PyTorch state dict loaded with
``weights_only=True``). A saved pruned model is a directory written by ``cswap prune --out DIR``
(it holds ``DIR/model/spec.json``): pass the directory itself as the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cswap.data.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    supported_interpolation,
)
from cswap.errors import CswapError, first_line
from cswap.specs import parse_spec

MODEL_SPEC_HELP = (
    "zoo:NAME | torchvision:NAME | timm:NAME | hf:PATH | a saved pruned-model directory"
)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    spec: str
    family: str
    model: nn.Module
    preprocessing: Preprocessing
    class_names: tuple[str, ...] | None = None


class HuggingFaceLogits(nn.Module):
    """A Hugging Face image classifier as a plain ``images -> logits`` module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _coerce(value: str) -> object:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def load_model(spec: str, *, weights: str | Path | None = None) -> LoadedModel:
    """Build the model named by ``spec`` (see the module docstring), in eval mode."""
    if Path(spec).is_dir() and (Path(spec) / "model" / "spec.json").is_file():
        raise CswapError(
            f"{spec} is a saved pruned model, not a model spec.",
            "load it with cswap.load(DIR) (the CLI's --model accepts it directly).",
        )
    scheme, body, raw_options = parse_spec(spec, kind="model", help_text=MODEL_SPEC_HELP)
    options = {key: _coerce(value) for key, value in raw_options.items()}
    _refuse_downloads(spec, options)
    if not body:
        raise CswapError(f"Unknown model spec {spec!r}.", f"use {MODEL_SPEC_HELP}.")
    if scheme == "zoo":
        loaded = _load_zoo(spec, body, weights)
    elif scheme == "torchvision":
        loaded = _load_torchvision(spec, body, options)
    elif scheme == "timm":
        loaded = _load_timm(spec, body, options)
    elif scheme == "hf":
        loaded = _load_hf(spec, body)
    else:
        raise CswapError(f"Unknown model spec {spec!r}.", f"use {MODEL_SPEC_HELP}.")
    if weights is not None and scheme != "zoo":
        target = loaded.model.model if scheme == "hf" else loaded.model
        load_weights_file(target, weights)
    loaded.model.eval()
    return loaded


# Builder arguments that fetch pretrained weights from a hub: cswap never downloads.
DOWNLOAD_OPTIONS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def _refuse_downloads(spec: str, options: dict) -> None:
    asked = [key for key in DOWNLOAD_OPTIONS if options.get(key) not in (None, False)]
    if asked:
        raise CswapError(
            f"{spec} asks for pretrained weights ({', '.join(asked)}): cswap never downloads "
            "from a model hub.",
            "drop the option and pass a local weights file with --weights FILE (weights=FILE).",
        )


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file or a PyTorch state dict (``weights_only``) into ``model``."""
    from cswap.zoo.store import load_state_dict_checked

    path = Path(path)
    if not path.is_file():
        raise CswapError(f"Weights file {path} does not exist.", "check the --weights path.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # SafetensorError, OSError: a truncated or foreign file
            raise CswapError(
                f"Cannot read weights file {path}: it is not a valid safetensors file "
                f"({first_line(error)}).",
                "download or save it again (safetensors.torch.save_file(model.state_dict(), "
                "PATH)).",
            ) from error
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch's own message advises weights_only=False: unsafe
            raise CswapError(
                f"Cannot read weights file {path} as a PyTorch state dict "
                f"({type(error).__name__}).",
                "pass a .safetensors file or a state dict saved with "
                "torch.save(model.state_dict(), PATH); cswap never unpickles arbitrary objects.",
            ) from error
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise CswapError(
            f"{path} does not hold a state dict.", "save it with torch.save(model.state_dict())."
        )
    load_state_dict_checked(model, state, source=str(path))


def _load_zoo(spec: str, name: str, weights: str | Path | None) -> LoadedModel:
    from cswap.data.fashion_mnist import CLASSES
    from cswap.zoo.registry import get_entry
    from cswap.zoo.store import build, load_zoo_model

    entry = get_entry(name)
    if weights is None:
        model = load_zoo_model(name)
    else:
        model = build(entry)
        load_weights_file(model, weights)
    return LoadedModel(spec, "zoo", model, entry.preprocessing, CLASSES)


def _load_torchvision(spec: str, name: str, options: dict) -> LoadedModel:
    import torchvision

    if name not in torchvision.models.list_models():
        raise CswapError(
            f"torchvision has no model {name!r}.",
            "see torchvision.models.list_models() for the names.",
        )
    import inspect

    builder = torchvision.models.get_model_builder(name)
    offline = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        offline["weights_backbone"] = None  # its default downloads a backbone
    try:
        model = builder(**(offline | options))
    except Exception as error:  # TypeError, KeyError, ValueError: the builder refused them
        raise CswapError(
            f"torchvision:{name} could not be built with the options {options}: "
            f"{type(error).__name__}: {first_line(error)}.",
            "pass only keyword arguments its builder accepts, with valid values.",
        ) from error
    preprocessing = _torchvision_preprocessing(name)
    if "image_size" in options:
        preprocessing = preprocessing.with_input_size(int(options["image_size"]))
    return LoadedModel(spec, "torchvision", model, preprocessing)


def _torchvision_preprocessing(name: str) -> Preprocessing:
    """The evaluation transform of the model's default pretrained weights (read from
    torchvision's metadata, nothing downloaded); ImageNet's 224 px otherwise."""
    import torchvision

    try:
        transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop, resize = int(transform.crop_size[0]), int(transform.resize_size[0])
        mode = str(transform.interpolation.value)
        mean, std = tuple(transform.mean), tuple(transform.std)
    except (AttributeError, ValueError, KeyError, TypeError, IndexError):
        return Preprocessing((224, 224), 3, IMAGENET_MEAN, IMAGENET_STD)
    mode = supported_interpolation(mode)
    return Preprocessing((crop, crop), 3, mean, std, resize=max(resize, crop), interpolation=mode)


def _load_timm(spec: str, name: str, options: dict) -> LoadedModel:
    import timm

    if not timm.is_model(name):
        raise CswapError(
            f"timm has no model {name!r}.", "see timm.list_models('*pattern*') for the names."
        )
    try:
        model = timm.create_model(name, **({"pretrained": False} | options))
    except Exception as error:  # TypeError, KeyError, ValueError: the builder refused them
        raise CswapError(
            f"timm:{name} could not be built with the options {options}: "
            f"{type(error).__name__}: {first_line(error)}.",
            "pass only keyword arguments timm.create_model accepts for it, with valid values.",
        ) from error
    config = timm.data.resolve_data_config({}, model=model)
    channels, height, width = config["input_size"]
    # Options override the pretrained config's input size (e.g. img_size=32, in_chans=1).
    if "img_size" in options:
        size = options["img_size"]
        height, width = (size, size) if isinstance(size, int) else size
    channels = int(options.get("in_chans", channels))
    mean, std = tuple(config["mean"]), tuple(config["std"])
    if channels == 1:
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    resize, mode = None, str(config.get("interpolation", "bilinear"))
    if config.get("crop_mode", "center") == "center" and config.get("crop_pct"):
        resize = max(height, width, math.floor(max(height, width) / float(config["crop_pct"])))
    preprocessing = Preprocessing(
        (height, width), channels, mean, std, resize, supported_interpolation(mode)
    )
    return LoadedModel(spec, "timm", model, preprocessing)


def _load_hf(spec: str, path: str) -> LoadedModel:
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise CswapError(
            f"{directory} is not a Hugging Face model directory (no config.json).",
            "pass hf:PATH with PATH from model.save_pretrained(PATH) or a downloaded snapshot.",
        )
    try:
        from transformers import AutoConfig, AutoModelForImageClassification
    except ImportError as error:
        raise CswapError(
            "hf: models need the transformers package.", "pip install 'cswap[hf]'."
        ) from error
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
    if has_weights:
        model = AutoModelForImageClassification.from_pretrained(directory, local_files_only=True)
    else:
        model = AutoModelForImageClassification.from_config(config)
    size = getattr(config, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    channels = getattr(config, "num_channels", 3)
    mean, std = (0.5,) * channels, (0.5,) * channels
    processor = directory / "preprocessor_config.json"
    resize = None
    if processor.is_file():
        import json

        data = json.loads(processor.read_text())
        mean = tuple(data.get("image_mean", mean))
        std = tuple(data.get("image_std", std))
        resize = _hf_resize(data, size)
    labels = getattr(config, "id2label", None)
    class_names = tuple(labels[i] for i in sorted(labels)) if labels else None
    preprocessing = Preprocessing(size, channels, mean, std, resize)
    return LoadedModel(spec, "hf", HuggingFaceLogits(model), preprocessing, class_names)


def _hf_resize(processor: dict, size: tuple[int, int]) -> int | None:
    """The shorter-side resize of an image processor that centre-crops (``do_center_crop``
    with ``size: {shortest_edge: S}``); None when it resizes straight to the input size."""
    edge = processor.get("size")
    if (
        not processor.get("do_center_crop")
        or not isinstance(edge, dict)
        or "shortest_edge" not in edge
    ):
        return None
    return max(int(edge["shortest_edge"]), *size)
