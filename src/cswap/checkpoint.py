"""Checkpoints of the progressive loop: every accepted step, every scoring round and the ranking
in use, so that ``resume`` continues exactly where a run stopped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cswap.categorize import Categorization, CategoryConfig, Ranking
from cswap.errors import CswapError, first_line
from cswap.report import units_arrays
from cswap.schedule import ScheduleState, Step

log = logging.getLogger("cswap")
CHECKPOINT = "checkpoint.json"
CHECKPOINT_SCORES = "checkpoint_scores.npz"


def _categorization_arrays(prefix: str, categorization: Categorization) -> dict[str, np.ndarray]:
    return {f"{prefix}{key}": value for key, value in units_arrays(categorization).items()}


def load_categorization(arrays, prefix: str, config: CategoryConfig) -> Categorization:
    """A Categorization from the arrays ``units_arrays`` wrote (keys under ``prefix``)."""
    return Categorization(
        unit_ids=arrays[prefix + "unit_ids"],
        xi=arrays[prefix + "xi"],
        tested_classes=arrays[prefix + "tested_classes"],
        class_means=arrays[prefix + "class_means"],
        class_p_values=arrays[prefix + "class_p_values"],
        detrimental_p_values=arrays[prefix + "detrimental_p_values"],
        categories=arrays[prefix + "categories"].astype(object),
        config=config,
        log_ratio=arrays[prefix + "log_ratio"],
        kl=arrays[prefix + "kl"],
        joint=arrays.get(prefix + "joint", None),
    )


class Checkpoint:
    """Accepted steps, every scoring round and the ranking in use: ``resume`` continues exactly."""

    def __init__(self, directory: Path, fingerprint: dict) -> None:
        self.directory = directory
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples: lists)

    def save(
        self,
        state: ScheduleState,
        ranking: Ranking,
        rounds: list[tuple[int, Categorization]],
        notes: list[dict] | None = None,
    ) -> None:
        """``notes``: per round, what it spent (units scored exactly / estimated)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        data = {
            "fingerprint": self.fingerprint,
            "state": {
                "removed": list(state.removed),
                "failed": list(state.failed),
                "steps": [step.to_dict() for step in state.steps],
                "chunk_params": state.chunk_params,
                "cost_at_last_ranking": state.cost_at_last_ranking,
                "consecutive_failures": state.consecutive_failures,
                "block_limit": state.block_limit,
            },
            "ranking": {
                "order": list(ranking.order),
                "scores": {str(k): v for k, v in ranking.scores.items()},
                "categories": {str(k): v for k, v in ranking.categories.items()},
            },
            "rounds": [count for count, _ in rounds],
            "round_notes": list(notes or []),
        }
        arrays: dict[str, np.ndarray] = {}
        for index, (_, categorization) in enumerate(rounds):
            arrays |= _categorization_arrays(f"round{index}_", categorization)
        # each file is replaced whole: an interrupt leaves the previous or the new one, and
        # the scores file only ever gains rounds, so the JSON's rounds are always in it
        scores = self.directory / (CHECKPOINT_SCORES + ".tmp.npz")
        np.savez_compressed(scores, **arrays)
        scores.replace(self.directory / CHECKPOINT_SCORES)
        temporary = self.directory / (CHECKPOINT + ".tmp")
        temporary.write_text(json.dumps(data))
        temporary.replace(self.directory / CHECKPOINT)

    def load(
        self, config: CategoryConfig
    ) -> tuple[ScheduleState | None, Ranking | None, list[tuple[int, Categorization]], list[dict]]:
        """(state, ranking, rounds, round notes) of the last save; Nones and empty lists when
        there is no checkpoint."""
        path = self.directory / CHECKPOINT
        if not path.is_file():
            log.info("no checkpoint in %s: starting afresh", self.directory)
            return None, None, [], []
        try:
            return self._read(path, config)
        except CswapError:
            raise
        except Exception as error:  # truncated JSON, missing keys, a damaged scores file
            raise CswapError(
                f"The checkpoint in {self.directory} is damaged ({type(error).__name__}: "
                f"{first_line(error)}).",
                "start afresh: rerun without --resume and with --overwrite.",
            ) from error

    def _read(self, path: Path, config: CategoryConfig):
        data = json.loads(path.read_text())
        if data["fingerprint"] != self.fingerprint:
            raise CswapError(
                f"The checkpoint in {self.directory} was made with other weights, data or "
                "settings.",
                "rerun with the same arguments, or without --resume and with --overwrite.",
            )
        raw = data["state"]
        steps = tuple(
            Step(
                index=s["index"],
                units=tuple(s["units"]),
                accepted=s["accepted"],
                params=s["params"],
                macs=s["macs"],
                val_accuracy=s["val_accuracy"],
                paired_se=s["paired_se"],
                rescored_after=s["rescored_after"],
                probe=s.get("probe", False),
                stopped_early=s.get("stopped_early", False),
            )
            for s in raw["steps"]
        )
        state = ScheduleState(
            removed=tuple(raw["removed"]),
            failed=tuple(raw["failed"]),
            steps=steps,
            chunk_params=raw["chunk_params"],
            cost_at_last_ranking=raw["cost_at_last_ranking"],
            consecutive_failures=raw["consecutive_failures"],
            block_limit=raw["block_limit"],
        )
        ranking = Ranking(
            order=tuple(data["ranking"]["order"]),
            scores={int(k): v for k, v in data["ranking"]["scores"].items()},
            categories={int(k): v for k, v in data["ranking"]["categories"].items()},
        )
        arrays = np.load(self.directory / CHECKPOINT_SCORES, allow_pickle=False)
        rounds = []
        for index, count in enumerate(data["rounds"]):
            prefix = f"round{index}_"
            rounds.append(
                (
                    count,
                    load_categorization(arrays, prefix, config),
                )
            )
        log.info("resuming after %d steps, %d units removed", len(steps), len(state.removed))
        return state, ranking, rounds, list(data.get("round_notes", []))
