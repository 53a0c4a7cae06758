"""The Python API: ``cswap.prune``, ``cswap.score``, ``cswap.load``.

The pipeline, stage by stage: data -> units -> intervene -> score -> categorize -> schedule ->
surgery -> evaluate -> report / export. This module only wires the stages together; the user's
model is never modified (the pipeline works on a copy).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cswap.adapters import canonicalize
from cswap.categorize import Categorization, CategoryConfig, Ranking, categorize, causal_ranking
from cswap.compensation import Compensation, measure_means
from cswap.criteria import CRITERIA, criterion_scores, ranking_from_scores
from cswap.data.batches import Batches
from cswap.data.preprocessing import Preprocessing
from cswap.devices import resolve_device
from cswap.errors import CswapError
from cswap.evaluate import Evaluation, evaluate, masked_validation
from cswap.export import export_onnx, save_model
from cswap.export import load as load_saved
from cswap.fastscore import FastConfig, fast_categorize
from cswap.measure import predict
from cswap.report import units_arrays, write_report
from cswap.schedule import (
    CANDIDATES_EXHAUSTED,
    TARGET_REACHED,
    ScheduleConfig,
    ScheduleResult,
    ScheduleState,
    Step,
    Validation,
    oneshot,
    run_schedule,
)
from cswap.scoring import causal_effects
from cswap.surgery import check_equivalence, prune_and_fold
from cswap.units import UnitSpace, classifier_layers, discover_units

log = logging.getLogger("cswap")
METHODS = ("cswap", *CRITERIA)
MODES = ("progressive", "oneshot")
COMPENSATIONS = ("none", "mean", "lstsq")
DEFAULT_COMPENSATE = "mean"
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
CHECKPOINT = "checkpoint.json"
CHECKPOINT_SCORES = "checkpoint_scores.npz"


@dataclass(frozen=True)
class Options:
    """Every METHOD.md default, as a named option (API keyword and CLI flag)."""

    margin: float = 0.001
    stat_test: str = "t"
    alpha: float = 0.05
    correction: str = "holm"
    correction_scope: str = "classes"
    min_class_size: int = 5
    correct_only: bool = True
    allow_critical: bool = False
    ignored_layers: tuple[str, ...] = ()
    round_to: int = 1
    min_keep: int = 1
    initial_chunk: float = 0.01
    rescore_every: float = 0.10
    patience: int = 8
    max_steps: int = 10_000
    seed: int = 0
    batch_size: int = 256
    validation_fraction: float = 0.5  # of the calibration data, when no validation is given
    latency_threads: int = 1
    milestones: tuple[float, ...] = ()  # params fractions the progressive loop must stop at
    # scoring speed (METHOD.md "Cost"): exact levers on, approximate ones off by default
    prefix_reuse: bool = True
    units_per_pass: int | None = None  # None: as many as memory_budget_mb allows
    memory_budget_mb: float = 1024.0
    sequential_looks: tuple[float, ...] = ()  # e.g. (0.25, 0.5, 0.75); () = fixed-n tests
    early_alpha_share: float = 0.25
    futility: float = 0.05
    screen: bool = False
    screen_factor: float = 4.0

    def fast_config(self) -> FastConfig:
        return FastConfig(
            looks=self.sequential_looks,
            early_alpha_share=self.early_alpha_share,
            futility=self.futility,
            screen=self.screen,
            screen_factor=self.screen_factor,
        )

    def schedule_config(
        self, target_params: float | None, target_macs: float | None, tolerance: float
    ) -> ScheduleConfig:
        return ScheduleConfig(
            target_params=target_params,
            target_macs=target_macs,
            tolerance=tolerance,
            initial_chunk=self.initial_chunk,
            rescore_every=self.rescore_every,
            round_to=self.round_to,
            min_keep=self.min_keep,
            patience=self.patience,
            max_steps=self.max_steps,
            milestones=self.milestones,
        )

    def category_config(self) -> CategoryConfig:
        return CategoryConfig(
            margin=self.margin,
            test=self.stat_test,
            alpha=self.alpha,
            correction=self.correction,
            correction_scope=self.correction_scope,
            min_class_size=self.min_class_size,
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
        _check_out_dir(out, overwrite)
        unknown = sorted(set(export) - {"onnx"})
        if unknown:
            raise CswapError(f"Unknown export format(s) {unknown}.", "use --export onnx.")
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
        return out


def load(path: str | Path, base_model: nn.Module | None = None) -> nn.Module:
    """A pruned model saved by ``PruneResult.save`` / ``cswap prune --out``."""
    return load_saved(path, base_model)


# ----------------------------------------------------------------------------- input checks


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if (out / "report.json").exists() and not overwrite:
        raise CswapError(
            f"{out} already holds a report.", "pick another --out or pass --overwrite."
        )


def _check_finite(model: nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CswapError(
                f"The model has NaN or infinite values in {name}.",
                "fix or reload the weights before pruning.",
            )


def _tensors(data: Dataset | DataLoader, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    images, labels = [], []
    for batch in loader:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise CswapError(
                "Calibration/validation data must yield (image, label) pairs.",
                "wrap unlabeled images with dummy labels and use label_free=True.",
            )
        images.append(torch.as_tensor(batch[0]))
        labels.append(torch.as_tensor(batch[1], dtype=torch.long).view(-1))
    if not images:
        raise CswapError(
            "The calibration data is empty.", "supply at least a few images per class."
        )
    return torch.cat(images), torch.cat(labels)


def _split_validation(
    images: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded per-class split: ``fraction`` of each class to validation, the rest calibration."""
    rng = np.random.default_rng(seed)
    calibration, validation = [], []
    numpy_labels = labels.numpy()
    for label in np.unique(numpy_labels):
        members = rng.permutation(np.flatnonzero(numpy_labels == label))
        cut = round(len(members) * fraction)
        validation += members[:cut].tolist()
        calibration += members[cut:].tolist()
    cal, val = torch.tensor(sorted(calibration)), torch.tensor(sorted(validation))
    if len(cal) == 0 or len(val) == 0:
        raise CswapError(
            "Too few images to split calibration data into calibration and validation.",
            "supply more images or a separate validation set.",
        )
    return images[cal], labels[cal], images[val], labels[val]


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class _Prepared:
    model: nn.Module
    device: str
    space: UnitSpace
    calibration_images: torch.Tensor
    calibration_labels: torch.Tensor
    validation: list[tuple[torch.Tensor, torch.Tensor]]
    reference_predictions: torch.Tensor
    baseline: Validation
    example_input: torch.Tensor
    num_classes: int
    calibration_info: dict


