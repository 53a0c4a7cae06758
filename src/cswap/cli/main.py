"""Entry point of the `cswap` command."""

from __future__ import annotations

import typer

from cswap.cli import zoo
from cswap.cli.common import BatchSizeOption, DeviceOption, fail_cleanly

app = typer.Typer(help="C-SWAP: causal structured pruning without training.", no_args_is_help=True)
app.add_typer(zoo.app, name="zoo")


@app.command("demo")
@fail_cleanly
def demo_command(device: DeviceOption = None, batch_size: BatchSizeOption = 500) -> None:
    """The default main job: evaluate every zoo model on the Fashion-MNIST test split."""
    from cswap.devices import resolve_device
    from cswap.zoo.registry import ZOO
    from cswap.zoo.store import evaluate_zoo_model, read_manifest

    resolved = resolve_device(device)
    recorded = read_manifest()["models"]
    typer.echo(f"{'model':10s} {'test acc':>9s} {'manifest':>9s} {'params':>10s} {'MACs':>12s}")
    for name in ZOO:
        if name not in recorded:
            typer.echo(f"{name:10s} untrained (cswap zoo train {name})")
            continue
        result = evaluate_zoo_model(name, device=resolved, batch_size=batch_size)
        typer.echo(
            f"{name:10s} {result.test_accuracy:9.4f} {recorded[name]['test_accuracy']:9.4f} "
            f"{result.params:>10,} {result.macs:>12,}"
        )
