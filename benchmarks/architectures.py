"""Every torchvision classification architecture through cswap, one process each.

    .venv/bin/python benchmarks/architectures.py --out benchmarks/architectures.json \
        --doc docs/architectures.md

Random init, 10 classes, 40 random images at 64 px (or the smallest size the model accepts),
labels 0..9, L1 one-shot to 20% of the parameters, no compensation, ``max_memory_gb`` 6 (cswap
refuses up front a run whose lower bound does not fit). Each model runs in its own
process under an address-space cap (default 12 GB: torch alone reserves a few GB of address
space it never touches, so the cap is a safety net, not the budget) and a time limit; the
result, the units found, the excluded groups, the peak resident memory (the 6 GB budget) and
the seconds go into a JSON file and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch, torchvision
from torch.utils.data import TensorDataset
import cswap
name, size, budget = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
options = {"num_classes": 10}
if name.startswith("vit_"):
    options["image_size"] = size
model = torchvision.models.get_model(name, weights=None, **options).eval()
x = torch.randn(40, 3, size, size)
y = torch.arange(40) % 10
started = time.time()
out = {"model": name, "input_size": size}
try:
    result = cswap.prune(model, TensorDataset(x, y), validation=TensorDataset(x, y),
                         target_params=0.2, method="l1", mode="oneshot", compensate="none",
                         correct_only=False, progress=False, max_memory_gb=budget)
    r = result.report
    out |= {"result": "pruned", "stop_reason": r["stop_reason"],
            "params_reduction": round(r["params_reduction"], 4), "units": r["units_total"],
            "excluded": [f"{g['root']}: {g['reason']}" for g in r["excluded_groups"]]}
except Exception as error:
    out |= {"result": "refused" if type(error).__name__ == "CswapError" else "crashed",
            "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
out["seconds"] = round(time.time() - started, 1)
import resource
out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
print("RESULT " + json.dumps(out))
"""

# the smallest input these accept (64 px elsewhere): Inception-v3's stem, MaxViT's 7x7
# windows, ViT-H/14's patches (64 is no multiple of 14)
SIZES = {"inception_v3": 75, "maxvit_t": 224, "vit_h_14": 70}


def _limit(memory_gb: float):
    def apply() -> None:
        cap = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return apply


def run_one(name: str, memory_gb: float, timeout: float, budget_gb: float) -> dict:
    size = SIZES.get(name, 64)
    started = time.time()
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, name, str(size), str(budget_gb)],
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_limit(memory_gb),
        )
    except subprocess.TimeoutExpired:
        return {"model": name, "result": "timeout", "seconds": round(time.time() - started, 1)}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {
        "model": name,
        "result": "crashed",
        "error": f"exit {done.returncode}: {tail}",
        "seconds": round(time.time() - started, 1),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| architecture | result | units | params removed | excluded groups (why) "
        "| peak RSS GB | seconds | code |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        excluded = "; ".join(row.get("excluded", [])) or "-"
        detail = row.get("error", "")
        result = row["result"] + (f": {detail}" if detail else "")
        lines.append(
            f"| {row['model']} | {result.replace('|', '/')} | {row.get('units', '-')} | "
            f"{row.get('params_reduction', '-')} | {excluded.replace('|', '/')[:300]} | "
            f"{row.get('peak_rss_gb', '-')} | {row['seconds']} | {row.get('commit', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/architectures.json"))
    parser.add_argument("--doc", type=Path, default=None)
    parser.add_argument("--memory-gb", type=float, default=12.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--budget-gb",
        type=float,
        default=6.0,
        help="cswap's max_memory_gb (refuse what cannot fit)",
    )
    parser.add_argument("--models", default="", help="comma list (default: every one)")
    parser.add_argument(
        "--merge", action="store_true", help="keep --out's rows of models not run this time"
    )
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m] or sorted(
        torchvision.models.list_models(module=torchvision.models)
    )
    kept = json.loads(args.out.read_text()) if args.merge and args.out.exists() else []
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    fresh: dict[str, dict] = {}
    for name in names:
        fresh[name] = run_one(name, args.memory_gb, args.timeout, args.budget_gb) | {
            "commit": commit
        }
        print(json.dumps(fresh[name]), flush=True)
        rows = sorted(
            [row for row in kept if row["model"] not in fresh] + list(fresh.values()),
            key=lambda row: row["model"],
        )
        args.out.write_text(json.dumps(rows, indent=1))
    counts = {}
    for row in rows:
        counts[row["result"]] = counts.get(row["result"], 0) + 1
    print(counts)
    if args.doc is not None:
        args.doc.write_text(
            "# torchvision architectures through cswap\n\n"
            "`.venv/bin/python benchmarks/architectures.py --doc docs/architectures.md` "
            "(random init, 10 classes, 40 random images at 64 px, L1 one-shot to 20% of the "
            f"parameters, no compensation, max_memory_gb={args.budget_gb:g} (a run that cannot "
            f"fit is refused up front), {args.memory_gb:g} GB address-space cap (peak resident "
            "memory in the table) and "
            f"{args.timeout:g} s per model, 2 CPU cores). Counts: {counts}.\n\n"
            + markdown(rows)
            + "\n"
        )


if __name__ == "__main__":
    main()