def _prepare(
    model: nn.Module,
    calibration: Dataset | DataLoader,
    validation: Dataset | DataLoader | None,
    *,
    example_input: torch.Tensor | None,
    label_free: bool,
    device: str | None,
    options: Options,
    split_validation: bool = True,
) -> _Prepared:
    _check_finite(model)
    device = resolve_device(device)
    working = canonicalize(copy.deepcopy(model)).to(device).eval()
    images, labels = _tensors(calibration, options.batch_size)
    if validation is None and not split_validation:
        val_images, val_labels = images, labels
        validation_source = "the calibration data itself (scoring only)"
    elif validation is None:
        images, labels, val_images, val_labels = _split_validation(
            images, labels, options.validation_fraction, options.seed
        )
        validation_source = f"a seeded {options.validation_fraction:.0%} of the calibration data"
    else:
        val_images, val_labels = _tensors(validation, options.batch_size)
        validation_source = "given"
    example = images[:1] if example_input is None else example_input[:1]
    _, num_classes = classifier_layers(working.cpu(), example.cpu())
    working.to(device)
    if not label_free:
        for name, values in (("calibration", labels), ("validation", val_labels)):
            if values.min() < 0 or values.max() >= num_classes:
                raise CswapError(
                    f"The {name} labels span {int(values.min())}..{int(values.max())}, but the "
                    f"model has {num_classes} classes.",
                    "map the labels to the model's class indices, or use label_free=True.",
                )
    calibration_predictions, _ = predict(
        working,
        [
            (images[i : i + options.batch_size], labels[i : i + options.batch_size])
            for i in range(0, len(images), options.batch_size)
        ],
        device,
    )
    validation_batches = [
        (val_images[i : i + options.batch_size], val_labels[i : i + options.batch_size])
        for i in range(0, len(val_images), options.batch_size)
    ]
    reference, _ = predict(working, validation_batches, device)
    if label_free:
        labels = calibration_predictions
        val_labels = reference
        validation_batches = [
            (val_images[i : i + options.batch_size], val_labels[i : i + options.batch_size])
            for i in range(0, len(val_images), options.batch_size)
        ]
    dropped = 0
    if options.correct_only and not label_free:
        keep = calibration_predictions == labels
        dropped = int((~keep).sum())
        images, labels = images[keep], labels[keep]
    if len(torch.unique(labels)) < 2:
        raise CswapError(
            "The calibration set holds fewer than two classes: class-conditional tests need two.",
            "supply images of several classes.",
        )
    space = discover_units(working.cpu(), example.cpu(), ignored_layers=options.ignored_layers)
    working.to(device)
    if len(space) == 0:
        raise CswapError(
            "The model has no prunable units.",
            "check ignored_layers; excluded groups and why: "
            + "; ".join(f"{g.root}: {g.reason}" for g in space.excluded),
        )
    accuracy = float((reference == val_labels).float().mean())
    info = {
        "calibration_size": len(labels),
        "calibration_per_class": {
            str(int(k)): int(v)
            for k, v in zip(*np.unique(labels.numpy(), return_counts=True), strict=True)
        },
        "misclassified_dropped": dropped,
        "validation_size": len(val_labels),
        "validation_source": validation_source,
        "label_free": label_free,
        "correct_only": options.correct_only and not label_free,
    }
    return _Prepared(
        model=working,
        device=device,
        space=space,
        calibration_images=images,
        calibration_labels=labels,
        validation=validation_batches,
        reference_predictions=reference,
        baseline=Validation(accuracy=accuracy, paired_se=0.0, images=len(val_labels)),
        example_input=example.cpu(),
        num_classes=num_classes,
        calibration_info=info,
    )


