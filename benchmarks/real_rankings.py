"""Which order cuts EfficientNet-Lite2 best: one scoring, one-shot cuts at several MAC targets.

One C-SWAP scoring round of the unpruned model (the default round: exact near the cut of the
first ``rescore_every`` of the MACs and near the deepest target, the estimate elsewhere) and
Taylor's scores, then the one-shot cut of each ranking to each target under the same lstsq
compensation (masked, which is tested equal to the pruned model), and its top-1 agreement with
the unpruned model on held-out crops. Data as in ``real_model.py`` (label-free, 160
calibration crops, half split off for validation and unused here).

    python benchmarks/real_rankings.py --targets 0.05,0.1,0.2 --out benchmarks/real_rankings.json

``--correct-at 0.2`` also measures each ranking's cut at 20% with the error correction that
``cswap prune`` applies to the removal it keeps (equal compensation for every order).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import real_model as rm
import torch
from outfile import add_overwrite, refuse_existing, write_whole
from torch.utils.data import TensorDataset

from cswap.api import _prepare
from cswap.categorize import RankConfig, Ranking, causal_ranking
from cswap.criteria import criterion_scores, raw_scores
from cswap.intervene import removed as intervention
from cswap.reconstruct import propagated
from cswap.schedule import ScheduleConfig, oneshot
from cswap.session import CausalRanker, make_options

RANKINGS = {
    "cswap_joint_per_mac": RankConfig("kl", per_cost=True),  # the default order
    "cswap_kl_per_mac": RankConfig("kl", per_cost=True, joint=False),
    "cswap_kl": RankConfig("kl", per_cost=False, joint=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.05,0.1,0.2")
    parser.add_argument("--held-out", type=int, default=320)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/real_rankings.json"))
    parser.add_argument(
        "--correct-at",
        default="",
        help="targets (comma-separated) whose cuts are also measured with the error correction "
        "that cswap prune applies at the end (cswap.reconstruct): agreement_corrected",
    )
    add_overwrite(parser)
    args = parser.parse_args()
    refuse_existing(parser, args.out, args.overwrite)
    correct_at = {float(t) for t in args.correct_at.split(",") if t}
    torch.set_num_threads(2)
    base = rm.model()
    pictures = rm.photos()
    held_out = rm.crops(pictures, args.held_out, seed=2)
    before = rm.top1(base, held_out)
    targets = [float(t) for t in args.targets.split(",")]
    prepared, compensation, ranker, categorization, scoring = first_round(
        base, pictures, max(targets)
    )
    space = prepared.space
    seconds = {"cswap": scoring}
    costs = space.savings((), "macs")
    orders = {name: causal_ranking(categorization, c, costs) for name, c in RANKINGS.items()}
    started = time.perf_counter()
    data_args = dict(images=prepared.calibration_images, labels=prepared.calibration_labels)
    taylor = raw_scores("taylor", prepared.model, space, **data_args)
    seconds["taylor"] = time.perf_counter() - started
    normalized = criterion_scores("taylor", prepared.model, space, **data_args)
    orders["taylor"] = _order(normalized)  # the baseline as cswap runs it: per group
    orders["taylor_per_mac"] = _order(
        taylor / np.maximum([costs[u] for u in range(len(taylor))], 1)
    )
    rows = []
    for name, ranking in orders.items():
        for target in targets:
            removed, _ = oneshot(space, ScheduleConfig(target_macs=target), ranking)
            with torch.no_grad(), intervention(prepared.model, space, removed, compensation):
                after = rm.top1(prepared.model, held_out)
            groups = Counter(space.units[u].group for u in removed)
            deepest = max(c / len(space.groups[g].unit_ids) for g, c in groups.items())
            row = {
                "ranking": name,
                "target_macs": target,
                "units_removed": len(removed),
                "agreement": round(float((after == before).float().mean()), 4),
                "deepest_group_cut": round(deepest, 3),
            }
            if target in correct_at:
                started = time.perf_counter()
                corrected = propagated(
                    prepared.model, space, removed, compensation, prepared.calibration_images
                )
                with torch.no_grad(), intervention(prepared.model, space, removed, corrected):
                    after = rm.top1(prepared.model, held_out)
                row["agreement_corrected"] = round(float((after == before).float().mean()), 4)
                row["correction_seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "model": "efficientnet-lite2 (ImageNet weights), 260 px, label-free",
        "held_out_crops": args.held_out,
        "scoring_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "round": ranker.round_notes[0],
        "rows": rows,
    }
    write_whole(args.out, json.dumps(summary, indent=2) + "\n")


def first_round(base, pictures, first_cut: float):
    """The default first scoring round of the unpruned model, label-free on 160 calibration
    crops (half split off for validation): exact near the next 10% of the MACs and near the
    start's one-shot cut ``first_cut``. Returns the session, its lstsq compensation, the ranker,
    its categorization and the scoring seconds."""
    calibration = rm.crops(pictures, 160, seed=0)
    options = make_options({})
    data = TensorDataset(calibration, rm.top1(base, calibration))
    prepared, compensation = _prepare(base, data, None, None, True, None, options, "lstsq")
    started = time.perf_counter()
    ranker = CausalRanker(
        prepared, options, False, compensation, True, "macs", horizon=0.1, first_cut=first_cut
    )
    categorization = ranker.categorization(())
    return prepared, compensation, ranker, categorization, time.perf_counter() - started


def _order(scores: np.ndarray) -> Ranking:
    return Ranking(order=tuple(sorted(range(len(scores)), key=lambda u: (scores[u], u))))


if __name__ == "__main__":
    main()
