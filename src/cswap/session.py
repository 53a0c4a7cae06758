"""A prepared pruning session, shared by ``cswap.prune`` / ``cswap.score`` and ``cswap bench``.

``prepare`` checks the inputs and builds the working state once: a canonical copy of the model
(the user's model is never touched), its units, the calibration tensors, the validation batches
and the unpruned model's reference predictions. A ``Session`` then hands out what the schedules
need: a compensation, a ranker (C-SWAP's causal categories or a baseline criterion), a validator
of masked models, and the progressive accept / roll-back loop with its checkpoints.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cswap.adapters import canonicalize
from cswap.banded import banded_categorization, with_joint
from cswap.categorize import (
    Categorization,
    CategoryConfig,
    RankConfig,
    Ranking,
    categorize,
    causal_ranking,
)
from cswap.checkpoint import Checkpoint
from cswap.compensation import Compensation, measure_means
from cswap.criteria import criterion_scores, ranking_from_scores
from cswap.devices import resolve_device
from cswap.errors import CswapError
from cswap.estimate import BandConfig, stratified
from cswap.evaluate import ValidationPrefix, masked_validation
from cswap.fastscore import FastConfig, fast_categorize
from cswap.inputs import available_bytes, release_freed_memory
from cswap.measure import predict
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
from cswap.suffix import prefix_path
from cswap.surgery import verify_groups
from cswap.timings import stage
from cswap.units import (
    OVER_BUDGET,
    GroupingBudget,
    UnitSpace,
    classifier_layers,
    discover_units,
)

log = logging.getLogger("cswap")


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
    allow_critical: bool = True  # False: the paper's strict rule (--protect-critical)
    rank_by: str = "kl"  # kl | logp | xi: the damage statistic that orders candidates
    rank_per_cost: bool = True  # damage per parameter (or MAC) saved
    rank_categories_first: bool = False  # measured: one order is better on the ViT
    rank_joint: bool = True  # kl + lstsq: the damage with the group's earlier units removed
    oneshot_start: bool = True
    oneshot_first: bool = True  # the start validates the first ranking's one-shot cut first
    # lstsq: the kept removal refitted on the pruned model's own inputs (cswap.reconstruct)
    error_correction: bool = True
    lstsq_memory_gb: float = 4.0
    lstsq_min_rows: float = 4.0  # calibration rows per feature a refitted layer needs
    max_memory_gb: float | None = None  # refuse a run that cannot fit (None: what is available)
    grouping_seconds: float = 60.0  # Torch-Pruning's grouping of one root layer, at most
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
    latency_batch: int = 32  # the throughput batch of the paired latency (besides batch 1)
    milestones: tuple[float, ...] = ()  # params fractions the progressive loop must stop at
    # scoring speed (METHOD.md "Cost"): exact levers on, approximate ones off by default
    prefix_reuse: bool = True
    # exact scoring only within exact_band residual sd of the next cut (cswap.estimate); 0: all
    exact_band: float = 2.0
    exact_max: int = 0  # at most this many units per round exact inside the band (0: no cap)
    # causal scoring on at most this many calibration images, spread over the labels (0: all);
    # the compensation statistics and the error correction use every calibration image
    score_images: int = 0
    # the band's units scored on this share of the calibration images first (0: all at once)
    sample_fraction: float = 0.25
    early_fraction: float = 0.25  # and on this share of those first (0: no early stage)
    # subsample means corrected by a per-image proxy (cswap.control); off: measured slower on vgg
    control_variate: bool = False
    units_per_pass: int | None = None  # None: auto (1 on CPU); 0: fill memory_budget_mb
    memory_budget_mb: float = 1024.0
    # scale-out: score on Ray workers (0: in this process); ray_address joins a cluster
    workers: int = 0
    ray_address: str | None = None
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
            oneshot_start=self.oneshot_start,
            oneshot_first=self.oneshot_first,
        )

    def band_config(self) -> BandConfig:
        return BandConfig(
            z=self.exact_band,
            max_exact=self.exact_max,
            sample_fraction=self.sample_fraction,
            early_fraction=self.early_fraction,
            control_variate=self.control_variate,
        )

    def rank_config(self, allow_critical: bool | None = None) -> RankConfig:
        return RankConfig(
            statistic=self.rank_by,
            per_cost=self.rank_per_cost,
            categories_first=self.rank_categories_first,
            allow_critical=self.allow_critical if allow_critical is None else allow_critical,
            joint=self.rank_joint,
        )

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists): for reports and checkpoint fingerprints."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key in Options.__dataclass_fields__
            for value in [getattr(self, key)]
        }

    def category_config(self) -> CategoryConfig:
        return CategoryConfig(
            margin=self.margin,
            test=self.stat_test,
            alpha=self.alpha,
            correction=self.correction,
            correction_scope=self.correction_scope,
            min_class_size=self.min_class_size,
        )


def _check_finite(model: nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CswapError(
                f"The model has NaN or infinite values in {name}.",
                "fix or reload the weights before pruning.",
            )


def tensors(
    data: Dataset | DataLoader, batch_size: int, name: str = "calibration"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (image, label) pairs of ``data`` as two tensors; ``name`` says which data in errors."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    images, labels = [], []
    for batch in loader:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise CswapError(
                f"The {name} data must yield (image, label) pairs.",
                "wrap unlabeled images with dummy labels and use label_free=True.",
            )
        images.append(torch.as_tensor(batch[0]))
        labels.append(_integer_labels(torch.as_tensor(batch[1]), name).view(-1))
    if not images:
        raise CswapError(f"The {name} data are empty.", f"supply {name} images.")
    return torch.cat(images), torch.cat(labels)


def _integer_labels(labels: torch.Tensor, name: str) -> torch.Tensor:
    """Class indices as int64; float labels only when every one is a whole number."""
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or bool((labels != labels.round()).any()):
            bad = labels[~torch.isfinite(labels) | (labels != labels.round())].view(-1)[0]
            raise CswapError(
                f"The {name} labels are not class indices (e.g. {float(bad)}).",
                "give integer class indices (0 .. classes - 1), not scores or one-hot rows.",
            )
    elif labels.dtype == torch.bool or labels.is_complex():
        raise CswapError(
            f"The {name} labels are {labels.dtype}, not class indices.",
            "give integer class indices (0 .. classes - 1).",
        )
    return labels.to(torch.long)


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


@dataclass
class Session:
    """The working state of one pruning run (see the module docstring)."""

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

    def scoring_indices(self, limit: int, seed: int) -> torch.Tensor | None:
        """Which calibration images causal scoring runs on: None for all of them, else
        ``limit`` of them spread evenly over the labels (``Options.score_images``)."""
        labels = self.calibration_labels
        if limit <= 0 or limit >= len(labels):
            return None
        return torch.from_numpy(stratified(labels.cpu().numpy(), limit, seed))

    def scoring_data(self, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of ``scoring_indices``."""
        return self.calibration_subset(self.scoring_indices(limit, seed))

    def calibration_subset(self, chosen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibration images and labels at ``chosen`` (None: all of them, not copied)."""
        if chosen is None:
            return self.calibration_images, self.calibration_labels
        return self.calibration_images[chosen], self.calibration_labels[chosen]

    def validator(
        self,
        compensation: Compensation | None,
        *,
        prefix_reuse: bool = True,
        budget_mb: float = 1024.0,
    ):
        """``validate(units, threshold=None) -> Validation``: the masked model (with
        ``compensation``) against the unpruned model's reference, on the validation batches;
        rejected early once it cannot reach ``threshold``; with ``prefix_reuse``, steps rerun
        only from the shallowest layer they change (``ValidationPrefix``, within ``budget_mb``)."""
        prefix: list[ValidationPrefix] = []

        def validate(units, threshold: float | None = None) -> Validation:
            with stage("validation step"):
                if prefix_reuse and not prefix:
                    prefix.append(
                        ValidationPrefix(
                            self.model, self.space, self.validation, budget_mb=budget_mb
                        )
                    )
                result = masked_validation(
                    self.model,
                    self.space,
                    units,
                    self.validation,
                    self.reference_predictions,
                    device=self.device,
                    compensation=compensation,
                    threshold=threshold,
                    prefix=prefix[0] if prefix else None,
                )
                if prefix and threshold is not None:
                    prefix[0].record(units, result, threshold)
                return result

        return validate


def prepare(
    model: nn.Module,
    calibration: Dataset | DataLoader,
    validation: Dataset | DataLoader | None,
    *,
    example_input: torch.Tensor | None,
    label_free: bool,
    device: str | None,
    options: Options,
    split_validation: bool = True,
) -> Session:
    _check_finite(model)
    device = resolve_device(device)
    working = canonicalize(copy.deepcopy(model)).to(device).eval()
    images, labels = tensors(calibration, options.batch_size)
    if validation is None and not split_validation:
        val_images, val_labels = images, labels
        validation_source = "the calibration data itself (scoring only)"
    elif validation is None:
        images, labels, val_images, val_labels = _split_validation(
            images, labels, options.validation_fraction, options.seed
        )
        validation_source = f"a seeded {options.validation_fraction:.0%} of the calibration data"
    else:
        val_images, val_labels = tensors(validation, options.batch_size, "validation")
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
    if not len(labels):
        raise CswapError(
            f"No calibration image is left after dropping {dropped} misclassified images.",
            "check that the labels are the model's class indices, or pass correct_only=False.",
        )
    note = None
    if len(torch.unique(labels)) < 2:
        filtered = f" after dropping {dropped} misclassified images" if dropped else ""
        note = (
            f"The calibration set holds one class{filtered}: the class-conditional test runs "
            "on that class alone."
        )
        log.warning(note)
    space = _verified_units(working.cpu(), example.cpu(), options)
    working.to(device)
    if len(space) == 0:
        raise CswapError(
            "The model has no prunable units.",
            "check ignored_layers; excluded groups and why: "
            + "; ".join(f"{g.root}: {g.reason}" for g in space.excluded),
        )
    accuracy = int((reference == val_labels).sum()) / len(val_labels)  # as masked_validation
    info = {
        "calibration_size": len(labels),
        "scoring_size": min(len(labels), options.score_images or len(labels)),  # score_images
        "calibration_per_class": {
            str(int(k)): int(v)
            for k, v in zip(*np.unique(labels.numpy(), return_counts=True), strict=True)
        },
        "misclassified_dropped": dropped,
        "validation_size": len(val_labels),
        "validation_source": validation_source,
        "label_free": label_free,
        "correct_only": options.correct_only and not label_free,
        "note": note,
    }
    return Session(
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


class CausalRanker:
    """Scores the remaining units on the current (masked) model and orders them (C-SWAP).

    With a compensation, the interventions are the compensated ones. ``allow_critical``: rank the
    critical units too (last, by |xi|): a one-shot cut must be able to reach any target.
    """

    method = "cswap"

    def __init__(
        self,
        prepared: Session,
        options: Options,
        progress: bool,
        compensation: Compensation | None = None,
        allow_critical: bool | None = None,
        cost_kind: str = "params",
        horizon: float | None = None,
        first_cut: float | None = None,
    ) -> None:
        self.prepared = prepared
        self.options = options
        self.progress = progress
        self.compensation = compensation
        self.rank_config = options.rank_config(allow_critical)
        self.cost_kind = cost_kind
        # the fraction of the cost cut from one ranking (progressive: rescore_every); with
        # it, a round scores exactly only the units near that cut (cswap.banded)
        self.horizon = horizon
        # the first round also serves the start's one-shot cut (ScheduleConfig.first_cut)
        self.first_cut = first_cut
        self.rounds: list[tuple[int, Categorization]] = []  # (units removed before, result)
        self.round_notes: list[dict] = []  # per round: units scored exactly / estimated
        self.preset: Ranking | None = None
        self.scores: np.ndarray | None = None
        self.backend = None  # a RayScoring: exact effects computed on workers

    @functools.cached_property
    def _scoring_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepared.scoring_data(self.options.score_images, self.options.seed)

    @property
    def images(self) -> torch.Tensor:
        """The calibration images this ranker scores on (``Options.score_images``)."""
        return self._scoring_data[0]

    @property
    def labels(self) -> torch.Tensor:
        return self._scoring_data[1]

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def categorization(self, removed: tuple[int, ...]) -> Categorization:
        prepared = self.prepared
        remaining = len(prepared.space) - len(removed)
        with (
            stage("scoring round"),
            _progress_bar(remaining, "scoring units", self.progress) as bar,
        ):
            if self._fast():
                result = self._fast_round(removed, bar.update)
                note = {"exact": remaining, "estimated": 0}
            elif self._banded():
                banded = banded_categorization(
                    self._exact_scorer(removed),
                    prepared.model,
                    prepared.space,
                    self.compensation,
                    removed,
                    images=self.images,
                    labels=self.labels,
                    device=prepared.device,
                    horizon=self._horizons(removed),
                    cost_kind=self.cost_kind,
                    band=self.options.band_config(),
                    category_config=self.options.category_config(),
                    seed=self.options.seed,
                    progress=bar.update,
                    joint=self.rank_config.joint,
                )
                result = banded.categorization
                note = {"exact": banded.exact, "estimated": banded.estimated}
                note["sampled"] = len(banded.sampled)
                note["estimate_sd"] = None if math.isnan(banded.sd) else round(banded.sd, 4)
            else:
                effects = self._exact_scorer(removed)(progress=bar.update)
                result = self._with_joint(
                    categorize(effects, self.options.category_config()), removed
                )
                note = {"exact": remaining, "estimated": 0}
        self.rounds.append((len(removed), result))
        self.round_notes.append(note)
        log.info(
            "scored %d units after %d removed: %s %s",
            remaining,
            len(removed),
            result.counts(),
            note,
        )
        return result

    def _horizons(self, removed: tuple[int, ...]) -> list[float]:
        """The cuts this round's ranking serves, in the cost's currency: the next
        ``rescore_every``, and in the first round the start's one-shot cut too."""
        fractions = [self.horizon]
        if self.first_cut is not None and not removed and not self.rounds:
            fractions.append(self.first_cut)
        total = self.prepared.space.cost_total(self.cost_kind)
        return [fraction * total for fraction in sorted(set(fractions))]

    def _with_joint(self, result: Categorization, removed: tuple[int, ...]) -> Categorization:
        """An exactly scored round's joint damage (the banded rounds add their own)."""
        if not self.rank_config.joint or self.rank_config.statistic != "kl":
            return result
        prepared = self.prepared
        return with_joint(
            result,
            prepared.model,
            prepared.space,
            self.compensation,
            removed,
            self.cost_kind,
            images=self.images,
            device=prepared.device,
            seed=self.options.seed,
        )

    def _fast(self) -> bool:
        fast = self.options.fast_config()
        return bool(fast.looks or fast.screen)

    def _banded(self) -> bool:
        """Exact passes only near the cut: progressive runs (a horizon), the KL order across
        categories (the strict rule and categories-first need every unit's category), lstsq."""
        config = self.rank_config
        return (
            self.horizon is not None
            and self.options.exact_band > 0
            and config.statistic == "kl"
            and config.allow_critical
            and not config.categories_first
            and self.compensation is not None
            and self.compensation.mode == "lstsq"
        )

    def _scoring_options(self) -> dict:
        options = self.options
        return {
            "batch_size": options.batch_size,
            "device": self.prepared.device,
            "prefix_reuse": options.prefix_reuse,
            "units_per_pass": options.units_per_pass,
            "memory_budget_mb": options.memory_budget_mb,
        }

    def _exact_scorer(self, removed: tuple[int, ...]):
        """``score(units=None, progress=None)``: exact effects on this round's model (of the
        calibration data, or of ``images=``, ``labels=`` given)."""
        prepared = self.prepared
        score = causal_effects if self.backend is None else self.backend.effects
        return functools.partial(
            score,
            prepared.model,
            prepared.space,
            images=self.images,
            labels=self.labels,
            already_removed=removed,
            compensation=self.compensation,
            **self._scoring_options(),
        )

    def _fast_round(self, removed: tuple[int, ...], progress) -> Categorization:
        prepared = self.prepared
        return fast_categorize(
            prepared.model,
            prepared.space,
            self.images,
            self.labels,
            self.options.category_config(),
            self.options.fast_config(),
            already_removed=removed,
            compensation=self.compensation,
            seed=self.options.seed,
            progress=progress,
            **self._scoring_options(),
        ).categorization

    def __call__(self, removed: tuple[int, ...]) -> Ranking:
        if self.preset is not None:
            ranking, self.preset = self.preset, None
            return ranking
        categorization = self.categorization(removed)
        costs = self.prepared.space.savings(removed, self.cost_kind)
        return causal_ranking(categorization, self.rank_config, costs)


class CriterionRanker:
    """A baseline criterion: scores every unit once, on the unpruned model; ranks the rest."""

    def __init__(self, method: str, prepared: Session, options: Options) -> None:
        self.method = method
        self.rounds: list[tuple[int, Categorization]] = []
        self.round_notes: list[dict] = []  # a criterion scores no causal rounds
        self.preset: Ranking | None = None
        self.backend = None
        with stage("criterion scoring"):
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
            release_freed_memory()

    def close(self) -> None:
        pass

    def __call__(self, removed: tuple[int, ...]) -> Ranking:
        if self.preset is not None:
            ranking, self.preset = self.preset, None
            return ranking
        return ranking_from_scores(self.scores, removed)


def make_ranker(
    method: str,
    mode: str,
    prepared: Session,
    options: Options,
    progress: bool,
    compensation: Compensation | None,
    cost_kind: str = "params",
    shard_dir: Path | None = None,
    first_cut: float | None = None,
):
    """The ranker of ``method``; ``cost_kind`` (params or macs, after the target) weighs the
    causal damage per unit saved; ``shard_dir`` keeps Ray workers' finished shards;
    ``first_cut``: the progressive start's one-shot cut, which the first round also serves."""
    if method == "cswap":
        allow = True if mode == "oneshot" else None
        ranker = CausalRanker(
            prepared,
            options,
            progress,
            compensation,
            allow_critical=allow,
            cost_kind=cost_kind,
            horizon=None if mode == "oneshot" else options.rescore_every,
            first_cut=None if mode == "oneshot" else first_cut,
        )
        if options.workers or options.ray_address:
            from cswap.distributed import RayConfig, RayScoring

            config = RayConfig(workers=max(1, options.workers), address=options.ray_address)
            ranker.backend = RayScoring(config, device=prepared.device, store=shard_dir)
        return ranker
    return CriterionRanker(method, prepared, options)


def measure_compensation(
    prepared: Session, compensate: str, options: Options
) -> Compensation | None:
    if compensate == "none":
        return None
    return measure_means(
        prepared.model,
        prepared.space,
        prepared.calibration_images,
        batch_size=options.batch_size,
        device=prepared.device,
        mode=compensate,
        memory_gb=options.lstsq_memory_gb,
        min_rows=options.lstsq_min_rows,
    )


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

    if not total:
        return tqdm(total=None, desc=description, leave=False, unit=unit)
    # scoring advances by fractions of a unit (a batch of its images): show whole units
    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}]"
    return tqdm(total=total, desc=description, leave=False, unit=unit, bar_format=bar_format)


