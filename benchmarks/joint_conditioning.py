"""How much a small error in the units' damage moves a one-shot cut, per ranking rule.

Scores every unit of a zoo model exactly once (the first round of a default run: lstsq refit,
intact model, prefix reuse, every unit on every calibration image), then multiplies every unit's
KL by exp(e), e ~ N(0, sd) (seeded, ``--repeats`` draws per sd), and compares the one-shot cuts at
30% and 50% of the parameters of the noisy values with those of the exact ones (Jaccard index of
the removed units), for two rules on the same values:

- ``joint``: KL per parameter with the joint damage (the default, ``cswap.estimate.joint_damage``);
- ``plain``: KL per parameter, each unit's damage alone.

A rule whose cut moves more under the same noise is worse conditioned: a fast path whose values
carry that much error cannot agree with exact scoring better than this. The error of the exact
band's subsample means is of this order (``benchmarks/subsample_scoring.py``).

    python benchmarks/joint_conditioning.py --model zoo:resnet20 \
        --out benchmarks/joint_conditioning_resnet20.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from outfile import add_overwrite, refuse_existing, write_whole

from cswap.banded import _sensitivity, with_joint
from cswap.bench import SPEED_LEVERS, _jaccard, _lever_round, _speed_session
from cswap.categorize import RankConfig, causal_ranking
from cswap.schedule import ScheduleConfig, oneshot

CUTS = (0.3, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:resnet20")
    parser.add_argument("--sd", default="0.05,0.1", help="noise sd on log KL, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    add_overwrite(parser)
    args = parser.parse_args()
    refuse_existing(parser, args.out, args.overwrite)
    started = time.perf_counter()
    prepared, compensation, _ = _speed_session(args.model, 50, "lstsq", 256, 0, "cpu")
    space = prepared.space
    exact = _lever_round(prepared, compensation, SPEED_LEVERS["prefix"], 0, 256, 1024.0)
    exact = exact["categorization"]
    scored = time.perf_counter() - started
    base = compensation.with_base(prepared.model, space, [])
    ids = exact.unit_ids.tolist()
    images = prepared.calibration_images
    sensitivity = _sensitivity(prepared.model, space, base, [], ids, images, "cpu", 0)
    costs = space.savings((), "params")

    def cuts(categorization, joint: bool) -> dict[float, set[int]]:
        if joint:
            categorization = with_joint(
                categorization, prepared.model, space, compensation, (), "params", sensitivity
            )
        ranking = causal_ranking(categorization, RankConfig(joint=joint), costs)
        config = {cut: ScheduleConfig(target_params=cut) for cut in CUTS}
        return {cut: set(oneshot(space, config[cut], ranking)[0]) for cut in CUTS}

    reference = {rule: cuts(exact, rule == "joint") for rule in ("joint", "plain")}
    generator = np.random.default_rng(0)
    rows = []
    for sd in (float(value) for value in args.sd.split(",")):
        found = {"joint": [], "plain": []}
        for _ in range(args.repeats):
            noise = np.exp(generator.normal(0.0, sd, len(ids)))
            noisy = dataclasses.replace(exact, kl=exact.kl * noise)
            for rule, values in found.items():
                moved = cuts(noisy, rule == "joint")
                values.append([_jaccard(moved[c], reference[rule][c]) for c in CUTS])
        for rule, values in found.items():
            mean = np.mean(values, axis=0)
            row = {"sd": sd, "rule": rule} | {
                f"removal_agreement_{int(c * 100)}": round(float(m), 4)
                for c, m in zip(CUTS, mean, strict=True)
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "model": args.model,
        "units": len(ids),
        "calibration_images": len(prepared.calibration_labels),
        "repeats": args.repeats,
        "exact_scoring_seconds": round(scored, 1),
        "rows": rows,
    }
    write_whole(args.out, json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