class _CausalRanker:
    """Scores the remaining units on the current (masked) model and orders them (C-SWAP).

    With a compensation, the interventions are the compensated ones. ``allow_critical``: rank the
    critical units too (last, by |xi|): a one-shot cut must be able to reach any target.
    """

    method = "cswap"

    def __init__(
        self,
        prepared: _Prepared,
        options: Options,
        progress: bool,
        compensation: Compensation | None = None,
        allow_critical: bool | None = None,
    ) -> None:
        self.prepared = prepared
        self.options = options
        self.progress = progress
        self.compensation = compensation
        self.allow_critical = options.allow_critical if allow_critical is None else allow_critical
        self.rounds: list[tuple[int, Categorization]] = []  # (units removed before, result)
        self.preset: Ranking | None = None
        self.scores: np.ndarray | None = None

    def categorization(self, removed: tuple[int, ...]) -> Categorization:
        prepared = self.prepared
        options = self.options
        remaining = len(prepared.space) - len(removed)
        compensation = self.compensation and self.compensation.scoring_view()
        scoring = {
            "batch_size": options.batch_size,
            "device": prepared.device,
            "prefix_reuse": options.prefix_reuse,
            "units_per_pass": options.units_per_pass,
            "memory_budget_mb": options.memory_budget_mb,
        }
        fast = options.fast_config()
        with _progress_bar(remaining, "scoring units", self.progress) as bar:
            if fast.looks or fast.screen:
                result = fast_categorize(
                    prepared.model,
                    prepared.space,
                    prepared.calibration_images,
                    prepared.calibration_labels,
                    options.category_config(),
                    fast,
                    already_removed=removed,
                    compensation=compensation,
                    seed=options.seed,
                    progress=bar.update,
                    **scoring,
                ).categorization
            else:
                effects = causal_effects(
                    prepared.model,
                    prepared.space,
                    prepared.calibration_images,
                    prepared.calibration_labels,
                    already_removed=removed,
                    compensation=compensation,
                    progress=bar.update,
                    **scoring,
                )
                result = categorize(effects, options.category_config())
        self.rounds.append((len(removed), result))
        log.info("scored %d units after %d removed: %s", remaining, len(removed), result.counts())
        return result

    def __call__(self, removed: tuple[int, ...]) -> Ranking:
        if self.preset is not None:
            ranking, self.preset = self.preset, None
            return ranking
        categorization = self.categorization(removed)
        return causal_ranking(categorization, allow_critical=self.allow_critical)


