"""Causal scoring spread over Ray workers: same effects as one process, shard by shard.

Exact scoring is (units) x (calibration samples) forward passes, and every unit is scored on its
own, so the units split into shards that workers score independently. The driver puts the model,
the compensation statistics and the calibration batch into Ray's object store once per scoring
round; each worker actor fetches them once and keeps them (with the refit bases of the round) for
all its shards. Workers live until ``close()``, so later rounds reuse them. Shards are
contiguous runs of the units in id order, so the sharding is deterministic and the joined
effects equal a single-process ``causal_effects`` call whenever the workers run with the same
torch thread count (each unit's effect is computed by the same operations on the same values;
one unit per pass, as on the CPU by default). The model's own classes (a script's, a test's)
are pickled by value; classes of installed packages must be importable on every worker.

Faults: a worker that dies mid-shard is replaced and its shard re-run; finished shards are kept,
and, with a ``store`` directory (the run's checkpoint directory), written to disk as they finish,
so that a driver that crashes and resumes recomputes no finished shard.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cswap.compensation import Compensation
from cswap.errors import CswapError, first_line
from cswap.scoring import CausalEffects, causal_effects, join_effects, remaining_units
from cswap.timings import record
from cswap.units import UnitSpace

log = logging.getLogger("cswap")
INSTALL_HINT = "pip install 'cswap[ray]' (or pip install ray)."


@dataclass(frozen=True)
class RayConfig:
    workers: int  # actors to start (one per GPU when the device is cuda)
    address: str | None = None  # None: a local runtime with ``workers`` CPUs; "auto": a cluster
    threads: int = 1  # torch threads per worker (the single-process run's count, for identity)
    shards_per_worker: int = 16  # units differ in cost (a suffix per unit): small shards balance

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise CswapError(f"workers={self.workers} must be >= 1.", "use e.g. --workers 2.")


def require_ray():
    try:
        import ray
    except ImportError as error:
        raise CswapError(
            "--workers / ray_address need Ray, which is not installed.", INSTALL_HINT
        ) from error
    return ray


def shards(units: Sequence[int], workers: int, per_worker: int) -> list[tuple[int, ...]]:
    """Contiguous runs of ``units`` in id order: the same split for the same input, always."""
    ordered = sorted(units)
    if not ordered:
        return []
    size = max(1, math.ceil(len(ordered) / (workers * per_worker)))
    return [tuple(ordered[i : i + size]) for i in range(0, len(ordered), size)]


def shard_key(already: Sequence[int], units: Sequence[int], images: str = "") -> str:
    """The name of a shard's stored result: the removal it starts from, its units and the
    images it is scored on (``samples_key``; a round can score on subsets of the images)."""
    text = f"{sorted(already)}|{list(units)}|{images}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def samples_key(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A digest of the images and labels a shard is scored on."""
    digest = hashlib.sha1(str(tuple(images.shape)).encode())
    for tensor in (images, labels):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class _Worker:
    """A Ray actor: holds one round's payload, scores shards of units."""

    def __init__(self, threads: int, name: str) -> None:
        torch.set_num_threads(threads)
        self.name = name
        self.payload = None

    def load(self, payload: dict) -> str:
        payload = dict(payload)
        compensation = payload["compensation"]
        if compensation is not None:  # the round's refits, once per worker
            compensation = compensation.with_base(
                payload["model"], payload["space"], payload["already"]
            )
        payload["compensation"] = compensation
        self.payload = payload
        return self.name

    def score(self, key: str, units: tuple[int, ...]) -> tuple[str, dict, float, str]:
        started = time.perf_counter()
        p = self.payload
        effects = causal_effects(
            p["model"], p["space"], p["images"], p["labels"], units=list(units),
            already_removed=p["already"], compensation=p["compensation"], **p["scoring"],
        )  # fmt: skip
        return key, _arrays(effects), time.perf_counter() - started, self.name


