"""The sweep's record on disk: one schema, declared once, written atomically, read with pyarrow.

    <run dir>/sweep.yaml        the resolved spec, exactly as run
    <run dir>/trials.parquet    one row per finished trial (config columns + outcome + summary)
    <run dir>/history/*.parquet one row per reported step; a pyarrow dataset

Every file is written to a temporary name in the same folder and renamed into place, so a reader
never sees a torn file, also while the sweep runs. Each file's metadata carries the schema version,
library versions, the hardware and the sweep spec. NaN never reaches these files: metrics are
finite floats or null (``health.clean``).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import threading
import time
import types
import typing
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from tune_sana.config import TrialConfig, UserError
from tune_sana.health import clean
from tune_sana.storage import Location

SCHEMA_VERSION = 1
TRIALS_FILE = "trials.parquet"
HISTORY_DIR = "history"
SPEC_FILE = "sweep.yaml"

HISTORY_SCHEMA = pa.schema([
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("step", pa.int64(), nullable=False),
    pa.field("train_loss", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("grad_norm", pa.float64()),
    pa.field("lr", pa.float64()),
    pa.field("loss_scale", pa.float64()),
    pa.field("skipped", pa.bool_()),
    pa.field("step_time_s", pa.float64()),
    pa.field("timestamp", pa.float64()),
])

# Summary columns of trials.parquet, after the config columns.
SUMMARY_FIELDS: list[pa.Field] = [
    pa.field("outcome", pa.string(), nullable=False),
    pa.field("divergence_cause", pa.string()),
    pa.field("diverged_step", pa.int64()),
    pa.field("nonfinite_at", pa.string()),
    pa.field("nonfinite_module", pa.string()),
    pa.field("max_abs_activation", pa.float64()),
    pa.field("best_val_loss", pa.float64()),
    pa.field("final_val_loss", pa.float64()),
    pa.field("steps_run", pa.int64()),
    pa.field("skipped_steps", pa.int64()),
    pa.field("wall_time_s", pa.float64()),
    pa.field("steps_per_s", pa.float64()),
    pa.field("peak_memory_mb", pa.float64()),
    pa.field("ran_on", pa.string()),
    pa.field("pairing", pa.string()),
    pa.field("n_params", pa.int64()),
    pa.field("error", pa.string()),
    pa.field("retries", pa.int64()),
    pa.field("config_json", pa.string()),
    pa.field("ended_at", pa.float64()),
]


def _arrow_type(annotation: Any) -> pa.DataType:
    """Arrow type of a TrialConfig field: int64, float64, bool or string (enums, literals)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _arrow_type(args[0])
    if annotation is bool:
        return pa.bool_()
    if annotation is int:
        return pa.int64()
    if annotation is float:
        return pa.float64()
    return pa.string()


CONFIG_FIELDS: list[pa.Field] = [
    pa.field(name, _arrow_type(info.annotation)) for name, info in TrialConfig.model_fields.items()
]
TRIALS_SCHEMA = pa.schema(
    [pa.field("trial_id", pa.string(), nullable=False), *CONFIG_FIELDS, *SUMMARY_FIELDS]
)
_CONFIG_NAMES = {f.name for f in CONFIG_FIELDS}