class _CriterionRanker:
    """A baseline criterion: scores every unit once, on the unpruned model; ranks the rest."""

    def __init__(self, method: str, prepared: _Prepared, options: Options) -> None:
        self.method = method
        self.rounds: list[tuple[int, Categorization]] = []
        self.preset: Ranking | None = None
        self.scores = criterion_scores(
            method,
            prepared.model,
            prepared.space,
            images=prepared.calibration_images,
            labels=prepared.calibration_labels,
            seed=options.seed,
            batch_size=options.batch_size,
            device=prepared.device,
        )

    def __call__(self, removed: tuple[int, ...]) -> Ranking:
        if self.preset is not None:
            ranking, self.preset = self.preset, None
            return ranking
        return ranking_from_scores(self.scores, removed)


def _ranker(
    method: str,
    mode: str,
    prepared: _Prepared,
    options: Options,
    progress: bool,
    compensation: Compensation | None,
):
    if method == "cswap":
        allow = True if mode == "oneshot" else None
        return _CausalRanker(prepared, options, progress, compensation, allow_critical=allow)
    return _CriterionRanker(method, prepared, options)


def _compensation(prepared: _Prepared, compensate: str, options: Options) -> Compensation | None:
    if compensate == "none":
        return None
    return measure_means(
        prepared.model,
        prepared.space,
        prepared.calibration_images,
        batch_size=options.batch_size,
        device=prepared.device,
        mode=compensate,
    )


def _check_choices(method: str, mode: str, compensate: str) -> None:
    for name, value, known in (
        ("method", method, METHODS),
        ("mode", mode, MODES),
        ("compensate", compensate, COMPENSATIONS),
    ):
        if value not in known:
            raise CswapError(f"Unknown {name} {value!r}.", f"use one of {', '.join(known)}.")


def oneshot_result(
    space: UnitSpace,
    config: ScheduleConfig,
    ranking: Ranking,
    validate,
    baseline: Validation,
) -> ScheduleResult:
    """Cut ``ranking`` to the target in one go (no accept / roll-back), as a schedule result."""
    removed, reached = oneshot(space, config, ranking)
    return ScheduleResult(
        removed=removed,
        removed_at_step=dict.fromkeys(removed, 0),
        failed=(),
        steps=(),
        stop_reason=TARGET_REACHED if reached else CANDIDATES_EXHAUSTED,
        params_before=space.params_total,
        params_after=space.params_after(removed),
        macs_before=space.macs_total,
        macs_after=space.macs_after(removed),
        baseline_accuracy=baseline.accuracy,
        final_validation=validate(removed) if removed else baseline,
    )


class _NullBar:
    def update(self, _count: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress_bar(total: int, description: str, enabled: bool, unit: str = "unit"):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total or None, desc=description, leave=False, unit=unit)


