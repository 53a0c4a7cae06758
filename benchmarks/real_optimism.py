"""How optimistic are the calibration images about EfficientNet-Lite2's 20%-of-MACs cut?

One C-SWAP scoring round of the unpruned model (the default first round, as in
``real_rankings.py``), the default order's one-shot cut at ``--target`` of the MACs under the
lstsq compensation, then:

- per group of the cut: the mean KL from the unpruned model's softmax when only that group's
  cut units are removed, on the calibration images the scoring and the refit saw (in-sample)
  and on fresh crops of the same photos (a new seed), and their ratio;
- for the ``--random-groups`` most cut groups, the same for a random subset of that group of the
  same size (a ratio above 1 there is the refit fitting its calibration rows, not selection);
- top-1 agreement with the unpruned model on ``--held-out`` crops (seed 2, so the first 320 are
  ``real_model.py``'s held-out crops), overall and on the first 320.

    python benchmarks/real_optimism.py --out benchmarks/real_optimism.json
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import real_model as rm
import torch
from outfile import add_overwrite, refuse_existing, write_whole
from real_rankings import first_round

from cswap.categorize import RankConfig, causal_ranking
from cswap.evaluate import output_divergence
from cswap.intervene import removed as intervention
from cswap.schedule import ScheduleConfig, oneshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--fresh", type=int, default=84, help="fresh crops for the KL ratios")
    parser.add_argument("--random-groups", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/real_optimism.json"))
    add_overwrite(parser)
    args = parser.parse_args()
    refuse_existing(parser, args.out, args.overwrite)
    torch.set_num_threads(2)
    base = rm.model()
    pictures = rm.photos()
    prepared, compensation, _, categorization, scoring = first_round(base, pictures, args.target)
    space = prepared.space
    ranking = causal_ranking(
        categorization, RankConfig("kl", per_cost=True), space.savings((), "macs")
    )
    removed, _ = oneshot(space, ScheduleConfig(target_macs=args.target), ranking)

    def kl(units, images) -> float:
        batches = [(images[i : i + 42], None) for i in range(0, len(images), 42)]
        return output_divergence(prepared.model, space, units, batches, [compensation])[0]

    rows = _ratios(
        space,
        removed,
        kl,
        prepared.calibration_images,
        rm.crops(pictures, args.fresh, seed=7),
        args.random_groups,
    )
    held_out = rm.crops(pictures, args.held_out, seed=2)
    before = rm.top1(base, held_out)
    with torch.no_grad(), intervention(prepared.model, space, removed, compensation):
        same = (rm.top1(prepared.model, held_out) == before).float()
    summary = {
        "model": "efficientnet-lite2 (ImageNet weights), 260 px, label-free, 160 crops",
        "target_macs": args.target,
        "units_removed": len(removed),
        "scoring_seconds": round(scoring, 1),
        "calibration_images": len(prepared.calibration_images),
        "fresh_crops": args.fresh,
        "agreement_first_320": round(float(same[:320].mean()), 4),
        f"agreement_{args.held_out}": round(float(same.mean()), 4),
        "rows": rows,
    }
    write_whole(args.out, json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))


def _ratios(space, removed, kl, calibration, fresh, random_groups: int) -> list[dict]:
    """Per group of the cut (and for a random subset of the most cut groups): the KL of
    removing those units on the calibration images and on fresh crops, and their ratio."""
    by_group = defaultdict(list)
    for unit in removed:
        by_group[space.units[unit].group].append(unit)
    sets = [(space.groups[g].root, "cut", units) for g, units in sorted(by_group.items())]
    sets.append(("all", "cut", removed))
    rng = random.Random(0)
    for group in sorted(by_group, key=lambda g: -len(by_group[g]))[:random_groups]:
        members = [u.id for u in space.units if u.group == group]
        sets.append((space.groups[group].root, "random", rng.sample(members, len(by_group[group]))))
    rows = []
    for root, kind, units in sets:
        inside, outside = kl(units, calibration), kl(units, fresh)
        rows.append(
            {
                "group": root,
                "units": kind,
                "count": len(units),
                "kl_calibration": round(inside, 6),
                "kl_fresh": round(outside, 6),
                "ratio": round(outside / max(inside, 1e-12), 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
