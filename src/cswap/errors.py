"""One exception type for every user-facing problem: the message names the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class CswapError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} Fix: {fix}")


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, shortened: torch's messages run to pages."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def running_model(images_shape: tuple[int, ...], what: str = "the data") -> Iterator[None]:
    """Turn the error of a model that cannot run on the given images into one clear line.

    Data whose channels, size or shape do not fit the model raise deep inside torch (a shape
    mismatch in some layer): the user needs to hear that the images do not fit, not where.
    """
    try:
        yield
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as error:
        raise CswapError(
            f"The model cannot run on {what} (images of shape {tuple(images_shape)}): "
            f"{first_line(error)}.",
            "give images with the channels and size the model expects (for a model spec, "
            "the data are resized to its input; for your own model, transform the Dataset).",
        ) from error
