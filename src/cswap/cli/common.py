"""Options and error handling shared by the CLI commands."""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import click
import typer

from cswap.errors import CswapError, first_line

DeviceOption = Annotated[
    str | None, typer.Option(help="cpu or cuda; default: cuda when available, else cpu.")
]
BatchSizeOption = Annotated[int, typer.Option(min=1, help="Images per forward pass.")]

F = TypeVar("F", bound=Callable)


# `cswap --debug COMMAND` (or CSWAP_DEBUG=1): unexpected errors show their traceback
def _debug_from_environment() -> bool:
    return os.environ.get("CSWAP_DEBUG", "") not in ("", "0")


DEBUG = {"on": _debug_from_environment()}


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


def _interrupted_message(out: Path | None) -> str:
    if out is not None and (Path(out) / "checkpoint.json").is_file():
        return (
            f"interrupted. The last accepted step is saved in {out}/checkpoint.json: rerun the "
            "same command with --resume to continue from it."
        )
    return "interrupted before any step was accepted: nothing to resume, rerun the command."


def fail_cleanly(function: F) -> F:
    """One clear line on stderr instead of a traceback: a CswapError exits 2, an interrupt
    (Ctrl-C or SIGTERM) 130 with how to resume, anything unexpected 1 (its traceback with
    ``cswap --debug``)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:  # SIGTERM (e.g. a job scheduler) ends the run like Ctrl-C: cleaned up, resumable
            previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        try:
            return function(*args, **kwargs)
        except CswapError as error:
            typer.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            typer.echo(_interrupted_message(kwargs.get("out")), err=True)
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:
            if DEBUG["on"]:
                raise
            typer.echo(
                f"error: unexpected {type(error).__name__}: {first_line(error)}. This is a bug "
                "in cswap or a model it does not handle yet: rerun as `cswap --debug ...` for "
                "the traceback, and please report it.",
                err=True,
            )
            sys.exit(1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]