MIN_SCORE_IMAGES = 8  # the fewest images a unit's tests and the band's early stage work with


def make_options(overrides: dict[str, Any]) -> Options:
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
        options.rank_config()
    except ValueError as error:
        raise CswapError(str(error), "use --rank-by kl, logp or xi.") from error
    try:
        options.fast_config()
    except ValueError as error:
        raise CswapError(str(error), "see cswap prune --help for the ranges.") from error
    for name in ("batch_size", "latency_threads", "latency_batch", "min_class_size"):
        if getattr(options, name) < 1:
            raise CswapError(f"{name} must be >= 1, got {getattr(options, name)}.", "use e.g. 1.")
    if options.units_per_pass is not None and options.units_per_pass < 0:
        raise CswapError(
            f"units_per_pass must be >= 0, got {options.units_per_pass}.",
            "use 1 (one unit per pass), 0 (fill the memory budget) or leave it unset.",
        )
    if not (options.exact_band >= 0 and math.isfinite(options.exact_band)):
        raise CswapError(
            f"exact_band must be a finite number >= 0, got {options.exact_band}.",
            "use e.g. 2 (the default), or 0 to score every unit exactly.",
        )
    if options.score_images != 0 and options.score_images < MIN_SCORE_IMAGES:
        raise CswapError(
            f"score_images must be 0 or at least {MIN_SCORE_IMAGES}, got {options.score_images}.",
            "use e.g. 96 (calibration images causal scoring runs on), or 0 for all of them.",
        )
    if options.exact_max < 0:
        raise CswapError(
            f"exact_max must be >= 0, got {options.exact_max}.",
            "use e.g. 300 (units per round scored exactly inside the band), or 0 for no cap.",
        )
    _check_stages_and_limits(options)
    if not 0.0 < options.validation_fraction < 1.0:
        raise CswapError("validation_fraction must be in (0, 1).", "use e.g. 0.5.")
    _check_workers(options)
    return options