def file_metadata(spec_yaml: str = "") -> dict[bytes, bytes]:
    """Schema version, library versions, hardware and the sweep's spec, for every file written."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    info = {
        "tune_sana.schema_version": str(SCHEMA_VERSION),
        "tune_sana.versions": json.dumps({n: version(n) for n in
                                          ("tune-sana", "torch", "diffusers", "ray", "optuna",
                                           "pyarrow")}),
        "tune_sana.hardware": json.dumps(_hardware()),
        "tune_sana.spec": spec_yaml,
    }
    return {k.encode(): v.encode() for k, v in info.items()}


def _hardware() -> dict[str, Any]:
    hw: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(),
                          "python": platform.python_version()}
    try:
        import torch

        if torch.cuda.is_available():
            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return hw


# Fault injection for the crash tests: SIGKILL this process inside the Nth atomic write, after the
# temp file is written and before it is renamed into place. Unset in normal use.
FAULT_ENV = "TUNE_SANA_FAULT_KILL_IN_WRITE"
_writes = [0]


def _maybe_die_mid_write() -> None:
    target = os.environ.get(FAULT_ENV)
    if target:
        _writes[0] += 1
        if _writes[0] == int(target):
            os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(table: pa.Table, path: str | os.PathLike[str] | Location) -> None:
    """Write ``table`` to ``path`` (a local path, a URI or a Location) via a temp file in the
    same folder, then an atomic rename (``fs.move`` on a URI).

    The temp file's name starts with a dot, so pyarrow datasets and globs for ``*.parquet``
    never see it; a crash leaves at most such a file, removed on resume.
    """
    Location.of(path).write_table_atomic(table, before_commit=_maybe_die_mid_write)


def history_table(rows: Sequence[Mapping[str, Any]], meta: dict[bytes, bytes]) -> pa.Table:
    """Rows (trial_id + per-step metrics) -> a table of HISTORY_SCHEMA; other keys are dropped."""
    columns: dict[str, list[Any]] = {f.name: [] for f in HISTORY_SCHEMA}
    for row in rows:
        for field in HISTORY_SCHEMA:
            value = row.get(field.name)
            if pa.types.is_floating(field.type):
                value = clean(value)
            columns[field.name].append(value)
    return pa.table(columns, schema=HISTORY_SCHEMA.with_metadata(meta))


def trial_row(
    trial_id: str, config: Mapping[str, Any], summary: Mapping[str, Any]
) -> dict[str, Any]:
    """One trials.parquet row: config keys under their own names, then the summary."""
    row: dict[str, Any] = {"trial_id": trial_id}
    for field in CONFIG_FIELDS:
        value = config.get(field.name)
        if field.type == pa.string() and value is not None:
            value = getattr(value, "value", value)
            value = str(value)
        row[field.name] = value
    for field in SUMMARY_FIELDS:
        row[field.name] = summary.get(field.name)
    extra = {k: v for k, v in config.items() if k not in _CONFIG_NAMES}
    row["config_json"] = json.dumps(extra, default=str, sort_keys=True) if extra else None
    if row["ended_at"] is None:
        row["ended_at"] = time.time()
    for field in TRIALS_SCHEMA:
        if pa.types.is_floating(field.type):
            row[field.name] = clean(row[field.name])
    return row


def trials_table(rows: Iterable[Mapping[str, Any]], meta: dict[bytes, bytes]) -> pa.Table:
    rows = list(rows)
    return pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA.with_metadata(meta))


class ResultsWriter:
    """Driver-side writer: buffers history rows and flushes them as new part files; keeps the
    trials table and rewrites it atomically whenever a trial finishes.

    Each (trial, step) is written once, the first time it is reported: a trial retried from a
    checkpoint, or re-run after a resume, repeats steps that are already on disk, and those
    repeats are dropped. ``resume=True`` keeps the finished trials already on disk and reads how
    far each trial's history got. Thread-safe.
    """

    def __init__(self, run_dir: str | os.PathLike[str], spec_yaml: str = "",
                 flush_rows: int = 2000, flush_seconds: float = 5.0, resume: bool = False) -> None:
        self.location = Location.of(run_dir)
        self.run_dir: Path | str = self.location.public()
        self._history = self.location / HISTORY_DIR
        self._history.create_dir()
        self.history_dir: Path | str = self._history.public()
        self.meta = file_metadata(spec_yaml)
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._trials: dict[str, dict[str, Any]] = {}
        self._parts = 0
        # Trials finished before a resume: their rows and history stay exactly as written.
        self.resumed: frozenset[str] = frozenset()
        if resume and (self.location / TRIALS_FILE).is_file():
            for row in (self.location / TRIALS_FILE).read_table().to_pylist():
                self._trials[row["trial_id"]] = row
            self.resumed = frozenset(self._trials)
        self._last_step: dict[str, int] = {}
        if resume:
            self._remove_temp_files()
            done = read_history(self.location, ["trial_id", "step"]).group_by("trial_id").aggregate(
                [("step", "max")])
            self._last_step = dict(zip(done["trial_id"].to_pylist(),
                                       done["step_max"].to_pylist(), strict=True))

    @property
    def finished(self) -> set[str]:
        return set(self._trials)

    def _remove_temp_files(self) -> None:
        """Temp files of writes that a crash cut short (never visible to readers: dot-names)."""
        for folder in (self.location, self._history):
            for tmp in folder.entries(prefix=".", suffix=".tmp", dirs=False, hidden=True):
                tmp.delete()

    def add_step(self, trial_id: str, metrics: Mapping[str, Any]) -> None:
        row = {**metrics, "trial_id": trial_id}
        row.setdefault("timestamp", time.time())
        step = row.get("step")
        with self._lock:
            if isinstance(step, int):
                if step <= self._last_step.get(trial_id, -1):
                    return  # a repeat after a retry or resume: the first write stands
                self._last_step[trial_id] = step
            self._buffer.append(row)
            due = (len(self._buffer) >= self.flush_rows
                   or time.monotonic() - self._last_flush >= self.flush_seconds)
        if due:
            self.flush()

    def finish_trial(self, trial_id: str, config: Mapping[str, Any],
                     summary: Mapping[str, Any]) -> None:
        """Record a trial's final row; flushes its history first so both agree on disk."""
        self.flush()
        with self._lock:
            self._trials[trial_id] = trial_row(trial_id, config, summary)
            table = trials_table(self._trials.values(), self.meta)
            write_atomic(table, self.location / TRIALS_FILE)

    def flush(self) -> None:
        with self._lock:
            rows, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
            if not rows:
                return
            self._parts += 1
            name = f"part-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.parquet"
            write_atomic(history_table(rows, self.meta), self._history / name)


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
