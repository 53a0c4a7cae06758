"""How well a subsample of the calibration images decides a unit; whether a control variate helps.

Scores every unit of a zoo model exactly on all calibration images once (the first round of a
default run: lstsq refit, intact model), then, on seeded label-stratified subsamples:

1. two stages (what ``cswap.banded`` does inside the band): the edge of a cut at ``--horizon``
   of the parameters placed on subsample means; units within exp(z * relative standard error)
   of it are given their full mean; the cut is compared with the cut on full means (Jaccard)
   and the passes spent with scoring every unit on every image;
2. a control variate for each unit's subsample mean: per image, the mean normalised KL of
   ``--reference`` units of the same group scored on every image (known mean), with the
   coefficient taken from the unit's true mean (an oracle, the best this variate can do) or
   from a noisy estimate; the variance of the corrected mean over ``--draws`` subsamples against
   the plain mean's.

    python benchmarks/subsample_scoring.py --model zoo:vgg --out benchmarks/subsample_vgg.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from outfile import add_overwrite, refuse_existing, write_whole

from cswap.bench import _speed_session
from cswap.estimate import BandConfig, sample_spread, split_samples
from cswap.scoring import causal_effects


def _cut(keys: np.ndarray, params: np.ndarray, horizon: float) -> set[int]:
    order = np.argsort(keys, kind="stable")
    end = int(np.searchsorted(np.cumsum(params[order]), horizon))
    return set(order[: end + 1].tolist())


def _edge(keys: np.ndarray, params: np.ndarray, horizon: float) -> float:
    order = np.argsort(keys, kind="stable")
    end = min(int(np.searchsorted(np.cumsum(params[order]), horizon)), len(order) - 1)
    return float(keys[order[end]])


def two_stage(kl, labels, params, horizon, fraction, seed) -> dict:
    full_mean = kl.mean(axis=1)
    reference = _cut(full_mean / params, params, horizon)
    config = BandConfig(sample_fraction=fraction)
    rows = split_samples(labels, config, seed)
    share = len(rows) / kl.shape[1]
    partial = kl[:, rows]
    mean = partial.mean(axis=1)
    spread = sample_spread(partial, kl.shape[1], config)
    edge = _edge(mean / params, params, horizon)
    keys = mean / params
    second = (keys >= edge / spread) & (keys <= edge * spread)
    final = np.where(second, full_mean, mean)
    cut = _cut(final / params, params, horizon)
    return {
        "seed": seed,
        "images_first_stage": len(rows),
        "second_stage_share": round(float(second.mean()), 4),
        "passes": round(share + float(second.mean()) * (1 - share), 4),
        "jaccard": round(len(cut & reference) / len(cut | reference), 4),
        "cut_units": len(reference),
    }


def control_variate(kl, labels, groups, fraction, draws, noise, seed) -> dict:
    """Variance of the corrected subsample mean over the plain one's, per live unit (median)."""
    rng = np.random.default_rng(seed)
    full_mean = kl.mean(axis=1)
    live = full_mean > 1e-9
    profile = np.zeros_like(kl)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        chosen = rng.choice(members, min(4, len(members)), replace=False)
        scaled = kl[chosen] / np.maximum(full_mean[chosen, None], 1e-30)
        profile[members] = scaled.mean(axis=0)
    known = profile.mean(axis=1)
    beta = full_mean * np.exp(rng.normal(0.0, noise, len(full_mean))) / np.maximum(known, 1e-30)
    plain, corrected = [], []
    for draw in range(draws):
        rows = split_samples(labels, BandConfig(sample_fraction=fraction), seed + 1 + draw)
        mean = kl[:, rows].mean(axis=1)
        plain.append(mean - full_mean)
        corrected.append(mean - beta * (profile[:, rows].mean(axis=1) - known) - full_mean)
    plain, corrected = np.array(plain)[:, live], np.array(corrected)[:, live]
    ratio = corrected.var(axis=0) / np.maximum(plain.var(axis=0), 1e-300)
    correlation = [
        np.corrcoef(kl[u], profile[u])[0, 1] for u in np.flatnonzero(live) if kl[u].std() > 0
    ]
    return {
        "coefficient_log_noise": noise,
        "variance_ratio_median": round(float(np.median(ratio)), 4),
        "variance_ratio_q75": round(float(np.percentile(ratio, 75)), 4),
        "relative_bias_median": round(
            float(np.median(np.abs(corrected.mean(axis=0)) / full_mean[live])), 4
        ),
        "per_image_correlation_median": round(float(np.median(correlation)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:vgg")
    parser.add_argument("--calib-per-class", type=int, default=50)
    parser.add_argument("--horizon", type=float, default=0.1)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--out", type=Path)
    add_overwrite(parser)
    args = parser.parse_args()
    refuse_existing(parser, args.out, args.overwrite)
    prepared, lstsq = _speed_session(args.model, args.calib_per_class, "lstsq", 256, 0, "cpu")
    started = time.perf_counter()
    effects = causal_effects(
        prepared.model,
        prepared.space,
        prepared.calibration_images,
        prepared.calibration_labels,
        compensation=lstsq,
    )
    seconds = time.perf_counter() - started
    space = prepared.space
    savings = space.savings((), "params")
    units = effects.unit_ids.tolist()
    params = np.array([savings[u] for u in units], dtype=float)
    groups = np.array([space.units[u].group for u in units])
    labels, kl = effects.labels, np.maximum(effects.kl, 0.0)
    horizon = args.horizon * space.params_total
    result = {
        "model": args.model,
        "units": len(units),
        "calibration_images": kl.shape[1],
        "full_scoring_seconds": round(seconds, 1),
        "horizon": args.horizon,
        "fraction": args.fraction,
        "two_stage": [
            two_stage(kl, labels, params, horizon, args.fraction, seed) for seed in range(3)
        ],
        "control_variate": [
            control_variate(kl, labels, groups, args.fraction, args.draws, noise, 7)
            for noise in (0.0, 0.35, 0.7)
        ],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_whole(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
