"""Entry point of the `cswap` command."""

from __future__ import annotations

from typing import Annotated

import typer

from cswap.cli import bench, prune, zoo
from cswap.cli.common import DEBUG, _debug_from_environment

app = typer.Typer(help="C-SWAP: causal structured pruning without training.", no_args_is_help=True)


@app.callback()
def main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")
    ] = False,
) -> None:
    """C-SWAP: causal structured pruning without training."""
    DEBUG["on"] = debug or _debug_from_environment()


app.add_typer(zoo.app, name="zoo")
prune.register(app)
bench.register(app)
