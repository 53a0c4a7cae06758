"""Hierarchical (group) testing against exact scoring: what it costs and what it gets wrong.

Scores every unit of a zoo model exactly (the first round of a default run: lstsq refit, intact
model, every unit on every calibration image), then runs hierarchical testing on the same model:

- within each group, units are ordered by the closed-form estimate of their damage under the
  refit (``cswap.estimate.reconstruction_costs``, weighted by the output sensitivity, as the
  exact band orders them);
- a block of units is removed *jointly* (one intervention, every calibration image, the same
  lstsq refit of its consumers as cswap prune uses) and categorized by cswap's own test
  (class-conditional one-sided tests against the margin, ``cswap.categorize``);
- a block that is not critical certifies every unit in it as not critical, and each unit gets
  the block's measured KL shared in proportion to its estimate; a critical block is split in
  two halves (by the estimate's order) and each half tested, down to single units (whose test
  is their exact scoring).

The guarantee is conditional: a unit's damage must not exceed that of a block containing it
(removing more does no less harm). Where that fails a critical unit hides in a certified block;
the script counts those against the exact categories. It reports the passes (one block test =
one unit's exact scoring), category agreement, critical units certified as not critical, and
the one-shot cuts at 30% and 50% of the parameters (KL per parameter, the damage alone: the
Jaccard index against the same rule on exact values).

    python benchmarks/group_testing.py --model zoo:vgg --out benchmarks/group_testing_vgg.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from outfile import add_overwrite, refuse_existing, write_whole

from cswap.banded import _sensitivity
from cswap.bench import SPEED_LEVERS, _jaccard, _lever_round, _speed_session
from cswap.categorize import (
    CRITICAL,
    RankConfig,
    categorize,
    causal_ranking,
    with_estimates,
)
from cswap.estimate import reconstruction_costs
from cswap.intervene import removed
from cswap.schedule import ScheduleConfig, oneshot
from cswap.scoring import CausalEffects
from cswap.session import Options

CUTS = (0.3, 0.5)


def block_effects(model, space, blocks, compensation, images, labels, batch_size=256):
    """Each block's joint removal on every image: relative true-class effect and KL."""
    rows = np.arange(len(labels))

    def probabilities() -> torch.Tensor:
        outputs = [model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return torch.log_softmax(torch.cat(outputs).double(), dim=1)

    with torch.no_grad():
        base = probabilities()
        sigma = base.exp().numpy()[rows, labels]
        relative, kl = [], []
        for block in blocks:
            with removed(model, space, block, compensation):
                after = probabilities()
            relative.append((after.exp().numpy()[rows, labels] - sigma) / sigma)
            kl.append((base.exp() * (base - after)).sum(1).numpy())
    return CausalEffects(
        unit_ids=np.arange(len(blocks)),
        relative_effects=np.asarray(relative),
        labels=labels,
        baseline=sigma,
        kl=np.asarray(kl),
    )


def hierarchical(model, space, compensation, estimates, images, labels, exact, config):
    """(unit -> KL found, unit -> certified not critical, passes) for one group; ``estimates``:
    unit -> estimated damage, in the order blocks are formed."""
    values, certified, passes = {}, {}, 0
    pending = [list(estimates)]
    while pending:
        level, pending = pending, []
        singles = [block for block in level if len(block) == 1]
        blocks = [block for block in level if len(block) > 1]
        for (unit,) in singles:  # a single unit's test is its exact scoring
            values[unit] = exact[unit]
            passes += 1
        if not blocks:
            continue
        effects = block_effects(model, space, blocks, compensation, images, labels)
        passes += len(blocks)
        outcome = categorize(effects, config)
        for block, category, kl in zip(blocks, outcome.categories, outcome.kl, strict=True):
            if category == CRITICAL:
                middle = len(block) // 2
                pending += [block[:middle], block[middle:]]
                continue
            for unit in block:
                certified[unit] = True
            shares = np.asarray([estimates[unit] for unit in block], dtype=np.float64) + 1e-300
            shares = shares / shares.sum()
            values.update({u: float(kl * share) for u, share in zip(block, shares, strict=True)})
    return values, certified, passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:vgg")
    parser.add_argument("--out", type=Path, required=True)
    add_overwrite(parser)
    args = parser.parse_args()
    refuse_existing(parser, args.out, args.overwrite)
    torch.set_num_threads(2)
    prepared, compensation, _ = _speed_session(args.model, 50, "lstsq", 256, 0, "cpu")
    model, space = prepared.model, prepared.space
    model.eval()
    images, labels = prepared.calibration_images, prepared.calibration_labels.numpy()
    started = time.perf_counter()
    exact = _lever_round(prepared, compensation, SPEED_LEVERS["prefix"], 0, 256, 1024.0)
    exact = exact["categorization"]
    exact_seconds = time.perf_counter() - started
    ids = exact.unit_ids.tolist()
    exact_kl = dict(zip(ids, exact.kl.tolist(), strict=True))
    exact_critical = {u for u, c in zip(ids, exact.categories, strict=True) if c == CRITICAL}

    base = compensation.with_base(model, space, [])
    sensitivity = _sensitivity(model, space, base, [], ids, images, "cpu", 0)
    estimate = reconstruction_costs(space, base, ids, sensitivity)
    config = Options().category_config()
    started = time.perf_counter()
    found, certified, passes = {}, {}, 0
    for group in space.groups:
        if any(u not in estimate for u in group.unit_ids):  # no estimate: scored exactly
            found |= {u: exact_kl[u] for u in group.unit_ids}
            passes += group.size
            continue
        order = sorted(group.unit_ids, key=lambda u: (estimate[u], u))
        estimates = {u: estimate[u] for u in order}
        values, sure, spent = hierarchical(
            model, space, compensation, estimates, images, labels, exact_kl, config
        )
        found |= values
        certified |= sure
        passes += spent
    testing_seconds = time.perf_counter() - started

    hidden = sorted(u for u in certified if u in exact_critical)
    exact_not_critical = [u for u in ids if u not in exact_critical]
    costs = space.savings((), "params")
    rank = RankConfig(joint=False)
    reference = causal_ranking(exact, rank, costs)
    singles = [u for u in ids if u not in certified]
    tested = categorize_singletons(exact, singles)
    guessed = with_estimates(tested, {u: found[u] for u in certified})
    ranking = causal_ranking(guessed, rank, costs)
    agreement = {}
    for cut in CUTS:
        schedule = ScheduleConfig(target_params=cut)
        mine = set(oneshot(space, schedule, ranking)[0])
        theirs = set(oneshot(space, schedule, reference)[0])
        agreement[f"removal_agreement_{int(cut * 100)}"] = round(_jaccard(mine, theirs), 4)
    summary = {
        "model": args.model,
        "units": len(ids),
        "groups": len(space.groups),
        "calibration_images": len(labels),
        "exact_passes": len(ids),
        "exact_seconds": round(exact_seconds, 1),
        "group_testing_passes": passes,
        "pass_fraction": round(passes / len(ids), 4),
        "group_testing_seconds": round(testing_seconds, 1),
        "certified_not_critical": len(certified),
        "exact_not_critical": len(exact_not_critical),
        "exact_critical": len(exact_critical),
        "critical_hidden_in_certified_blocks": len(hidden),
        # a unit tested alone has its exact category: only certified critical units disagree
        "critical_agreement": round(1.0 - len(hidden) / len(ids), 4),
    } | agreement
    print(json.dumps(summary, indent=2))
    write_whole(args.out, json.dumps(summary, indent=2) + "\n")


def categorize_singletons(categorization, units):
    """The exact categorization restricted to ``units`` (scored alone, as a single-unit test)."""
    from dataclasses import fields, replace

    rows = np.isin(categorization.unit_ids, np.asarray(units, dtype=categorization.unit_ids.dtype))
    changed = {}
    for field in fields(categorization):
        value = getattr(categorization, field.name)
        if isinstance(value, np.ndarray) and len(value) == len(rows):
            changed[field.name] = value[rows]
    return replace(categorization, **changed)


if __name__ == "__main__":
    main()
