"""Reading the record with pyarrow: trials.parquet, the history dataset, file metadata, and
the run's spec (sweep.yaml), each read here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import yaml

from tune_sana.config import UserError
from tune_sana.record.schema import (
    FRONTIER_FILE,
    FRONTIER_SCHEMA,
    HISTORY_DIR,
    HISTORY_SCHEMA,
    SPEC_FILE,
    TRIALS_FILE,
    TRIALS_SCHEMA,
)
from tune_sana.record.storage import Location

# The trial program a spec runs when it names none (SweepSpec's default).
DEFAULT_TRIAL = "sana_finetune"
_SPEC_KEY = "tune_sana.spec"


def _require_run_dir(run_dir: Location) -> None:
    if not (run_dir / TRIALS_FILE).is_file() and not (run_dir / HISTORY_DIR).is_dir():
        raise UserError(
            f"{run_dir}: not a tune-sana run directory (no {TRIALS_FILE} or {HISTORY_DIR}/); "
            "pass the folder that tune-sana sweep printed"
        )


def read_trials(run_dir: str | os.PathLike[str] | Location,
                columns: list[str] | None = None) -> pa.Table:
    """trials.parquet (an empty TRIALS_SCHEMA table while no trial has finished). ``run_dir``:
    a local folder or a URI."""
    folder = Location.of(run_dir)
    _require_run_dir(folder)
    path = folder / TRIALS_FILE
    if not path.is_file():
        empty = TRIALS_SCHEMA.empty_table()
        return empty.select(columns) if columns else empty
    return path.read_table(columns=columns)


def read_trial_columns(run_dir: str | os.PathLike[str] | Location,
                       columns: Sequence[str]) -> pa.Table:
    """``columns`` of trials.parquet, read with projection. A column the file lacks (written
    before a TrialConfig field or summary column existed) comes back as nulls of its
    TRIALS_SCHEMA type, so files of older versions still read."""
    folder = Location.of(run_dir)
    path = folder / TRIALS_FILE
    present = set(path.read_schema().names) if path.is_file() else set(TRIALS_SCHEMA.names)
    table = read_trials(folder, [c for c in columns if c in present])
    for name in columns:
        if name not in present:
            column = TRIALS_SCHEMA.field(name)
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(list(columns))


def read_history(run_dir: str | os.PathLike[str] | Location, columns: list[str] | None = None,
                 trial_ids: Sequence[str] | None = None) -> pa.Table:
    """All history rows (column projection and a trial filter pushed into the scan)."""
    folder = Location.of(run_dir)
    _require_run_dir(folder)
    files = [f.path for f in (folder / HISTORY_DIR).entries(suffix=".parquet", dirs=False)]
    if not files:
        empty = HISTORY_SCHEMA.empty_table()
        return empty.select(columns) if columns else empty
    dataset = ds.dataset(files, schema=HISTORY_SCHEMA, format="parquet", filesystem=folder.fs)
    flt = ds.field("trial_id").isin(list(trial_ids)) if trial_ids is not None else None
    return dataset.to_table(columns=columns, filter=flt)


def read_frontier(run_dir: str | os.PathLike[str] | Location) -> pa.Table | None:
    """frontier.parquet of a frontier search (one row per combination), or None for a run
    that has none. Columns as FRONTIER_SCHEMA."""
    path = Location.of(run_dir) / FRONTIER_FILE
    if not path.is_file():
        return None
    table = path.read_table()
    for column in FRONTIER_SCHEMA:  # a column a later version added comes back as nulls
        if column.name not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    return table.select(FRONTIER_SCHEMA.names)


def read_metadata(path: str | os.PathLike[str] | Location) -> dict[str, str]:
    """The tune_sana.* metadata of one Parquet file (a local path or a URI)."""
    raw = Location.of(path).read_schema().metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k.startswith(b"tune_sana.")}


# --- the run's spec --------------------------------------------------------------------------

def _read_spec(folder: Location) -> tuple[dict[str, Any], str]:
    """(the spec mapping, where it was read from) for :func:`read_spec`."""
    spec_file, trials_file = folder / SPEC_FILE, folder / TRIALS_FILE
    if spec_file.is_file():
        text, source = spec_file.read_text(), str(spec_file)
    elif trials_file.is_file():
        text = read_metadata(trials_file).get(_SPEC_KEY, "")
        source = f"{trials_file} (the spec in its metadata)"
    else:
        return {}, str(spec_file)
    try:
        loaded = yaml.safe_load(text) if text else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{source}: malformed YAML{at}; restore the file the sweep wrote"
                        ) from None
    if loaded is None:
        return {}, source
    if not isinstance(loaded, dict):
        raise UserError(f"{source}: expected a mapping (trial:, fixed:, space:, ...) at the top "
                        "level; restore the file the sweep wrote")
    return loaded, source


def read_spec(run_dir: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """The run's spec as the raw mapping the sweep wrote (not validated against the trial).

    Read from ``<run dir>/sweep.yaml``; where that file is missing, from the copy of the spec in
    trials.parquet's metadata; ``{}`` when neither exists (an empty file is ``{}`` too).
    Malformed YAML, or YAML whose top level is not a mapping, is a one-line UserError naming
    the file. ``run_dir``: a local folder or a URI.
    """
    return _read_spec(Location.of(run_dir))[0]


@dataclass(frozen=True)
class RunSpec:
    """The parts of a run's spec that say what its trials ran with.

    ``fixed``: the spec's ``fixed:`` block as written; a null value is a setting like any other
    (``loss_spike_factor: null`` turns the spike check off), not a missing one. ``searched``:
    the keys of ``space:``; a trial's recorded value of a searched key is its setting even when
    null (``max_grad_norm: null`` is a choice: clipping off). ``trial``: the trial program's
    name (``sana_finetune`` when the spec names none). ``source``: where the spec was read,
    for messages.
    """

    fixed: dict[str, Any] = field(default_factory=dict)
    searched: frozenset[str] = frozenset()
    trial: str = DEFAULT_TRIAL
    source: str = SPEC_FILE

    @classmethod
    def of(cls, raw: Mapping[str, Any], source: str = SPEC_FILE) -> RunSpec:
        """The view of a spec mapping (as :func:`read_spec` returns it); a missing or null
        ``fixed:`` / ``space:`` is empty. UserError naming ``source`` where ``fixed:`` or
        ``space:`` is not a mapping or ``trial:`` not a name."""
        fixed, space = raw.get("fixed") or {}, raw.get("space") or {}
        trial = raw.get("trial") or DEFAULT_TRIAL
        for key, value in (("fixed", fixed), ("space", space)):
            if not isinstance(value, Mapping):
                raise UserError(f"{source}: '{key}' must be a mapping of key: value; restore "
                                "the file the sweep wrote")
        if not isinstance(trial, str):
            raise UserError(f"{source}: 'trial' must be a trial program's name; restore the "
                            "file the sweep wrote")
        return cls(dict(fixed), frozenset(str(k) for k in space), trial, source)


def read_run_spec(run_dir: str | os.PathLike[str] | Location) -> RunSpec:
    """:func:`read_spec` as a :class:`RunSpec` (an empty one when the run has no spec)."""
    raw, source = _read_spec(Location.of(run_dir))
    return RunSpec.of(raw, source)
