"""Options and error handling shared by the CLI commands."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from cswap.errors import CswapError

DeviceOption = Annotated[
    str | None, typer.Option(help="cpu or cuda; default: cuda when available, else cpu.")
]
BatchSizeOption = Annotated[int, typer.Option(min=1, help="Images per forward pass.")]

F = TypeVar("F", bound=Callable)


def fail_cleanly(function: F) -> F:
    """Turn a CswapError into one clear line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except CswapError as error:
            typer.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
