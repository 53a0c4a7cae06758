"""The benchmark scripts' --out: a finished result is never replaced unless asked, and a result
is written whole or not at all."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def refuse_existing(parser: argparse.ArgumentParser, out: Path | None, overwrite: bool) -> None:
    """Stop before any work when ``out`` already holds a result."""
    if out is not None and out.exists() and not overwrite:
        parser.error(f"--out {out} already holds a result: another path, or --overwrite")


def write_whole(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(text)
    partial.replace(out)
