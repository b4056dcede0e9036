"""The confirm stage: the search's best configurations re-run with fresh seeds.

A search runs most configurations once, on one seed, and its best value was picked for being
low: it is biased, and seed-to-seed noise can order close configurations wrongly. With
``search.confirm: {top_k, seeds}`` in the space, once the search has finished the ``top_k``
completed configurations by best_val_loss (distinct ``config_id``, best first as ``mode`` says)
are re-run with ``seeds`` seeds that no search trial used, to full length and never pruned.
They are ordinary trials of the same run, in the same trials.parquet and history, recorded with
``stage: confirm`` and the ``config_id`` of the search trial they replicate. The sweep runs them
as a second Tuner whose searcher (``ReplicaSearcher``) hands out each configuration x seed once;
its Ray experiment lives in ``<run dir>/confirm``.

``config_id`` names a configuration: 12 hex digits of the SHA-256 of its effective settings
(fixed + searched) without ``seed``, as canonical JSON. Every finished trial's row carries one,
so the replicas of one configuration share it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.tune.search import Searcher

from tune_sana.config import TrialConfig
from tune_sana.engine.space import SweepSpec, search_trials
from tune_sana.outcomes import Outcome, Stage
from tune_sana.record.readers import read_trials
from tune_sana.record.schema import CONFIG_NAMES, TRIALS_FILE
from tune_sana.record.storage import Location

STAGE_SEARCH = Stage.SEARCH.value  # the searcher proposed it (or a row from before v2)
STAGE_CONFIRM = Stage.CONFIRM.value  # a replica of a chosen configuration with a fresh seed
FOLDER = "confirm"  # the confirm stage's Ray experiment, inside the run directory
SEED_KEY = "seed"
DEFAULT_SEED = int(TrialConfig.model_fields[SEED_KEY].default)  # a trial given no seed


def config_id(config: Mapping[str, Any]) -> str:
    """12 hex digits naming a configuration: the same for every seed of it.

    Values are taken as the record keeps them, so a configuration read back from
    trials.parquet has the id of the one that ran: a whole float is the integer (a float
    column holds a choice of 1 as 1.0), an enum is its value, a tuple is a list.
    """
    return digest({k: v for k, v in config.items() if k != SEED_KEY})


def digest(settings: Mapping[str, Any]) -> str:
    """12 hex digits of the SHA-256 of ``settings`` as canonical JSON (values as the record
    keeps them: see config_id). Names a configuration here, a frontier combination there."""
    canonical = {str(k): _canonical(v) for k, v in settings.items()}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _canonical(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        value = value.value
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # a numpy scalar
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def stage_of(row: Mapping[str, Any]) -> str:
    return str(row.get("stage") or STAGE_SEARCH)


def trial_rows(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every trials.parquet row (none before the first trial finished)."""
    if not (Location.of(run_dir) / TRIALS_FILE).is_file():
        return []
    return [dict(r) for r in read_trials(run_dir).to_pylist()]


def searched_values(spec: SweepSpec, row: Mapping[str, Any]) -> dict[str, Any]:
    """The values of the searched keys a trial ran with, from its trials.parquet row (a key of
    TrialConfig has its own column; any other key is in config_json)."""
    extra = json.loads(row.get("config_json") or "null") or {}
    values: dict[str, Any] = {}
    for key in spec.space:
        if key in CONFIG_NAMES:
            values[key] = row.get(key)
        elif key in extra:
            values[key] = extra[key]
    return values


def search_finished(spec: SweepSpec, rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every trial of the search is recorded. A search stopped early (Ray ends
    ``fit`` quietly on Ctrl-C) has fewer: its top configurations are not known yet."""
    done = {r["trial_id"] for r in rows if stage_of(r) == STAGE_SEARCH}
    return len(done) >= search_trials(spec)


@dataclass(frozen=True)
class Plan:
    """The configurations chosen for confirmation, best first, and the fresh seeds."""

    configs: tuple[dict[str, Any], ...]  # searched values of each configuration
    config_ids: tuple[str, ...]
    seeds: tuple[int, ...]
    top_k: int

    def replicas(self) -> list[dict[str, Any]]:
        """Each configuration with each seed, seed by seed: a stage cut short has the first
        seed of every configuration before the second of any."""
        return [{**config, SEED_KEY: seed} for seed in self.seeds for config in self.configs]

    def pending(self, spec: SweepSpec, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The replicas not yet recorded as confirm-stage trials."""
        done = {(r.get("config_id"), r.get(SEED_KEY)) for r in rows
                if stage_of(r) == STAGE_CONFIRM}
        return [rep for rep in self.replicas()
                if (config_id({**spec.fixed, **rep}), rep[SEED_KEY]) not in done]

    def describe(self) -> str:
        """The progress line that opens the stage."""
        n, k = len(self.configs), len(self.seeds)
        if not n:
            return "confirm: no search trial completed; nothing to confirm"
        line = (f"confirm: re-running top {n} configuration{_s(n)} with {k} fresh "
                f"seed{_s(k)} each ({n * k} trial{_s(n * k)})")
        if n < self.top_k:
            line += f"; only {n} distinct configuration{_s(n)} completed (top_k {self.top_k})"
        return line


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def plan(spec: SweepSpec, rows: Sequence[Mapping[str, Any]]) -> Plan:
    """The search's ``top_k`` completed configurations by best_val_loss (distinct config_id;
    ties by trial id, so a resumed run chooses the same) and ``seeds`` seeds above every seed
    a search trial used."""
    if spec.search.confirm is None:
        raise ValueError("the spec has no search.confirm")
    search = [r for r in rows if stage_of(r) == STAGE_SEARCH]
    used = {DEFAULT_SEED if r.get(SEED_KEY) is None else int(r[SEED_KEY]) for r in search}
    fixed_seed = spec.fixed.get(SEED_KEY)
    used.add(DEFAULT_SEED if fixed_seed is None else int(fixed_seed))
    sign = 1.0 if spec.mode == "min" else -1.0
    completed = sorted(
        (r for r in search if r.get("outcome") == Outcome.COMPLETED.value
         and isinstance(r.get("best_val_loss"), (int, float))
         and math.isfinite(r["best_val_loss"])),
        key=lambda r: (sign * float(r["best_val_loss"]), str(r["trial_id"])))
    configs: list[dict[str, Any]] = []
    ids: list[str] = []
    for row in completed:
        values = searched_values(spec, row)
        cid = row.get("config_id") or config_id({**spec.fixed, **values})
        if cid in ids:
            continue
        configs.append(values)
        ids.append(cid)
        if len(configs) == spec.search.confirm.top_k:
            break
    first = max(used) + 1
    seeds = tuple(range(first, first + spec.search.confirm.seeds))
    return Plan(tuple(configs), tuple(ids), seeds, spec.search.confirm.top_k)


class ReplicaSearcher(Searcher):
    """Hands out each configuration of a list once, in order, then says FINISHED: no sampling
    and no model. Saves what it has left, so a restored Tuner goes on where it stopped."""

    def __init__(self, configs: Sequence[Mapping[str, Any]], metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self._left = [dict(c) for c in configs]

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self._left:
            finished: Any = Searcher.FINISHED  # a str, though Ray types suggest's return dict
            return finished  # type: ignore[no-any-return]
        return self._left.pop(0)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        pass  # nothing to learn: every configuration is already chosen

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as fh:  # plain values: JSON, never pickle
            json.dump({"left": self._left}, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as fh:
            self._left = list(json.load(fh)["left"])
