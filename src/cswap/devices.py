"""Device selection shared by the API and the CLI."""

from __future__ import annotations

import torch

from cswap.errors import CswapError


def resolve_device(name: str | None = None) -> str:
    """``name`` checked for availability; None means cuda when available, else cpu."""
    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CswapError(
            "--device cuda was asked for but no CUDA GPU is available.", "use --device cpu."
        )
    if name != "cpu" and not name.startswith("cuda"):
        raise CswapError(f"Unknown device {name!r}.", "use cpu or cuda (or cuda:N).")
    return name
