"""Entry point of the `cswap` command."""

from __future__ import annotations

import typer

from cswap.cli import bench, prune, zoo

app = typer.Typer(help="C-SWAP: causal structured pruning without training.", no_args_is_help=True)
app.add_typer(zoo.app, name="zoo")
prune.register(app)
bench.register(app)
