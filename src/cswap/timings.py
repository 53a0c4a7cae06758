"""Where a run's time goes: every stage times itself into the run's ``Timings``.

A stage is a ``with stage("scoring round"):`` block anywhere in the pipeline; the run that wants
the numbers activates a ``Timings`` around its work (a context variable, so nothing is threaded
through the stages' signatures and code run outside a run costs nothing). Stages may nest: a
refit inside a scoring round is recorded with ``within`` naming the round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CURRENT: ContextVar[Timings | None] = ContextVar("cswap_timings", default=None)


class Timings:
    def __init__(self) -> None:
        self.records: list[dict] = []
        self._open: list[str] = []

    @contextmanager
    def activate(self) -> Iterator[Timings]:
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    def totals(self) -> dict[str, dict]:
        """Per stage: total seconds, how many times it ran, and the stage it ran within."""
        totals: dict[str, dict] = {}
        for record in self.records:
            entry = totals.setdefault(
                record["stage"], {"seconds": 0.0, "count": 0, "within": record["within"]}
            )
            entry["seconds"] = round(entry["seconds"] + record["seconds"], 3)
            entry["count"] += 1
        return totals

    def to_dict(self) -> dict:
        return {"stages": list(self.records), "totals": self.totals()}


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as ``name`` in the active ``Timings`` (a no-op without one)."""
    timings = _CURRENT.get()
    if timings is None:
        yield
        return
    within = timings._open[-1] if timings._open else None
    timings._open.append(name)
    started = time.perf_counter()
    try:
        yield
    finally:
        timings._open.pop()
        seconds = round(time.perf_counter() - started, 4)
        timings.records.append({"stage": name, "seconds": seconds, "within": within})


def summary(totals: dict[str, dict]) -> str:
    """One line: each top-level stage's seconds (and count), nested ones in brackets."""
    parts = []
    for name, entry in totals.items():
        if entry["within"] is not None:
            continue
        text = f"{name} {entry['seconds']:.1f} s" + (
            f" ({entry['count']}x)" if entry["count"] > 1 else ""
        )
        inner = [
            f"{child} {value['seconds']:.1f} s"
            for child, value in totals.items()
            if value["within"] == name
        ]
        parts.append(text + (f" [of which {', '.join(inner)}]" if inner else ""))
    return "; ".join(parts)


def record(name: str, seconds: float) -> None:
    """Add time measured elsewhere (e.g. on a worker) as ``name``, within the current stage."""
    timings = _CURRENT.get()
    if timings is not None:
        within = timings._open[-1] if timings._open else None
        timings.records.append({"stage": name, "seconds": round(seconds, 4), "within": within})