def _arrays(effects: CausalEffects) -> dict[str, np.ndarray]:
    arrays = {
        "unit_ids": effects.unit_ids,
        "relative_effects": effects.relative_effects,
        "labels": effects.labels,
        "baseline": effects.baseline,
    }
    for name in ("log_ratio", "kl"):
        if getattr(effects, name) is not None:
            arrays[name] = getattr(effects, name)
    return arrays


def _effects(arrays) -> CausalEffects:
    return CausalEffects(
        unit_ids=np.asarray(arrays["unit_ids"]),
        relative_effects=np.asarray(arrays["relative_effects"]),
        labels=np.asarray(arrays["labels"]),
        baseline=np.asarray(arrays["baseline"]),
        log_ratio=np.asarray(arrays["log_ratio"]) if "log_ratio" in arrays else None,
        kl=np.asarray(arrays["kl"]) if "kl" in arrays else None,
    )


class RayScoring:
    """``causal_effects`` on Ray actors (see the module docstring); ``close()`` stops them."""

    def __init__(
        self,
        config: RayConfig,
        *,
        device: str = "cpu",
        store: str | Path | None = None,
        on_shard: Callable[[RayScoring, str], None] | None = None,
    ) -> None:
        self.ray = require_ray()
        self.config = config
        self.device = device
        self.store = Path(store) if store is not None else None
        self.on_shard = on_shard  # called after each finished shard (tests inject faults here)
        self.computed: list[str] = []  # keys of the shards computed by workers (not loaded)
        self.worker_seconds: dict[str, float] = {}
        self._started_runtime = False
        if not self.ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False}
            if config.address is None:
                kwargs["num_cpus"] = config.workers
            else:
                kwargs["address"] = config.address
            self.ray.init(**kwargs)
            self._started_runtime = config.address is None
        self._remote = self.ray.remote(_Worker)
        self.actors: list = []
        self._count = 0

    def _new_actor(self, payload_ref):
        self._count += 1
        gpus = 1 if torch.device(self.device).type == "cuda" else 0
        actor = self._remote.options(num_cpus=self.config.threads, num_gpus=gpus).remote(
            self.config.threads, f"worker-{self._count}"
        )
        return actor, actor.load.remote(payload_ref)

    def _check_loads(self, loads) -> None:
        """A worker that cannot unpickle the payload (a model class it cannot import) fails
        here, with one clear error, before any shard is sent."""
        for ref in loads:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayActorError:
                pass  # died: its shards go to a replacement when it is found dead
            except self.ray.exceptions.RayError as error:
                self.close_workers()
                cause = first_line(error.__cause__ or error)
                raise CswapError(
                    f"A Ray worker could not load the model: {cause}.",
                    "the model's classes must be importable on every worker: install their "
                    "package there (or ship it with Ray's runtime_env py_modules).",
                ) from error

    def effects(
        self,
        model: nn.Module,
        space: UnitSpace,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        units: Sequence[int] | None = None,
        already_removed: Sequence[int] = (),
        compensation: Compensation | None = None,
        progress: Callable[[float], None] | None = None,
        **scoring,
    ) -> CausalEffects:
        """The effects ``causal_effects`` would return, scored shard by shard on the workers."""
        already = sorted(set(already_removed))
        if units is None:
            units = remaining_units(space, already)
        pieces = shards(units, self.config.workers, self.config.shards_per_worker)
        data = samples_key(images, labels)
        keys = [shard_key(already, piece, data) for piece in pieces]
        done = {key: self._load(key) for key in keys}
        done = {key: value for key, value in done.items() if value is not None}
        for key, piece in zip(keys, pieces, strict=True):
            if key in done and progress is not None:
                progress(len(piece))
        todo = [(key, piece) for key, piece in zip(keys, pieces, strict=True) if key not in done]
        if todo:
            if next(model.parameters()).device.type != "cpu":  # the object store holds CPU copies
                model = copy.deepcopy(model).cpu()
            if compensation is not None:  # the round's refits once, here, not once per worker
                compensation = self._refits(compensation, model, space, already)
            payload = {
                "model": model, "space": space, "images": images, "labels": labels,
                "already": already, "compensation": compensation,
                "scoring": scoring | {"device": self.device},
            }  # fmt: skip
            _ship_by_value(model)
            done |= self._run(self.ray.put(payload), todo, progress)
        return join_effects([_effects(done[key]) for key in keys])

    def _refits(self, compensation, model, space, already) -> Compensation:
        """The round's refit bases, computed with the workers' thread count: a float64 inverse
        can differ in its last bits with another count, and the effects would follow."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        try:
            return compensation.with_base(model, space, already)
        finally:
            torch.set_num_threads(threads)

    def _run(self, payload_ref, todo, progress) -> dict[str, dict]:
        """Each worker takes the next shard when it finishes one; a dead worker is replaced
        and its shard goes back to the front of the queue."""
        ray = self.ray
        queue = list(todo)
        size = {key: len(piece) for key, piece in todo}
        pending: dict = {}  # ref -> (actor, key, piece)
        results: dict[str, dict] = {}

        def submit(actor) -> None:
            if queue:
                key, piece = queue.pop(0)
                pending[actor.score.remote(key, piece)] = (actor, key, piece)

        loads = [actor.load.remote(payload_ref) for actor in self.actors]  # kept workers
        while len(self.actors) < self.config.workers:
            actor, load = self._new_actor(payload_ref)
            self.actors.append(actor)
            loads.append(load)
        self._check_loads(loads)
        try:
            for actor in self.actors:
                submit(actor)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                actor, key, piece = pending.pop(ready[0])
                try:
                    key, arrays, seconds, name = ray.get(ready[0])
                except ray.exceptions.RayActorError:
                    log.warning("a scoring worker died; its %d units are scored again", len(piece))
                    queue.insert(0, (key, piece))
                    self.actors.remove(actor)
                    actor, load = self._new_actor(payload_ref)
                    self.actors.append(actor)
                    self._check_loads([load])
                else:
                    results[key] = arrays
                    self._finished(key, arrays, seconds, name)
                    if progress is not None:
                        progress(size[key])
                    if self.on_shard is not None:
                        self.on_shard(self, key)
                submit(actor)
        except BaseException:  # an interrupt or a failure: no worker is left holding a CPU
            self.close_workers()
            raise
        return results

    def _finished(self, key: str, arrays: dict, seconds: float, name: str) -> None:
        self.computed.append(key)
        self.worker_seconds[name] = self.worker_seconds.get(name, 0.0) + seconds
        record(f"worker {name}", seconds)
        self._save(key, arrays)

    def _path(self, key: str) -> Path | None:
        return None if self.store is None else self.store / f"shard-{key}.npz"

    def _load(self, key: str) -> dict | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}

    def _save(self, key: str, arrays: dict) -> None:
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp.npz")
        np.savez(temporary, **arrays)
        temporary.replace(path)

    def close_workers(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def close(self) -> None:
        """Stop the workers, and the local runtime if this scorer started it."""
        self.close_workers()
        if self._started_runtime and self.ray.is_initialized():
            self.ray.shutdown()


# Modules whose classes every worker imports from its own installation.
_INSTALLED = ("torch", "torchvision", "timm", "transformers", "cswap", "builtins")


def _ship_by_value(model: nn.Module) -> None:
    """Pickle the model's own classes by value when they come from a script or a test module
    (not an installed package), so that workers need not import them."""
    from ray import cloudpickle

    for module in model.modules():
        name = type(module).__module__
        if name.split(".")[0] in _INSTALLED:
            continue
        source = sys.modules.get(name)
        if source is not None and getattr(source, "__file__", None):
            cloudpickle.register_pickle_by_value(source)
