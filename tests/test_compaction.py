"""Compaction (record/compaction.py): the compacted record reads exactly as its parts did; a
reader during a compaction (or after one killed between its rename and its deletes) counts
every row once; recording a trial touches one new file however many came before it."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tune_sana.record import compaction, readers
from tune_sana.record.compaction import compact_history, compact_trials
from tune_sana.record.readers import history_trial_ids, read_history, read_trials
from tune_sana.record.schema import COMPACT_PREFIX, HISTORY_DIR, TRIALS_FILE, TRIALS_PARTS_DIR
from tune_sana.record.storage import Location
from tune_sana.record.writer import ResultsWriter
from tune_sana.testing.sweeps import RUNNING, SMALL, _history_rows, _summary


def _write(run: Path, trials: int = 12, steps: int = 30, flush_rows: int = 7) -> ResultsWriter:
    writer = ResultsWriter(run, "trial: synthetic\n", flush_rows=flush_rows, flush_seconds=1e9)
    for i in range(trials):
        for step in range(steps):
            writer.add_step(f"t{i:02d}", {"step": step, "train_loss": 1.0 / (step + 1)})
        writer.finish_trial(f"t{i:02d}", {"lr": 1e-3 * (i + 1)},
                            {"outcome": "completed", "best_val_loss": 0.1 * i})
    writer.flush()
    return writer


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("trial_id", "ascending"), ("step", "ascending")])


def _history(run: Path) -> list[Path]:
    return sorted((run / HISTORY_DIR).glob("*.parquet"))


def test_the_compacted_record_reads_exactly_as_its_parts(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run)
    trials, history = read_trials(run), _sorted(read_history(run))
    assert len(list((run / TRIALS_PARTS_DIR).glob("*.parquet"))) == 11  # the 1st: trials.parquet
    assert len(_history(run)) > 40
    assert compact_trials(run) == 11
    assert compact_history(run, min_rows=100) > 40
    assert read_trials(run).sort_by("trial_id").equals(trials.sort_by("trial_id"))
    assert _sorted(read_history(run)).equals(history)
    assert not (run / TRIALS_PARTS_DIR).exists()
    rows = [pq.read_metadata(f).num_rows for f in _history(run)]
    assert all(f.name.startswith(COMPACT_PREFIX) for f in _history(run))
    assert min(rows) >= 100 and sum(rows) == 12 * 30  # 360 rows: files of 100..199 rows
    assert sorted(history_trial_ids(run).to_pylist()) == [f"t{i:02d}" for i in range(12)]
    meta = readers.read_metadata(Location.of(run) / TRIALS_FILE)
    assert meta["tune_sana.spec"] == "trial: synthetic\n"


def test_a_resumed_writer_compacts_and_a_short_tail_joins_the_last_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run, trials=4)  # 120 rows
    ResultsWriter(run, resume=True)
    assert [f.name[:8] for f in _history(run)] == ["compact-"]
    writer = ResultsWriter(run, resume=True)
    for step in range(30):
        writer.add_step("t99", {"step": step})
    writer.finish_trial("t99", {"lr": 0.1}, {"outcome": "completed"})
    writer.compact()  # 30 new rows < HISTORY_ROWS: merged with the 120 into one file
    assert [pq.read_metadata(f).num_rows for f in _history(run)] == [150]
    assert read_trials(run).num_rows == 5 and read_history(run).num_rows == 150


def test_a_compaction_killed_before_its_deletes_counts_nothing_twice(tmp_path: Path) -> None:
    """The compacted files are renamed into place, then the parts they hold deleted; killed
    in between (simulated: the deletes skipped), readers skip the covered parts, and the next
    compaction deletes them."""
    run = tmp_path / "run"
    _write(run)
    trials, history = read_trials(run), _sorted(read_history(run))
    keep = Location.delete
    try:
        Location.delete = lambda self: None  # type: ignore[method-assign]
        compact_trials(run)
        compact_history(run, min_rows=100)
    finally:
        Location.delete = keep  # type: ignore[method-assign]
    assert len(list((run / TRIALS_PARTS_DIR).glob("*.parquet"))) == 11  # still there
    assert any(not f.name.startswith(COMPACT_PREFIX) for f in _history(run))
    assert read_trials(run).sort_by("trial_id").equals(trials.sort_by("trial_id"))
    assert _sorted(read_history(run)).equals(history)
    assert len(history_trial_ids(run)) == 12
    compact_trials(run)
    compact_history(run, min_rows=100)
    assert not (run / TRIALS_PARTS_DIR).exists()
    assert all(f.name.startswith(COMPACT_PREFIX) for f in _history(run))
    assert _sorted(read_history(run)).equals(history)


def test_a_reader_that_listed_parts_a_compaction_then_deleted_lists_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other window: a reader lists the parts, a whole compaction runs (rename and
    deletes), then the reader opens a part that is gone: it lists again and reads the
    compacted file, neither missing nor doubling a row."""
    run = tmp_path / "run"
    _write(run)
    trials, history = read_trials(run), _sorted(read_history(run))
    for name, compact in (("history_files", lambda: compact_history(run, min_rows=100)),
                          ("trials_with_parts", lambda: compact_trials(run))):
        real = getattr(readers, name)
        ran: list[bool] = []

        def listed_then_compacted(*args, real=real, compact=compact, ran=ran,  # type: ignore
                                  read_already=name == "trials_with_parts"):
            found = real(*args)
            if not ran:  # the first listing goes stale
                ran.append(True)
                compact()
                if read_already:  # it read its parts before the compaction: as if it had not
                    raise FileNotFoundError("a part vanished")
            return found

        monkeypatch.setattr(readers, name, listed_then_compacted)
        if name == "history_files":
            assert _sorted(read_history(run)).equals(history)
        else:
            assert read_trials(run).sort_by("trial_id").equals(trials.sort_by("trial_id"))
        assert ran