def _check_stages_and_limits(options: Options) -> None:
    """The band's image shares and the run's time / memory limits."""
    for name, zero in (
        ("sample_fraction", "0 to score the band on every image at once"),
        ("early_fraction", "0 for no early stage"),
    ):
        value = getattr(options, name)
        if not 0.0 <= value < 1.0:
            raise CswapError(
                f"{name} must be in [0, 1), got {value}.",
                f"use e.g. 0.25 (the default), or {zero}.",
            )
    if not options.grouping_seconds > 0:
        raise CswapError(
            f"grouping_seconds must be > 0, got {options.grouping_seconds}.", "use e.g. 60."
        )
    if not (options.lstsq_min_rows >= 0 and math.isfinite(options.lstsq_min_rows)):
        raise CswapError(
            f"lstsq_min_rows must be a finite number >= 0, got {options.lstsq_min_rows}.",
            "use e.g. 4 (the default): rows of calibration inputs per refitted feature.",
        )
    if options.max_memory_gb is not None and not options.max_memory_gb > 0:
        raise CswapError(
            f"max_memory_gb must be > 0, got {options.max_memory_gb}.",
            "use e.g. 6, or leave it unset to use what the machine has available.",
        )


def _check_workers(options: Options) -> None:
    if options.workers < 0:
        raise CswapError(f"workers must be >= 0, got {options.workers}.", "use e.g. --workers 2.")
    if not (options.workers or options.ray_address):
        return
    from cswap.distributed import require_ray

    require_ray()
    if options.sequential_looks or options.screen:
        raise CswapError(
            "--workers scores every unit exactly: --sequential and --screen run in one process.",
            "drop --sequential / --screen, or --workers.",
        )


