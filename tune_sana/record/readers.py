"""Reading the record with pyarrow: trials.parquet, the history dataset, file metadata, and
the run's sweep.yaml, each read here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.dataset as ds

from tune_sana.config import UserError
from tune_sana.record.schema import (
    HISTORY_DIR,
    HISTORY_SCHEMA,
    TRIALS_FILE,
    TRIALS_SCHEMA,
)
from tune_sana.record.storage import Location


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


def read_metadata(path: str | os.PathLike[str] | Location) -> dict[str, str]:
    """The tune_sana.* metadata of one Parquet file (a local path or a URI)."""
    raw = Location.of(path).read_schema().metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if k.startswith(b"tune_sana.")}