def test_a_trial_recorded_twice_reads_as_its_newest_row(tmp_path: Path) -> None:
    run = tmp_path / "run"
    writer = ResultsWriter(run, "")
    writer.finish_trial("a", {"lr": 0.1}, {"outcome": "completed", "best_val_loss": 0.5})
    writer.finish_trial("b", {"lr": 0.1}, {"outcome": "completed", "best_val_loss": 0.4})
    writer.finish_trial("a", {"lr": 0.1}, {"outcome": "error", "error": "later"})
    rows = {r["trial_id"]: r["outcome"] for r in read_trials(run).to_pylist()}
    assert rows == {"a": "error", "b": "completed"} and read_trials(run).num_rows == 2
    compact_trials(run)
    assert {r["trial_id"]: r["outcome"] for r in read_trials(run).to_pylist()} == rows


def test_recording_a_trial_writes_one_small_file_whatever_came_before(tmp_path: Path) -> None:
    """O(1) per finished trial: each finish adds one new file and rewrites nothing; every
    TRIAL_BATCH trials the single parts are folded into one batch part (constant work). The
    bytes written per finish do not grow with the trials already recorded."""
    run = tmp_path / "run"
    writer = ResultsWriter(run, "trial: sana_finetune\n")
    batch = compaction.TRIAL_BATCH
    sizes, touched, batched = [], [], []
    for i, t in enumerate([*SMALL] * (2 * batch // len(SMALL) + 2)):  # 2 batches and more
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")}
        writer.finish_trial(f"x{i:03d}", t.config, _summary(t))
        after = {p: p.stat().st_mtime_ns for p in run.rglob("*.parquet")}
        changed = [p for p in after if before.get(p) != after[p]]
        touched.append(len(changed))
        sizes.append(sum(os.path.getsize(p) for p in changed))
        if any(p.name.startswith(COMPACT_PREFIX) for p in changed):
            batched.append(i)
    assert touched == [1] * len(touched)  # a new part, or a new batch that holds it
    assert batched == [batch, 2 * batch]  # the 65th and 129th finish (the 1st: trials.parquet)
    assert abs(sizes[2 * batch] - sizes[batch]) <= 0.05 * sizes[batch]
    singles = [sizes[i] for i in range(1, len(sizes)) if i not in batched]
    assert max(singles) <= 1.05 * min(singles)
    assert read_trials(run).num_rows == len(sizes)
    assert compact_trials(run) > 0 and read_trials(run).num_rows == len(sizes)


def test_compaction_leaves_a_record_the_quarantine_and_resume_read(tmp_path: Path) -> None:
    """A sweep's fixture, compacted: the running trial's steps and the finished ones resume
    as before (the resumed writer drops repeated steps)."""
    from tune_sana.testing.sweeps import write_sweep

    run = write_sweep(tmp_path / "run", SMALL, [RUNNING], flush_rows=20)
    compact_history(run, min_rows=compaction.HISTORY_ROWS)
    writer = ResultsWriter(run, resume=True)
    assert writer.resumed == {t.trial_id for t in SMALL}
    for row in _history_rows(RUNNING)[:60]:
        writer.add_step(RUNNING.trial_id, row)  # all on disk already
    writer.flush()
    assert read_history(run, trial_ids=[RUNNING.trial_id]).num_rows == RUNNING.steps + 1
