"""Run directories, read for analysis: every finished trial with its effective configuration,
and the trials still running.

Everything here reads ``trials.parquet`` and ``history/`` with pyarrow (column projection, a
trial filter pushed into the scan, ``group_by`` for the running trials); no Python loop runs
over rows. A sweep that is still running works: its unfinished trials come from the history
alone (no config yet).

The effective configuration (:func:`effective_configs`) is the one rule for what a trial ran
with; the report, ``tune-sana best`` and ``tune-sana export`` all read configs through it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tune_sana.analysis.noise import SEARCH
from tune_sana.config import TrialConfig, UserError
from tune_sana.record.readers import (
    RunSpec,
    history_trial_ids,
    read_history,
    read_run_spec,
    read_trial_columns,
)
from tune_sana.record.schema import CONFIG_NAMES
from tune_sana.record.storage import Location, is_uri

SUMMARY_COLUMNS = ["outcome", "divergence_cause", "diverged_step", "nonfinite_module",
                   "best_val_loss", "base_val_loss", "improvement", "base_retain_loss",
                   "final_retain_loss", "steps_run", "wall_time_s", "stage", "config_id",
                   "damaged_at_load", "native_base_val_loss"]


@dataclass(frozen=True)
class Run:
    """One run directory, read: finished trials with their effective config, and running ones.

    ``trials``: trial_id, every config column (see :func:`effective_configs`; null where the
    effective value is null, e.g. ``max_grad_norm`` with clipping off) and SUMMARY_COLUMNS,
    plus ``lr_decade``; one row per finished trial. ``stage`` is "search" where a run written
    before the confirm stage left it null; that run's base and improvement columns are null.
    ``running``: trial_id, best_val_loss, base_val_loss, improvement, steps_run, wall_time_s
    for trials seen in history/ but not yet in trials.parquet.
    ``searched``: the config keys the run's spec searched (empty if no spec was found).
    """

    label: str
    path: Path | str
    trials: pa.Table
    running: pa.Table
    searched: tuple[str, ...] = ()


# --- the effective configuration -------------------------------------------------------------

def effective_configs(trials: pa.Table, spec: RunSpec) -> pa.Table:
    """``trials`` with each config column holding what the trial ran with.

    Ray records only a trial's searched keys, so a config cell may be null for "not recorded".
    Per config column (TrialConfig's fields; other columns pass through untouched):

    - a key the spec searched keeps its recorded value, null included (``max_grad_norm: null``
      is a choice: clipping off);
    - any other recorded non-null value is kept;
    - any other null takes the spec's fixed value, else TrialConfig's default; where that value
      is itself null (``loss_spike_factor: null`` fixed, ``variant``'s default) the cell stays
      null, which then means None.

    So a null cell of the result is a None setting, never a missing one. Enums fill as their
    string values. A config column ``trials`` lacks is left out. Vectorised: one
    ``fill_null`` per column. UserError naming the spec's file where a fixed value does not
    fit its column's type.
    """
    for name in CONFIG_NAMES:
        if name in spec.searched or name not in trials.column_names:
            continue
        value = spec.fixed[name] if name in spec.fixed else TrialConfig.model_fields[name].default
        if value is None:
            continue
        index = trials.schema.get_field_index(name)
        column = trials.column(index)
        fill = _scalar(getattr(value, "value", value), column.type, name, spec)
        trials = trials.set_column(index, name, pc.fill_null(column, fill))
    return trials


def _scalar(value: Any, type_: pa.DataType, name: str, spec: RunSpec) -> pa.Scalar:
    """``value`` as a scalar of the config column's type (strings as ``str(value)``); a value
    the type would change (1.5 in an int64 column) is refused, not truncated."""
    if pa.types.is_string(type_):
        return pa.scalar(str(value), type=type_)
    try:
        scalar = pa.scalar(value, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        scalar = None
    if scalar is None or scalar.as_py() != value:
        raise UserError(f"{spec.source}: fixed {name}: {value!r} is not a {type_} value; "
                        "restore the file the sweep wrote")
    return scalar


# --- reading ---------------------------------------------------------------------------------

def lr_decade(lr: pa.ChunkedArray | pa.Array) -> pa.Array | pa.ChunkedArray:
    """floor(log10(lr)) as int64 (1e-4 and 9.9e-4 -> -4); the 1e-9 absorbs log10 rounding.
    A null lr gives a null decade."""
    decade: pa.Array | pa.ChunkedArray = pc.floor(pc.add(pc.log10(lr), 1e-9)).cast(pa.int64())
    return decade


def _running(run_dir: str | os.PathLike[str] | Location,
             finished: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Trials in history/ that are not among ``finished`` (trial ids), summarised from their
    rows: trial_id, best_val_loss (min of the non-null val_loss after step 0; null if none),
    base_val_loss (step 0's val_loss: the untouched base), improvement, steps_run (the last
    step: updates done), wall_time_s; sorted by trial_id."""
    ids = history_trial_ids(run_dir)  # streamed: no column of ten million strings
    done = finished.combine_chunks() if isinstance(finished, pa.ChunkedArray) else finished
    running = ids.filter(pc.invert(pc.is_in(ids, value_set=done)))
    if len(running) == 0:
        return pa.table({"trial_id": pa.array([], pa.string()),
                         **{name: pa.array([], pa.float64())
                            for name in ("best_val_loss", "base_val_loss", "improvement")},
                         "steps_run": pa.array([], pa.int64()),
                         "wall_time_s": pa.array([], pa.float64())})
    hist = read_history(run_dir, columns=["trial_id", "step", "val_loss", "timestamp"],
                        trial_ids=running.to_pylist())
    trained = pc.greater(hist["step"], 0)
    hist = hist.append_column("trained_val", pc.if_else(
        trained, hist["val_loss"], pa.scalar(None, pa.float64())))
    hist = hist.append_column("base_val", pc.if_else(
        trained, pa.scalar(None, pa.float64()), hist["val_loss"]))
    agg = hist.group_by("trial_id").aggregate([
        ("trained_val", "min"), ("base_val", "min"), ("step", "max"), ("timestamp", "min"),
        ("timestamp", "max")])
    best, base = agg["trained_val_min"], agg["base_val_min"]
    return pa.table({
        "trial_id": agg["trial_id"],
        "best_val_loss": best,
        "base_val_loss": base,
        "improvement": improvement(best, base),
        "steps_run": agg["step_max"],
        "wall_time_s": pc.subtract(agg["timestamp_max"], agg["timestamp_min"]),
    }).sort_by("trial_id")


def improvement(best: pa.Array | pa.ChunkedArray,
                base: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """1 - best / base, as the record defines it (null where either is null)."""
    out: pa.Array | pa.ChunkedArray = pc.subtract(1.0, pc.divide(best, base))
    return out


def run_label(path: Path | PurePath, others: Sequence[Path | PurePath] = ()) -> str:
    """The folder name, or parent/name where two run dirs share a name."""
    if sum(p.name == path.name for p in others) > 1:
        return f"{path.parent.name}/{path.name}"
    return path.name


def load_run(run_dir: str | os.PathLike[str], label: str | None = None) -> Run:
    """Read one run dir, a local folder or a URI (UserError if it is not one). Works while the
    sweep runs."""
    path = Location.of(run_dir)
    trials = read_trial_columns(path, ["trial_id", *CONFIG_NAMES, *SUMMARY_COLUMNS])
    spec = read_run_spec(path)
    trials = effective_configs(trials, spec)
    stage = trials.schema.get_field_index("stage")
    trials = trials.set_column(stage, "stage", pc.fill_null(trials["stage"], SEARCH))
    trials = trials.append_column("lr_decade", lr_decade(trials["lr"]))
    running = _running(path, trials["trial_id"])
    return Run(label or path.name, path.public(), trials, running,
               tuple(k for k in CONFIG_NAMES if k in spec.searched))


def load_runs(run_dirs: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """Every run dir, labelled by :func:`run_label`; UserError for a run dir given twice."""
    paths: list[Path | str] = [str(p) if is_uri(p) else Path(p) for p in run_dirs]
    # Local folders resolved (symlinks, ..); a URI by the path on its filesystem.
    resolved: list[Path | PurePath] = [
        PurePosixPath(Location.of(p).path) if isinstance(p, str) else p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise UserError(f"{paths[i]}: run dir given twice; pass each run dir once")
    return [load_run(p, run_label(r, resolved)) for p, r in zip(paths, resolved, strict=True)]
