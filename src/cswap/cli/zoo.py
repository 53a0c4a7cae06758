"""`cswap zoo list | train NAME | eval NAME`."""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer

from cswap.cli.common import BatchSizeOption, DeviceOption, fail_cleanly
from cswap.zoo.registry import ZOO, get_entry

app = typer.Typer(help="The reference model zoo (trained on Fashion-MNIST).", no_args_is_help=True)


@app.command("list")
@fail_cleanly
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List zoo models with their recorded test accuracy, params and MACs."""
    from cswap.zoo.store import read_manifest

    models = read_manifest()["models"]
    rows = []
    for name, entry in ZOO.items():
        recorded = models.get(name, {})
        rows.append(
            {
                "name": name,
                "description": entry.description,
                "test_accuracy": recorded.get("test_accuracy"),
                "params": recorded.get("params"),
                "macs": recorded.get("macs"),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    typer.echo(f"{'name':10s} {'test acc':>9s} {'params':>10s} {'MACs':>12s}  description")
    for row in rows:
        accuracy = "untrained" if row["test_accuracy"] is None else f"{row['test_accuracy']:.4f}"
        params = "-" if row["params"] is None else f"{row['params']:,}"
        macs = "-" if row["macs"] is None else f"{row['macs']:,}"
        typer.echo(
            f"{row['name']:10s} {accuracy:>9s} {params:>10s} {macs:>12s}  {row['description']}"
        )


@app.command("train")
@fail_cleanly
def train_command(
    name: Annotated[str, typer.Argument(help="Zoo model name (see `cswap zoo list`).")],
    device: DeviceOption = None,
) -> None:
    """Train a zoo model with its recorded recipe; write its weights and manifest entry.

    Takes up to ~90 minutes on 2 CPU cores: run it in the background.
    """
    from cswap.devices import resolve_device
    from cswap.zoo.store import build, record
    from cswap.zoo.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    entry = get_entry(name)
    result = train(entry, build(entry), device=resolve_device(device))
    recorded = record(
        name, result.model.cpu(), training_seconds=result.seconds, command=f"cswap zoo train {name}"
    )
    typer.echo(json.dumps({k: recorded[k] for k in ("name", "test_accuracy", "params", "macs")}))


@app.command("eval")
@fail_cleanly
def eval_command(
    name: Annotated[str, typer.Argument(help="Zoo model name (see `cswap zoo list`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: DeviceOption = None,
    batch_size: BatchSizeOption = 500,
) -> None:
    """Evaluate a zoo model on the full 10,000-image Fashion-MNIST test split."""
    from cswap.devices import resolve_device
    from cswap.zoo.store import evaluate_zoo_model, read_manifest

    evaluation = evaluate_zoo_model(name, device=resolve_device(device), batch_size=batch_size)
    recorded = read_manifest()["models"].get(name, {})
    result = evaluation.to_dict() | {
        "manifest_test_accuracy": recorded.get("test_accuracy"),
        "matches_manifest": recorded.get("test_accuracy") is not None
        and abs(recorded["test_accuracy"] - evaluation.test_accuracy)
        <= 1.0 / evaluation.test_images,
        "accuracy_floor": get_entry(name).accuracy_floor,
    }
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"{name}: test accuracy {evaluation.test_accuracy:.4f} on {evaluation.test_images} "
            f"images (manifest {result['manifest_test_accuracy']}), params {evaluation.params:,}, "
            f"MACs {evaluation.macs:,}"
        )
