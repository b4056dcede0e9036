"""Writing the record: every file goes to a dot-named temp file in the same folder and is
renamed into place, so a reader never sees a torn file, also while the sweep runs.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tune_sana.outcomes import clean
from tune_sana.record.atomic import write_atomic
from tune_sana.record.readers import read_history, read_trials
from tune_sana.record.schema import (
    CONFIG_FIELDS,
    CONFIG_NAMES,
    HISTORY_DIR,
    HISTORY_SCHEMA,
    SUMMARY_FIELDS,
    TRIALS_FILE,
    TRIALS_PARTS_DIR,
    TRIALS_SCHEMA,
    file_metadata,
)
from tune_sana.record.storage import Location


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
    extra = {k: v for k, v in config.items() if k not in CONFIG_NAMES}
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


def _part_name() -> str:
    """A new part's name: sorts by when it was written (ms), unique by its random tail."""
    return f"part-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.parquet"


class ResultsWriter:
    """Driver-side writer: buffers history rows and flushes them as new part files; writes
    each finished trial's row as one small file (trials_parts/; the first, while there is no
    trials.parquet, as trials.parquet), so recording a trial costs the same however many came
    before it. :meth:`compact` folds both into few large files (record/compaction.py): at the
    end of a sweep, and when a writer resumes.

    Each (trial, step) is written once, the first time it is reported: a trial retried from a
    checkpoint, or re-run after a resume, repeats steps that are already on disk, and those
    repeats are dropped. ``resume=True`` keeps the finished trials already on disk and reads how
    far each trial's history got; a trial whose steps on disk have a gap (a corrupt part moved
    into quarantine/, record/quarantine.py) keeps the set of its steps instead, so a re-run
    fills the gap and still writes no step twice. Thread-safe.
    """

    def __init__(self, run_dir: str | os.PathLike[str], spec_yaml: str = "",
                 flush_rows: int = 2000, flush_seconds: float = 5.0, resume: bool = False) -> None:
        self.location = Location.of(run_dir)
        self.run_dir: Path | str = self.location.public()
        self._history = self.location / HISTORY_DIR
        self._history.create_dir()
        self.meta = file_metadata(spec_yaml)
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._trial_parts = self.location / TRIALS_PARTS_DIR
        self._singles = 0  # single trial parts written since the last batch
        # Trials finished before a resume: their rows and history stay exactly as written.
        self.resumed: frozenset[str] = frozenset()
        self._last_step: dict[str, int] = {}
        self._steps: dict[str, set[int]] = {}  # trials whose steps on disk have a gap
        if resume:
            self._remove_temp_files()
            self.compact()
            ids = read_trials(self.location, ["trial_id"])["trial_id"].to_pylist()
            self.resumed = frozenset(ids)
            self._read_steps()

    def _read_steps(self) -> None:
        """How far each trial's history on disk got: its last step, or where its steps may have
        a gap (they do not run from step 0 to the last, one by one), the set of them."""
        done = read_history(self.location, ["trial_id", "step"])
        spans = done.group_by("trial_id").aggregate(
            [("step", "min"), ("step", "max"), ("step", "count_distinct")]).to_pylist()
        gaps = [r["trial_id"] for r in spans
                if r["step_min"] != 0 or r["step_count_distinct"] != r["step_max"] + 1]
        self._last_step = {r["trial_id"]: r["step_max"] for r in spans
                           if r["trial_id"] not in gaps}
        if gaps:
            rows = done.filter(pc.is_in(done["trial_id"], value_set=pa.array(gaps))).to_pylist()
            for row in rows:
                self._steps.setdefault(row["trial_id"], set()).add(row["step"])

    def _remove_temp_files(self) -> None:
        """Temp files of writes that a crash cut short (never visible to readers: dot-names)."""
        for folder in (self.location, self._history, self._trial_parts):
            for tmp in folder.entries(prefix=".", suffix=".tmp", dirs=False, hidden=True):
                tmp.delete()

    def add_step(self, trial_id: str, metrics: Mapping[str, Any]) -> None:
        row = {**metrics, "trial_id": trial_id}
        row.setdefault("timestamp", time.time())
        step = row.get("step")
        with self._lock:
            if isinstance(step, int):
                seen = self._steps.get(trial_id)
                if seen is not None:  # a gap on disk: only its missing steps are new
                    if step in seen:
                        return
                    seen.add(step)
                elif step <= self._last_step.get(trial_id, -1):
                    return  # a repeat after a retry or resume: the first write stands
                else:
                    self._last_step[trial_id] = step
            self._buffer.append(row)
            due = (len(self._buffer) >= self.flush_rows
                   or time.monotonic() - self._last_flush >= self.flush_seconds)
        if due:
            self.flush()

    def finish_trial(self, trial_id: str, config: Mapping[str, Any],
                     summary: Mapping[str, Any]) -> None:
        """Record a trial's final row, as one new file whatever the number of trials already
        recorded; flushes its history first so both agree on disk. A trial recorded twice
        reads as its newest row."""
        from tune_sana.record import compaction  # it writes through this module

        self.flush()
        table = trials_table([trial_row(trial_id, config, summary)], self.meta)
        with self._lock:
            first = not (self.location / TRIALS_FILE).is_file()
            write_atomic(table, self.location / TRIALS_FILE if first
                         else self._trial_parts / _part_name())
            self._singles += 0 if first else 1
            if self._singles >= compaction.TRIAL_BATCH:  # constant work, every 64 trials
                compaction.batch_trials(self.location)
                self._singles = 0

    def compact(self) -> None:
        """Flush, then fold the trial parts into trials.parquet and the history parts into
        files of at least compaction.HISTORY_ROWS rows (record/compaction.py)."""
        from tune_sana.record import compaction  # it writes through this module

        self.flush()
        with self._lock:
            compaction.compact_trials(self.location)
            compaction.compact_history(self.location)
            self._singles = 0

    def flush(self) -> None:
        with self._lock:
            rows, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
            if not rows:
                return
            write_atomic(history_table(rows, self.meta), self._history / _part_name())