def _options(overrides: dict[str, Any]) -> Options:
    known = set(Options.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise CswapError(f"Unknown option(s) {unknown}.", f"known options: {sorted(known)}.")
    for name in ("ignored_layers", "milestones", "sequential_looks"):
        if name in overrides:
            overrides = overrides | {name: tuple(overrides[name])}
    options = Options(**overrides)
    options.category_config()  # validates the test settings
    try:
        options.fast_config()
    except ValueError as error:
        raise CswapError(str(error), "see cswap prune --help for the ranges.") from error
    for name in ("batch_size", "latency_threads", "min_class_size"):
        if getattr(options, name) < 1:
            raise CswapError(f"{name} must be >= 1, got {getattr(options, name)}.", "use e.g. 1.")
    if not 0.0 < options.validation_fraction < 1.0:
        raise CswapError("validation_fraction must be in (0, 1).", "use e.g. 0.5.")
    return options


def _test_batches(test: Dataset | DataLoader | None, batch_size: int):
    if test is None:
        return None
    if isinstance(test, DataLoader):
        return test
    if len(test) == 0:
        return None
    return Batches(test, batch_size)


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
    _check_choices("cswap", "progressive", compensate)
    opts = _options(options)
    started = time.perf_counter()
    prepared = _prepare(
        model,
        calibration,
        validation,
        example_input=example_input,
        label_free=label_free,
        device=device,
        options=opts,
        split_validation=False,
    )
    compensation = _compensation(prepared, compensate, opts)
    ranker = _CausalRanker(prepared, opts, progress, compensation)
    categorization = ranker.categorization(())
    report = _base_report(prepared, opts, model_spec, "cswap", categorization)
    report |= {"mode": None, "compensation": _compensation_report(compensation, compensate, {})}
    report["units"] = _unit_entries(prepared.space, categorization, None, None, None)
    report["scoring_seconds"] = round(time.perf_counter() - started, 2)
    return PruneResult(
        model=model, report=report, arrays=units_arrays(categorization), base_spec=model_spec
    )


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
    reproduce their original outputs on the calibration data (scoring uses the mean
    replacement); ``none`` removes plainly. ``options``: the named defaults of ``Options``.
    """
    _check_choices(method, mode, compensate)
    opts = _options(options)
    schedule_config = opts.schedule_config(target_params, target_macs, tolerance)
    started = time.perf_counter()
    prepared = _prepare(
        model,
        calibration,
        validation,
        example_input=example_input,
        label_free=label_free,
        device=device,
        options=opts,
    )
    compensation = _compensation(prepared, compensate, opts)
    space = prepared.space

    def validate(units: tuple[int, ...]) -> Validation:
        return masked_validation(
            prepared.model,
            space,
            units,
            prepared.validation,
            prepared.reference_predictions,
            device=prepared.device,
            compensation=compensation,
        )

    ranker = _ranker(method, mode, prepared, opts, progress, compensation)
    if mode == "oneshot":
        result = oneshot_result(space, schedule_config, ranker(()), validate, prepared.baseline)
    else:
        result = _progressive(
            prepared,
            opts,
            schedule_config,
            ranker,
            validate,
            progress=progress,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            fingerprint_extra={"method": method, "compensate": compensate},
        )
    scoring_seconds = time.perf_counter() - started
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
    test_batches = _test_batches(test, opts.batch_size)
    before = evaluate(
        prepared.model,
        test_batches,
        prepared.example_input,
        device=prepared.device,
        latency_threads=opts.latency_threads,
    )
    after = evaluate(
        pruned,
        test_batches,
        prepared.example_input,
        device=prepared.device,
        latency_threads=opts.latency_threads,
    )
    pruned.to("cpu").eval()
    first = ranker.rounds[0][1] if ranker.rounds else None
    report = _base_report(prepared, opts, model_spec, method, first)
    report |= _prune_summary(prepared, schedule_config, result, before, after, difference)
    report["mode"] = mode
    report["compensation"] = _compensation_report(compensation, compensate, sinks)
    if compensate == "mean" and result.removed:
        report["compensation"]["border_gap_max_abs_logit"] = _border_gap(
            prepared, space, result.removed, compensation, check_batch
        )
    report["units"] = _unit_entries(space, first, ranker.rounds, result, opts, ranker.scores)
    report["scoring_rounds"] = [
        {"removed_before": removed_before, "categories": cat.counts()}
        for removed_before, cat in ranker.rounds
    ]
    report["total_seconds"] = round(time.perf_counter() - started, 2)
    report["schedule_seconds"] = round(scoring_seconds, 2)
    return PruneResult(
        model=pruned,
        report=report,
        preprocessing=preprocessing,
        base_spec=model_spec,
        plan=space.removal_plan(result.removed),
        example_input=prepared.example_input,
        arrays=units_arrays(first) if first is not None else _score_arrays(ranker.scores),
    )


def _progressive(
    prepared: _Prepared,
    opts: Options,
    schedule_config: ScheduleConfig,
    ranker,
    validate,
    *,
    progress: bool,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint_extra: dict | None = None,
    on_accept=None,
) -> ScheduleResult:
    """The accept / roll-back loop, checkpointed after the first ranking and every acceptance."""
    space = prepared.space
    checkpoint = None
    if checkpoint_dir:
        fingerprint = _fingerprint(prepared, opts, schedule_config)
        fingerprint |= fingerprint_extra or {}
        checkpoint = _Checkpoint(Path(checkpoint_dir), fingerprint)
    state = None
    if checkpoint is not None and resume:
        state, preset, rounds = checkpoint.load(opts.category_config())
        ranker.preset = preset
        ranker.rounds.extend(rounds)
    steps_bar = _progress_bar(0, "pruning steps", progress, unit="step")
    last_ranking: list[Ranking] = []

    def on_step(current: ScheduleState, step: Step, ranking: Ranking | None) -> None:
        steps_bar.update(1)
        mark = "accepted" if step.accepted else "rolled back"
        log.info(
            "step %d: %d units %s, params %d, val acc %.4f (paired s.e. %.4f)",
            step.index,
            len(step.units),
            mark,
            step.params,
            step.val_accuracy,
            step.paired_se,
        )
        if ranking is not None:
            last_ranking[0] = ranking
        if step.accepted and on_accept is not None:
            on_accept(current)
        if checkpoint is not None and step.accepted:
            checkpoint.save(current, last_ranking[0], ranker.rounds)

    first_ranking = ranker(state.removed if state else ())
    last_ranking.append(first_ranking)
    ranker.preset = first_ranking
    if checkpoint is not None and state is None:
        # the first scoring is the expensive part: keep it even if no step is ever accepted
        initial = ScheduleState(
            chunk_params=schedule_config.initial_chunk * max(1, space.prunable_params),
            params_at_last_ranking=space.params_total,
        )
        checkpoint.save(initial, first_ranking, ranker.rounds)
        state = initial
    with steps_bar:
        return run_schedule(
            space,
            schedule_config,
            ranker,
            validate,
            baseline=prepared.baseline,
            state=state,
            on_step=on_step,
        )


def _compensation_report(
    compensation: Compensation | None, compensate: str, sinks: dict[str, str]
) -> dict:
    if compensation is None:
        return {"mode": compensate}
    return {
        "mode": compensate,
        "mean_images": compensation.images,
        "folded_into": dict(sorted(sinks.items())),
    }


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


def _fingerprint(prepared: _Prepared, options: Options, config: ScheduleConfig) -> dict:
    """What a checkpoint must match to be resumed: the model's weights, the data, the settings."""
    digest = hashlib.sha256()
    for name, tensor in prepared.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    data = hashlib.sha256()
    for tensor in (prepared.calibration_images, prepared.calibration_labels):
        data.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    data.update(prepared.reference_predictions.numpy().tobytes())
    return {
        "weights_sha256": digest.hexdigest(),
        "data_sha256": data.hexdigest(),
        "units": len(prepared.space),
        "calibration": prepared.calibration_info,
        "options": _jsonable(options),
        "schedule": config.to_dict(),
    }


def _categorization_arrays(prefix: str, categorization: Categorization) -> dict[str, np.ndarray]:
    return {f"{prefix}{key}": value for key, value in units_arrays(categorization).items()}


class _Checkpoint:
    """Accepted steps, every scoring round and the ranking in use: ``resume`` continues exactly."""

    def __init__(self, directory: Path, fingerprint: dict) -> None:
        self.directory = directory
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples: lists)

    def save(
        self,
        state: ScheduleState,
        ranking: Ranking,
        rounds: list[tuple[int, Categorization]],
    ) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {
            "fingerprint": self.fingerprint,
            "state": {
                "removed": list(state.removed),
                "failed": list(state.failed),
                "steps": [step.to_dict() for step in state.steps],
                "chunk_params": state.chunk_params,
                "params_at_last_ranking": state.params_at_last_ranking,
                "consecutive_failures": state.consecutive_failures,
                "block_limit": state.block_limit,
            },
            "ranking": {
                "order": list(ranking.order),
                "scores": {str(k): v for k, v in ranking.scores.items()},
                "categories": {str(k): v for k, v in ranking.categories.items()},
            },
            "rounds": [count for count, _ in rounds],
        }
        arrays: dict[str, np.ndarray] = {}
        for index, (_, categorization) in enumerate(rounds):
            arrays |= _categorization_arrays(f"round{index}_", categorization)
        np.savez_compressed(self.directory / CHECKPOINT_SCORES, **arrays)
        temporary = self.directory / (CHECKPOINT + ".tmp")
        temporary.write_text(json.dumps(data))
        temporary.replace(self.directory / CHECKPOINT)

    def load(
        self, config: CategoryConfig
    ) -> tuple[ScheduleState | None, Ranking | None, list[tuple[int, Categorization]]]:
        path = self.directory / CHECKPOINT
        if not path.is_file():
            log.info("no checkpoint in %s: starting afresh", self.directory)
            return None, None, []
        data = json.loads(path.read_text())
        if data["fingerprint"] != self.fingerprint:
            raise CswapError(
                f"The checkpoint in {self.directory} was made with other weights, data or "
                "settings.",
                "rerun with the same arguments, or without --resume and with --overwrite.",
            )
        raw = data["state"]
        steps = tuple(
            Step(
                index=s["index"],
                units=tuple(s["units"]),
                accepted=s["accepted"],
                params=s["params"],
                macs=s["macs"],
                val_accuracy=s["val_accuracy"],
                paired_se=s["paired_se"],
                rescored_after=s["rescored_after"],
            )
            for s in raw["steps"]
        )
        state = ScheduleState(
            removed=tuple(raw["removed"]),
            failed=tuple(raw["failed"]),
            steps=steps,
            chunk_params=raw["chunk_params"],
            params_at_last_ranking=raw["params_at_last_ranking"],
            consecutive_failures=raw["consecutive_failures"],
            block_limit=raw["block_limit"],
        )
        ranking = Ranking(
            order=tuple(data["ranking"]["order"]),
            scores={int(k): v for k, v in data["ranking"]["scores"].items()},
            categories={int(k): v for k, v in data["ranking"]["categories"].items()},
        )
        arrays = np.load(self.directory / CHECKPOINT_SCORES, allow_pickle=False)
        rounds = []
        for index, count in enumerate(data["rounds"]):
            prefix = f"round{index}_"
            rounds.append(
                (
                    count,
                    Categorization(
                        unit_ids=arrays[prefix + "unit_ids"],
                        xi=arrays[prefix + "xi"],
                        tested_classes=arrays[prefix + "tested_classes"],
                        class_means=arrays[prefix + "class_means"],
                        class_p_values=arrays[prefix + "class_p_values"],
                        detrimental_p_values=arrays[prefix + "detrimental_p_values"],
                        categories=arrays[prefix + "categories"].astype(object),
                        config=config,
                    ),
                )
            )
        log.info("resuming after %d steps, %d units removed", len(steps), len(state.removed))
        return state, ranking, rounds


