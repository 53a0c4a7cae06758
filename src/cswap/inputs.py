"""Checks of the user's arguments that run before any model is loaded or any image is scored.

Each raises one ``CswapError`` naming the problem and the fix, so that a mistake costs seconds,
not a whole run, and nothing is written to the output directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from cswap.errors import CswapError

EXPORT_FORMATS = ("onnx",)


def check_export(formats: Sequence[str]) -> None:
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown:
        raise CswapError(
            f"Unknown export format(s) {unknown}.",
            f"use one of: {', '.join(EXPORT_FORMATS)} (e.g. --export onnx).",
        )


def finished_run(out: Path) -> dict | None:
    """The report of a finished run in ``out`` (its stop reason and target), or None."""
    path = out / "report.json"
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def check_out_dir(out: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """``out`` can be written, and holds no finished run unless ``overwrite``.

    ``resume`` continues an interrupted run: a finished one (report.json) is never re-run.
    """
    out = Path(out)
    _check_writable(out)
    report = finished_run(out)
    if report is None or overwrite:
        return
    what = f"a finished run ({_describe(report)})" if report else "a report"
    if resume:
        raise CswapError(
            f"{out} holds {what}: --resume only continues an interrupted run.",
            "its results are in report.json / report.html; to prune further, pass it as "
            "--model and pick another --out; to redo it, pass --overwrite instead of --resume.",
        )
    raise CswapError(f"{out} already holds {what}.", "pick another --out or pass --overwrite.")


def _describe(report: dict) -> str:
    target = report.get("target")
    if isinstance(target, dict) and isinstance(target.get("value"), int | float):
        goal = f"target {target['value']:.0%} of the {target.get('kind')}"
    else:
        goal = f"target {target}"
    return f"{goal}, stop reason {report.get('stop_reason')}"


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CswapError(f"--out {out} is a file, not a directory.", "pick a directory path.")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise CswapError(
            f"--out {out} lies under {existing}, which is a file.", "pick a directory path."
        )
    try:  # os.access says yes to root even on a read-only file system: try for real
        handle, probe = tempfile.mkstemp(prefix=".cswap-write-test-", dir=existing)
    except OSError as error:
        raise CswapError(
            f"Cannot write to {existing} (for --out {out}): {error.strerror or error}.",
            "pick a directory you can write to.",
        ) from error
    os.close(handle)
    os.unlink(probe)


def check_model_object(model: object) -> None:
    if isinstance(model, str | Path):
        raise CswapError(
            f"model={str(model)!r} is a spec or path, not a torch module.",
            "build it first: cswap.load_spec(spec).model, or cswap.load(DIR) for a saved run.",
        )
    if not isinstance(model, nn.Module):
        raise CswapError(
            f"model is a {type(model).__name__}, not a torch.nn.Module.",
            "pass the classifier itself (a torch.nn.Module returning logits).",
        )


def check_data_sizes(per_class: int, validation_size: int | None) -> None:
    if per_class < 1:
        raise CswapError(
            f"--calib-per-class {per_class} draws no calibration image.", "use e.g. 50."
        )
    if validation_size is not None and validation_size < 1:
        raise CswapError(
            f"--validation-size {validation_size} leaves no image to validate each step on.",
            "use e.g. 2000, or leave it out to validate on the rest of the pool.",
        )
