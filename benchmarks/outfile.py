"""The benchmark scripts' --out: a finished result is never replaced unless asked, and a result
is written whole or not at all."""

from __future__ import annotations

import argparse
from pathlib import Path

from cswap.cli.bench import write_whole

__all__ = ["add_overwrite", "refuse_existing", "write_whole"]


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def refuse_existing(parser: argparse.ArgumentParser, out: Path | None, overwrite: bool) -> None:
    """Stop before any work when ``out`` already holds a result."""
    if out is not None and out.exists() and not overwrite:
        parser.error(f"--out {out} already holds a result: another path, or --overwrite")
