"""Before a resume, the record is read whole once: a corrupt history part (truncated by a copy,
overwritten) is moved aside into ``<run dir>/quarantine/``; a corrupt trials.parquet,
frontier.parquet or sweep.yaml is a one-line error naming it (:class:`readers.CorruptFile`).

A quarantined part's rows are gone. Trials that had not finished re-run (from their checkpoint,
or from the start) and record the steps again: the writer writes only the steps missing on disk
(writer.ResultsWriter). Trials that had finished keep their trials.parquet row; their steps in
the part are lost, and the line names them.
"""

from __future__ import annotations

import os

import pyarrow as pa

from tune_sana.record.readers import (
    corrupt_parts,
    read_frontier,
    read_history,
    read_spec,
    read_trials,
)
from tune_sana.record.schema import QUARANTINE_DIR, TRIALS_FILE
from tune_sana.record.storage import Location


def prepare_resume(run_dir: str | os.PathLike[str] | Location) -> str | None:
    """Check the record of ``run_dir`` before a resume; move corrupt history parts into
    quarantine/. Returns the line that says what was moved (None: nothing was). CorruptFile
    for a corrupt sweep.yaml, trials.parquet or frontier.parquet (left as they are)."""
    folder = Location.of(run_dir)
    read_spec(folder)
    finished = (read_trials(folder, ["trial_id", "steps_run"])
                if (folder / TRIALS_FILE).is_file() else None)
    read_frontier(folder)
    bad = corrupt_parts(folder)
    if not bad:
        return None
    target = folder / QUARANTINE_DIR
    for err in bad:
        err.location.move(target / err.location.name)
    names = ", ".join(err.location.name for err in bad)
    line = (f"resume: moved {len(bad)} corrupt history part{'s' if len(bad) > 1 else ''} "
            f"into {target} ({names}); trials that had not finished re-run and record their "
            "steps again")
    lost = _lost_steps(folder, finished)
    if lost:
        line += (f"; finished trials keep their {TRIALS_FILE} rows but lost history rows: "
                 + ", ".join(lost))
    return line


def _lost_steps(folder: Location, finished: pa.Table | None) -> list[str]:
    """The finished trials whose history no longer runs from its first step (0 or 1) to
    ``steps_run`` without a gap."""
    if finished is None or finished.num_rows == 0:
        return []
    spans = read_history(folder, ["trial_id", "step"]).group_by("trial_id").aggregate(
        [("step", "min"), ("step", "max"), ("step", "count_distinct")])
    seen = {r["trial_id"]: r for r in spans.to_pylist()}
    lost = []
    for row in finished.to_pylist():
        steps = row["steps_run"] or 0
        span = seen.get(row["trial_id"])
        if span is None:
            if steps > 0:
                lost.append(row["trial_id"])
        elif (span["step_min"] > 1 or span["step_max"] < steps
              or span["step_count_distinct"] != span["step_max"] - span["step_min"] + 1):
            lost.append(row["trial_id"])
    return sorted(lost)