def run_progressive(
    prepared: Session,
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
        fingerprint = checkpoint_fingerprint(prepared, opts, schedule_config)
        fingerprint |= fingerprint_extra or {}
        checkpoint = Checkpoint(Path(checkpoint_dir), fingerprint)
    state = None
    if checkpoint is not None and resume:
        state, preset, rounds, notes = checkpoint.load(opts.category_config())
        ranker.preset = preset
        ranker.rounds.extend(rounds)
        ranker.round_notes.extend(notes)
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
            checkpoint.save(current, last_ranking[0], ranker.rounds, ranker.round_notes)

    first_ranking = ranker(state.removed if state else ())
    last_ranking.append(first_ranking)
    ranker.preset = first_ranking
    if checkpoint is not None and state is None:
        # the first scoring is the expensive part: keep it even if no step is ever accepted
        initial = ScheduleState(
            chunk_params=schedule_config.initial_chunk * max(1, space.prunable_params),
            cost_at_last_ranking=space.cost_total(schedule_config.cost_kind),
        )
        checkpoint.save(initial, first_ranking, ranker.rounds, ranker.round_notes)
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


def prefix_reuse_path(session: Session, options: Options) -> str:
    """The prefix reuse causal scoring takes on this session's model (for the report)."""
    if not options.prefix_reuse:
        return "off"
    touched = {layer for unit in session.space.units for layer in unit.touched}
    device = next(session.model.parameters()).device
    return prefix_path(session.model, touched, session.example_input[:1].to(device))


def _verified_units(model: nn.Module, example: torch.Tensor, options: Options) -> UnitSpace:
    """The units of ``model``, without the groups whose removal fails or is not what masking
    computes (checked on a copy; excluded with the reason, which the report lists)."""
    limit = options.max_memory_gb
    budget = GroupingBudget(
        options.grouping_seconds, available_bytes() if limit is None else int(limit * 2**30)
    )
    ignored = options.ignored_layers
    space = discover_units(model, example, ignored_layers=ignored, budget=budget)
    with stage("unit verification"):
        failed = verify_groups(model, space, example) if len(space) else {}
        release_freed_memory()  # the verification copies
    if not failed:
        return space
    for root, reason in failed.items():
        log.warning("group %s excluded: %s", root, reason)
    over = {g.root: g.reason for g in space.excluded if g.reason.startswith(OVER_BUDGET)}
    return discover_units(
        model, example, ignored_layers=ignored, excluded_roots=failed | over, budget=budget
    )


def checkpoint_fingerprint(prepared: Session, options: Options, config: ScheduleConfig) -> dict:
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
        # where the scoring runs does not change its results: resume with other workers
        "options": {k: v for k, v in options.to_dict().items() if k not in RUN_PLACE},
        "schedule": config.to_dict(),
    }


RUN_PLACE = ("workers", "ray_address")
