"""The Python API: ``cswap.prune``, ``cswap.score``, ``cswap.load``.

The pipeline, stage by stage: data -> units -> intervene -> score -> categorize -> schedule ->
surgery -> evaluate -> report / export. This module only wires the stages together; the user's
model is never modified (the pipeline works on a copy).
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cswap.categorize import CRITICAL, Categorization
from cswap.checkpoint import CHECKPOINT, CHECKPOINT_SCORES
from cswap.compensation import Compensation
from cswap.criteria import CRITERIA
from cswap.data.batches import Batches
from cswap.data.preprocessing import Preprocessing
from cswap.errors import CswapError
from cswap.evaluate import (
    Evaluation,
    evaluate,
    output_divergence,
    per_class_counts,
    unit_evidence,
)
from cswap.export import export_onnx, save_model
from cswap.export import load as load_saved
from cswap.inputs import (
    check_export,
    check_memory,
    check_model_object,
    check_out_dir,
    peak_resident_gb,
    release_freed_memory,
)
from cswap.measure import paired_latency, predict
from cswap.reconstruct import propagated
from cswap.report import thumbnails, units_arrays, write_report
from cswap.schedule import (
    CANDIDATES_EXHAUSTED,
    ScheduleResult,
)
from cswap.session import (
    CausalRanker,
    Options,
    Session,
    make_options,
    make_ranker,
    measure_compensation,
    oneshot_result,
    prefix_reuse_path,
    prepare,
    run_progressive,
)
from cswap.surgery import check_equivalence, prune_and_fold
from cswap.timings import Timings, stage
from cswap.units import UnitSpace

log = logging.getLogger("cswap")
METHODS = ("cswap", *CRITERIA)
MODES = ("progressive", "oneshot")
COMPENSATIONS = ("none", "mean", "lstsq")
DEFAULT_COMPENSATE = "lstsq"
SHARDS = "checkpoint_shards"  # finished shards of Ray workers, while a run is unfinished
OUTPUT_FILES = (
    "report.json",
    "units.npz",
    "report.html",
    "steps.png",
    "layers.png",
    "xi.png",
    "model",
    "model.onnx",
)


@dataclass(frozen=True, eq=False)
class PruneResult:
    model: nn.Module
    report: dict
    preprocessing: Preprocessing | None = None
    base_spec: str | None = None
    plan: dict[str, list[int]] = field(default_factory=dict)
    example_input: torch.Tensor | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, out_dir: str | Path, *, export: Sequence[str] = (), overwrite: bool = False):
        """Write report.json, units.npz, report.html (+ PNGs) and model/ into ``out_dir``.

        Everything is written to a temporary directory first and moved into place at the end,
        so a failure leaves no half-written output; a finished run's checkpoint is removed.
        """
        out = Path(out_dir)
        check_out_dir(out, overwrite=overwrite)
        check_export(export)
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".cswap-", dir=out))
        try:
            write_report(staging, self.report, self.arrays)
            if self.example_input is not None:
                save_model(
                    staging / "model",
                    self.model,
                    base_spec=self.base_spec,
                    plan=self.plan,
                    example_shape=tuple(self.example_input.shape),
                    preprocessing=self.preprocessing,
                )
                if "onnx" in export:
                    export_onnx(self.model, self.example_input, staging / "model.onnx")
            for name in OUTPUT_FILES:  # a previous run's outputs must not linger beside ours
                stale = out / name
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink(missing_ok=True)
            for entry in staging.iterdir():
                target = out / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                entry.replace(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for name in (CHECKPOINT, CHECKPOINT_SCORES):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / SHARDS, ignore_errors=True)
        return out


def load(path: str | Path, base_model: nn.Module | None = None) -> nn.Module:
    """A pruned model saved by ``PruneResult.save`` / ``cswap prune --out``."""
    return load_saved(path, base_model)


# ----------------------------------------------------------------------------- input checks


# ----------------------------------------------------------------------------- the pipeline


def _check_choices(method: str, mode: str, compensate: str) -> None:
    for name, value, known in (
        ("method", method, METHODS),
        ("mode", mode, MODES),
        ("compensate", compensate, COMPENSATIONS),
    ):
        if value not in known:
            raise CswapError(f"Unknown {name} {value!r}.", f"use one of {', '.join(known)}.")


def _error_correction(prepared, opts, compensation, result, threshold: float):
    """The kept removal's consumers refitted on the pruned model's own inputs
    (``cswap.reconstruct``), kept when it moves the validation outputs less (mean KL from the
    unpruned model's) without taking validation accuracy below ``threshold`` (or below the
    plain refit's, when that is lower). Returns (compensation, result, report entry or None)."""
    if not (
        opts.error_correction
        and compensation is not None
        and compensation.mode == "lstsq"
        and result.removed
    ):
        return compensation, result, None
    with stage("error correction"):
        return _corrected(prepared, opts, compensation, result, threshold)


def _corrected(prepared, opts, compensation, result, threshold: float):
    started = time.perf_counter()
    corrected = propagated(
        prepared.model,
        prepared.space,
        result.removed,
        compensation,
        prepared.calibration_images,
        batch_size=opts.batch_size,
        device=prepared.device,
    )
    kl_without, kl = output_divergence(
        prepared.model,
        prepared.space,
        result.removed,
        prepared.validation,
        [compensation, corrected],
        device=prepared.device,
    )
    validation = prepared.validator(corrected, prefix_reuse=False)(result.removed)
    without = result.final_validation
    floor = min(threshold, without.accuracy)
    applied = kl <= kl_without and validation.accuracy >= floor
    note = {
        "applied": applied,
        "layers_refitted": len(corrected.fitted or {}),
        "layers_shifted": len(corrected.shifts or {}),
        "val_kl": round(kl, 6),
        "val_kl_without": round(kl_without, 6),
        "val_accuracy": round(validation.accuracy, 6),
        "val_accuracy_without": round(without.accuracy, 6),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("error correction: %s", note)
    if not applied:
        return compensation, result, note
    return corrected, replace(result, final_validation=validation), note


def _test_batches(test: Dataset | DataLoader | None, batch_size: int):
    if test is None:
        return None
    if isinstance(test, DataLoader):
        return test
    if len(test) == 0:
        return None
    return Batches(test, batch_size)


def _timed(function):
    """Time the run's stages (``cswap.timings``) into ``report["timings"]``."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        timings = Timings()
        with timings.activate():
            result = function(*args, **kwargs)
        result.report["timings"] = timings.to_dict()
        return result

    return wrapper


@_timed
def score(
    model: nn.Module,
    calibration: Dataset | DataLoader,
    *,
    validation: Dataset | DataLoader | None = None,
    example_input: torch.Tensor | None = None,
    label_free: bool = False,
    device: str | None = None,
    progress: bool = True,
    model_spec: str | None = None,
    compensate: str = DEFAULT_COMPENSATE,
    **options: Any,
) -> PruneResult:
    """Score and categorise every unit without pruning; the result's report holds the units.

    ``compensate="mean"`` scores the compensated interventions (what ``prune`` with the same
    setting removes); ``"none"`` the plain removal.
    """
    check_model_object(model)
    _check_choices("cswap", "progressive", compensate)
    opts = make_options(options)
    memory = check_memory(model, opts.max_memory_gb, copies=1)
    started = time.perf_counter()
    prepared, compensation = _prepare(
        model, calibration, validation, example_input, label_free, device, opts, compensate,
        split_validation=False,
    )  # fmt: skip
    ranker = make_ranker("cswap", "progressive", prepared, opts, progress, compensation)
    try:
        categorization = ranker.categorization(())
    finally:
        ranker.close()
    report = _base_report(prepared, opts, model_spec, "cswap", categorization)
    report |= {"mode": None, "compensation": _compensation_report(compensation, compensate, {})}
    report["units"] = _unit_entries(prepared.space, categorization, None, None, None)
    report["scoring_seconds"] = round(time.perf_counter() - started, 2)
    report["memory"] = memory | {"peak_rss_gb": peak_resident_gb()}
    return PruneResult(
        model=model, report=report, arrays=units_arrays(categorization), base_spec=model_spec
    )


@_timed
def prune(
    model: nn.Module,
    calibration: Dataset | DataLoader,
    *,
    validation: Dataset | DataLoader | None = None,
    test: Dataset | DataLoader | None = None,
    target_params: float | None = None,
    target_macs: float | None = None,
    tolerance: float = 0.005,
    method: str = "cswap",
    mode: str = "progressive",
    compensate: str = DEFAULT_COMPENSATE,
    example_input: torch.Tensor | None = None,
    label_free: bool = False,
    device: str | None = None,
    progress: bool = True,
    model_spec: str | None = None,
    preprocessing: Preprocessing | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` to the target; the user's model is left untouched.

    ``calibration`` / ``validation`` / ``test``: Datasets or DataLoaders of (image, label) (labels
    ignored with ``label_free=True``). ``validation=None`` splits a seeded, class-stratified
    ``validation_fraction`` (default half) off the calibration data. ``test`` (optional) gives the
    final before/after accuracy and is never used for a decision. ``target_params=R`` removes at
    least a fraction R of all parameters (``params_after <= (1 - R) * params_before``), likewise
    ``target_macs``; with both, the run stops at the first one reached.

    ``method``: ``cswap`` (causal, the default) or a baseline criterion (``l1``, ``l2``,
    ``taylor``, ``bn_scale``, ``fpgm``, ``lrp``, ``random``) ranking the same units. ``mode``:
    ``progressive`` (accept / roll back against the validation tolerance) or ``oneshot`` (cut the
    ranking to the target, no validation). ``compensate``: ``mean`` folds each removed unit's
    mean activation into the layers that read it (and scores the compensated interventions);
    ``lstsq`` refits the reading layers' remaining weights and bias by ridge least squares to
    reproduce their original outputs on the calibration data (the default; scoring measures
    the refitted removal); ``none`` removes plainly. ``options``: the named defaults of ``Options``.
    """
    check_model_object(model)
    _check_choices(method, mode, compensate)
    opts = make_options(options)
    schedule_config = opts.schedule_config(target_params, target_macs, tolerance)
    if resume and checkpoint_dir is not None:  # a finished run is never re-run over
        check_out_dir(checkpoint_dir, resume=True)
    memory = check_memory(model, opts.max_memory_gb, copies=2)
    started = time.perf_counter()
    prepared, compensation = _prepare(
        model, calibration, validation, example_input, label_free, device, opts, compensate
    )
    space = prepared.space

    validate = prepared.validator(
        compensation, prefix_reuse=opts.prefix_reuse, budget_mb=opts.memory_budget_mb
    )
    cost_kind = schedule_config.cost_kind
    shard_dir = Path(checkpoint_dir) / SHARDS if checkpoint_dir is not None else None
    if shard_dir is not None and not resume:  # shards of an earlier run must not be reused
        shutil.rmtree(shard_dir, ignore_errors=True)
    ranker = make_ranker(
        method, mode, prepared, opts, progress, compensation, cost_kind, shard_dir=shard_dir,
        first_cut=schedule_config.first_cut,
    )  # fmt: skip
    try:
        if mode == "oneshot":
            ranking = ranker(())
            result = oneshot_result(space, schedule_config, ranking, validate, prepared.baseline)
        else:
            result = run_progressive(
                prepared, opts, schedule_config, ranker, validate, progress=progress,
                checkpoint_dir=checkpoint_dir, resume=resume,
                fingerprint_extra={"method": method, "compensate": compensate},
            )  # fmt: skip
    finally:
        ranker.close()
    threshold = prepared.baseline.accuracy - schedule_config.tolerance
    compensation, result, correction = _error_correction(
        prepared, opts, compensation, result, threshold
    )
    scoring_seconds = time.perf_counter() - started
    with stage("surgery"):
        pruned, sinks = prune_and_fold(
            prepared.model.cpu(), space, list(result.removed), prepared.example_input, compensation
        )
        check_batch = prepared.calibration_images[: min(16, len(prepared.calibration_images))]
        difference = check_equivalence(
            prepared.model,
            pruned,
            space,
            list(result.removed),
            check_batch.cpu(),
            compensation=compensation,
        )
        release_freed_memory()  # surgery's temporaries
    test_batches = _test_batches(test, opts.batch_size)
    with stage("final evaluation"):
        before, after, measured = _final_measurements(prepared, pruned, test_batches, opts)
    first = ranker.rounds[0][1] if ranker.rounds else None
    report = _base_report(prepared, opts, model_spec, method, first)
    report |= _prune_summary(prepared, schedule_config, result, before, after, difference)
    report |= measured
    report["mode"] = mode
    report["compensation"] = _compensation_report(compensation, compensate, sinks)
    if compensate == "lstsq":
        report["compensation"]["error_correction"] = correction
    if compensate == "mean" and result.removed:
        report["compensation"]["border_gap_max_abs_logit"] = _border_gap(
            prepared, space, result.removed, compensation, check_batch
        )
    report["units"] = _unit_entries(space, first, ranker.rounds, result, opts, ranker.scores)
    report["critical_removed"] = sum(
        1 for entry in report["units"] if entry.get("category_at_removal") == "critical"
    )
    report["scoring_rounds"] = _scoring_rounds(ranker)
    hint = _exhausted_hint(result, ranker, opts)
    if hint:
        log.warning(hint)
        report["warnings"].append(hint)
    if prepared.calibration_info.get("note"):
        report["warnings"].append(prepared.calibration_info["note"])
    arrays = units_arrays(first) if first is not None else _score_arrays(ranker.scores)
    with stage("evidence"):
        report["evidence"], arrays["evidence_images"] = _evidence(
            prepared, report["units"], compensation, opts
        )
    report["total_seconds"] = round(time.perf_counter() - started, 2)
    report["schedule_seconds"] = round(scoring_seconds, 2)
    report["memory"] = memory | {"peak_rss_gb": peak_resident_gb()}
    return PruneResult(
        model=pruned,
        report=report,
        preprocessing=preprocessing,
        base_spec=model_spec,
        plan=space.removal_plan(result.removed),
        example_input=prepared.example_input,
        arrays=arrays,
    )


def _final_measurements(prepared: Session, pruned: nn.Module, test_batches, opts: Options):
    """Test accuracy (overall, per class), params and MACs of both models; validation per
    class; paired, interleaved latency at batch 1 and at a throughput batch."""
    device = prepared.device
    evaluations = [
        evaluate(model, test_batches, prepared.example_input, device=device, latency=False)
        for model in (prepared.model, pruned)
    ]
    validation_after, labels = predict(pruned.to(device), prepared.validation, device)
    with stage("paired latency"):
        latency = [
            paired_latency(
                prepared.model, pruned, prepared.example_input, batch=batch,
                threads=opts.latency_threads,
            )
            for batch in (1, opts.latency_batch)
        ]  # fmt: skip
    for model in (prepared.model, pruned):
        model.to("cpu").eval()
    prepared.model.to(device)
    measured = {
        "latency": [item.to_dict() for item in latency],
        "latency_ms_before": latency[0].before_ms,
        "latency_ms_after": latency[0].after_ms,
        "per_class": {
            "validation": _class_rows(
                per_class_counts(prepared.reference_predictions, labels),
                per_class_counts(validation_after, labels),
            ),
            "test": _class_rows(evaluations[0].per_class, evaluations[1].per_class),
        },
    }
    return evaluations[0], evaluations[1], measured


def _class_rows(before: dict, after: dict) -> list[dict]:
    """One row per class: accuracy (agreement, label-free) before and after, and images."""
    return [
        {
            "class": label,
            "images": total,
            "before": right / total,
            "after": after[label][0] / total,
        }
        for label, (right, total) in sorted(before.items())
    ]


EVIDENCE_CRITICAL = 4  # the most critical units shown with their images
EVIDENCE_REMOVED = 8  # removed units that cost accuracy, largest cost first


def _evidence(
    prepared: Session, units: list[dict], compensation, opts: Options
) -> tuple[list[dict], np.ndarray]:
    """The calibration images (those scoring ran on, ``score_images``) whose label probability
    fell most when each unit was removed, for the most critical units and the removed units
    that cost accuracy (xi < 0); ``image`` indexes the calibration set."""
    scored = [u for u in units if u.get("xi") is not None]
    critical = sorted((u for u in scored if u["category"] == CRITICAL), key=lambda u: u["xi"])
    costly = sorted(
        (u for u in scored if u.get("removed_at_step") is not None and u["xi"] < 0),
        key=lambda u: u["xi"],
    )
    chosen = [u["id"] for u in critical[:EVIDENCE_CRITICAL]]
    chosen += [u["id"] for u in costly[:EVIDENCE_REMOVED] if u["id"] not in chosen]
    if not chosen:
        return [], np.zeros((0, 1, 1, 1), dtype=np.uint8)
    subset = prepared.scoring_indices(opts.score_images, opts.seed)
    images, labels = prepared.calibration_subset(subset)
    found = unit_evidence(
        prepared.model, prepared.space, chosen, images, labels, compensation=compensation,
        device=prepared.device,
    )  # fmt: skip
    if subset is not None:  # positions in the subset -> indices in the calibration set
        found = {
            unit: [item | {"image": int(subset[item["image"]])} for item in items]
            for unit, items in found.items()
        }
    used = sorted({item["image"] for items in found.values() for item in items})
    slot = {image: position for position, image in enumerate(used)}
    entries = [
        {
            "unit": unit,
            "why": "critical" if unit in chosen[: len(critical[:EVIDENCE_CRITICAL])] else "removed",
            "images": [item | {"thumbnail": slot[item["image"]]} for item in items],
        }
        for unit, items in found.items()
    ]
    return entries, thumbnails(prepared.calibration_images[used].numpy())


def _prepare(
    model,
    calibration,
    validation,
    example_input,
    label_free,
    device,
    opts,
    compensate,
    split_validation: bool = True,
) -> tuple[Session, Compensation | None]:
    """The working session (data, units, baseline) and the compensation statistics."""
    with stage("prepare"):
        prepared = prepare(
            model,
            calibration,
            validation,
            example_input=example_input,
            label_free=label_free,
            device=device,
            options=opts,
            split_validation=split_validation,
        )
    with stage("compensation statistics"):
        compensation = measure_compensation(prepared, compensate, opts)
    return prepared, compensation


def _compensation_report(
    compensation: Compensation | None, compensate: str, sinks: dict[str, str]
) -> dict:
    if compensation is None:
        return {"mode": compensate}
    report = {
        "mode": compensate,
        "mean_images": compensation.images,
        "folded_into": dict(sorted(sinks.items())),
    }
    if compensation.mode == "lstsq":
        report["mean_instead_of_lstsq"] = dict(sorted((compensation.fallback or {}).items()))
    return report


def _border_gap(prepared, space, removed, compensation, batch) -> float:
    """Max |logit| difference between the fold and the ideal mean replacement (they differ only
    where a convolution zero-pads; 0 for Linear consumers)."""
    from cswap.intervene import removed as intervention

    model = prepared.model.cpu().eval()
    with torch.no_grad():
        with intervention(model, space, removed, compensation):
            folded = model(batch.cpu())
        with intervention(model, space, removed, compensation, ideal=True):
            ideal = model(batch.cpu())
    model.to(prepared.device)
    return float((folded - ideal).abs().max())


def _score_arrays(scores: np.ndarray | None) -> dict[str, np.ndarray]:
    if scores is None:
        return {}
    return {"unit_ids": np.arange(len(scores)), "scores": np.asarray(scores, dtype=np.float64)}


# ----------------------------------------------------------------------------- checkpoints


# ----------------------------------------------------------------------------- report


def _base_report(prepared: Session, options: Options, model_spec, method, first) -> dict:
    return {
        "report_version": 1,
        "model": model_spec or type(prepared.model).__name__,
        "method": method,
        "settings": options.to_dict(),
        "calibration": prepared.calibration_info,
        # only causal scoring reruns suffixes; tracing is not spent on the baselines
        "prefix_reuse": prefix_reuse_path(prepared, options) if method == "cswap" else None,
        "categories": first.counts() if first is not None else None,
        "category_test": first.config.to_dict() if first is not None else None,
        "units_total": len(prepared.space),
        "groups": [
            {"id": g.id, "root": g.root, "kind": g.kind, "size": g.size, "layers": list(g.layers)}
            for g in prepared.space.groups
        ],
        "excluded_groups": [
            {"root": g.root, "size": g.size, "reason": g.reason} for g in prepared.space.excluded
        ],
        "protected_layers": list(prepared.space.protected_layers),
        "params_before": prepared.space.params_total,
        "macs_before": prepared.space.macs_total,
        "val_accuracy_before": prepared.baseline.accuracy,
    }


def _scoring_rounds(ranker) -> list[dict]:
    """Per scoring round: units removed before it, its categories, and how many units it
    scored exactly (the rest estimated, cswap.banded); rounds resumed from a checkpoint have
    no such note."""
    notes = list(ranker.round_notes)
    notes = [{}] * (len(ranker.rounds) - len(notes)) + notes
    return [
        {"removed_before": removed_before, "categories": cat.counts()} | note
        for (removed_before, cat), note in zip(ranker.rounds, notes, strict=True)
    ]


def _exhausted_hint(result: ScheduleResult, ranker, options: Options) -> str | None:
    """Why a C-SWAP run ran out of candidates, and what lifts it: the hypothesis test marks more
    units critical as the model shrinks (their effects grow), and critical units are not tried."""
    if result.stop_reason != CANDIDATES_EXHAUSTED or options.allow_critical:
        return None
    if not isinstance(ranker, CausalRanker) or not ranker.rounds:
        return None
    counts = ranker.rounds[-1][1].counts()
    if not counts["critical"]:
        return None
    return (
        f"The candidates ran out before the target: the last scoring found {counts['critical']} "
        f"of the {sum(counts.values())} remaining units critical (margin={options.margin}), and "
        "critical units are never tried (--protect-critical). Drop it (allow_critical=True, the "
        "default) to let the validated loop try them last, or raise the margin (--margin)."
    )


def _prune_summary(
    prepared,
    config,
    result: ScheduleResult,
    before: Evaluation,
    after: Evaluation,
    difference: float,
) -> dict:
    target = (
        {"kind": "params", "value": config.target_params}
        if config.target_params is not None
        else {"kind": "macs", "value": config.target_macs}
    )
    warnings = []
    noisy = [s for s in result.steps if s.paired_se > config.tolerance]
    if noisy:
        warnings.append(
            f"{len(noisy)} step(s) had a paired standard error above the tolerance "
            f"({config.tolerance}): the validation set is too small to resolve it; use more "
            "validation images or a larger tolerance."
        )
    reductions = {
        "params": 1.0 - after.params / before.params,
        "macs": 1.0 - after.macs / before.macs if before.macs else 0.0,
    }
    return {
        "target": target,
        "targets": {"params": config.target_params, "macs": config.target_macs},
        "target_status": _target_status(config, reductions, result.stop_reason),
        "tolerance": config.tolerance,
        "schedule": config.to_dict(),
        "stop_reason": result.stop_reason,
        "params_after": after.params,
        "params_after_accounted": result.params_after,
        "macs_before": before.macs,
        "macs_after": after.macs,
        "params_reduction": 1.0 - after.params / before.params,
        "macs_reduction": 1.0 - after.macs / before.macs if before.macs else 0.0,
        "latency_ms_before": before.latency_ms,
        "latency_ms_after": after.latency_ms,
        "val_accuracy_after": result.final_validation.accuracy,
        "test_accuracy_before": before.accuracy,
        "test_accuracy_after": after.accuracy,
        "test_images": before.images,
        "units_removed": len(result.removed),
        "units_failed": len(result.failed),
        "equivalence_max_abs_diff": difference,
        "steps": [step.to_dict() for step in result.steps],
        "warnings": warnings,
    }


def _target_status(config, reductions: dict[str, float], stop_reason: str) -> list[dict]:
    """Each target given, where the run stands on it, and which one stopped the run."""
    status = []
    for kind, goal in (("params", config.target_params), ("macs", config.target_macs)):
        if goal is None:
            continue
        met = reductions[kind] >= goal - 1e-9
        status.append(
            {
                "kind": kind,
                "goal": goal,
                "removed": round(reductions[kind], 6),
                "met": met,
                "stopped_the_run": met and stop_reason == "target_reached",
            }
        )
    return status


def _finite(value) -> float | None:
    """A JSON-ready number: None for NaN (not measured, e.g. an estimated unit's xi) or inf."""
    value = float(value)
    return value if np.isfinite(value) else None


def _scores_at_removal(rounds, result: ScheduleResult) -> dict[int, tuple[float, str]]:
    """xi and category of each removed unit in the latest scoring before its removal."""
    at_removal: dict[int, tuple[float, str]] = {}
    removed: set[int] = set()
    for step in result.steps:
        if not step.accepted:
            continue
        new = [unit for unit in step.units if unit not in removed]  # a probe lists its prefix
        latest = [cat for count, cat in rounds if count <= len(removed)]
        if latest:
            lookup = {int(u): i for i, u in enumerate(latest[-1].unit_ids)}
            for unit in new:
                row = lookup.get(unit)
                if row is not None:
                    xi = _finite(latest[-1].xi[row])
                    at_removal[unit] = (xi, str(latest[-1].categories[row]))
        removed.update(new)
    return at_removal


def _unit_entries(
    space: UnitSpace,
    first: Categorization | None,
    rounds,
    result: ScheduleResult | None,
    options: Options | None,
    scores: np.ndarray | None = None,
) -> list[dict]:
    position = {} if first is None else {int(u): i for i, u in enumerate(first.unit_ids)}
    at_removal = _scores_at_removal(rounds, result) if result is not None else {}
    failed = set(result.failed) if result is not None else set()
    latest_category: dict[int, str] = {}
    for _, categorization in rounds or []:
        latest_category |= categorization.category_of()
    gone = set(result.removed) if result is not None else set()
    kept_per_group = {
        group.id: sum(1 for unit in group.unit_ids if unit not in gone) for group in space.groups
    }
    entries = []
    for unit in space.units:
        row = position.get(unit.id)
        entry = unit.to_dict()
        entry["xi"] = None if row is None else _finite(first.xi[row])
        entry["category"] = None if row is None else str(first.categories[row])
        for name in ("log_ratio", "kl", "joint"):  # joint: KL with its group's earlier units
            values = None if first is None else getattr(first, name)
            entry[name] = None if values is None or row is None else _finite(values[row])
        if first is None and scores is not None:
            entry["score"] = float(scores[unit.id])
        entry["removed_at_step"] = None
        if result is not None:
            step = result.removed_at_step.get(unit.id)
            entry["removed_at_step"] = step
            entry["xi_at_removal"], entry["category_at_removal"] = at_removal.get(
                unit.id, (None, None)
            )
            latest = latest_category.get(unit.id, entry["category"])
            if step is not None:
                entry["kept_reason"] = None
            elif unit.id in failed:
                entry["kept_reason"] = "failed_tolerance"
            elif latest == "critical" and not options.allow_critical:
                entry["kept_reason"] = "critical"
            elif kept_per_group[unit.group] <= options.min_keep:
                entry["kept_reason"] = "group_minimum"
            else:
                entry["kept_reason"] = "not_needed"
        entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- from specs


def load_spec(spec: str, *, weights: str | Path | None = None, input_size: int | None = None):
    """A model spec, or the directory of a saved pruned model, as a ``LoadedModel``;
    ``input_size``: square input in pixels instead of the model's own (its resize scaled along)."""
    from dataclasses import replace

    if input_size is not None and (isinstance(input_size, bool) or not 8 <= input_size <= 4096):
        raise CswapError(
            f"input_size={input_size!r} is not a size in pixels.",
            "pass the square input size the model accepts, e.g. --input-size 224.",
        )
    loaded = _load_spec(spec, weights)
    if input_size is None:
        return loaded
    return replace(loaded, preprocessing=loaded.preprocessing.with_input_size(input_size))


def _load_spec(spec: str, weights: str | Path | None):
    from cswap.export import is_saved_model, read_spec
    from cswap.models import LoadedModel, load_model

    if is_saved_model(spec):
        _, saved = read_spec(spec)
        model = load_saved(spec)
        if saved.get("preprocessing"):
            preprocessing = Preprocessing.from_dict(saved["preprocessing"])
        else:
            raise CswapError(
                f"{spec} does not record the preprocessing its model expects.",
                "load it in Python with cswap.load() and pass Datasets to cswap.prune().",
            )
        names = tuple(saved["class_names"]) if saved.get("class_names") else None
        return LoadedModel(spec, "saved", model, preprocessing, names)
    return load_model(spec, weights=weights)


@dataclass(frozen=True)
class DataSelection:
    """The calibration / validation / test sets drawn for a model from a data spec."""

    calibration: Dataset
    validation: Dataset
    test: Dataset | None
    summary: dict


def select_data(
    loaded,
    data_spec: str,
    *,
    per_class: int = 50,
    validation_size: int | None = None,
    label_free: bool = False,
    correct_only: bool = True,
    seed: int = 0,
    data_dir: str | Path | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> DataSelection:
    from torch.utils.data import Subset

    from cswap.data.calibration import LabeledSubset, draw_calibration, model_predictions
    from cswap.data.spec import resolve_data
    from cswap.units import classifier_layers

    source = resolve_data(data_spec, loaded.preprocessing, data_dir=data_dir)
    if len(source.pool):  # the model must run on these images and output class scores
        classifier_layers(loaded.model.cpu(), source.dataset[int(source.pool[0])][0][None])
    model = loaded.model.to(device)
    predictions = model_predictions(
        model, source.dataset, source.pool, batch_size=batch_size, device=device
    )
    split = draw_calibration(
        source.pool,
        None if label_free else source.pool_labels,
        per_class=per_class,
        seed=seed,
        predictions=predictions,
        correct_only=correct_only,
        label_free=label_free,
        validation_size=validation_size,
    )
    test = None
    if source.test_dataset is not None and len(source.test):
        test = Subset(source.test_dataset, source.test.tolist())
    return DataSelection(
        calibration=LabeledSubset(source.dataset, split.calibration, split.calibration_labels),
        validation=LabeledSubset(source.dataset, split.validation, split.validation_labels),
        test=test,
        summary=split.summary() | {"data": source.describe()},
    )