def _jsonable(options: Options) -> dict:
    data = {}
    for key in Options.__dataclass_fields__:
        value = getattr(options, key)
        data[key] = list(value) if isinstance(value, tuple) else value
    return data


# ----------------------------------------------------------------------------- report


def _base_report(prepared: _Prepared, options: Options, model_spec, method, first) -> dict:
    return {
        "report_version": 1,
        "model": model_spec or type(prepared.model).__name__,
        "method": method,
        "settings": _jsonable(options),
        "calibration": prepared.calibration_info,
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
    return {
        "target": target,
        "targets": {"params": config.target_params, "macs": config.target_macs},
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


def _scores_at_removal(rounds, result: ScheduleResult) -> dict[int, tuple[float, str]]:
    """xi and category of each removed unit in the latest scoring before its removal."""
    at_removal: dict[int, tuple[float, str]] = {}
    removed_before = 0
    for step in result.steps:
        if not step.accepted:
            continue
        latest = [cat for count, cat in rounds if count <= removed_before]
        if latest:
            lookup = {int(u): i for i, u in enumerate(latest[-1].unit_ids)}
            for unit in step.units:
                row = lookup.get(unit)
                if row is not None:
                    at_removal[unit] = (float(latest[-1].xi[row]), str(latest[-1].categories[row]))
        removed_before += len(step.units)
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
        entry["xi"] = None if row is None else float(first.xi[row])
        entry["category"] = None if row is None else str(first.categories[row])
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


def load_spec(spec: str, *, weights: str | Path | None = None):
    """A model spec, or the directory of a saved pruned model, as a ``LoadedModel``."""
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

    source = resolve_data(
        data_spec, loaded.preprocessing, data_dir=data_dir, allow_single_class=label_free
    )
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
