"""Corrupt files of a record (truncated by a copy, overwritten with garbage): ``report``,
``best`` and ``resume`` name the file in one line (exit 2, no traceback); ``report
--skip-corrupt`` reports the rest; a resume moves a corrupt history part into quarantine/ and
the steps of the trials that re-run are recorded again, each once."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.engine import start_sweep, trials_by_id, write_space
from tune_sana.cli import main
from tune_sana.engine import space
from tune_sana.record.atomic import write_atomic
from tune_sana.record.quarantine import prepare_resume
from tune_sana.record.readers import read_history, read_spec
from tune_sana.record.schema import (
    FRONTIER_FILE,
    FRONTIER_SCHEMA,
    HISTORY_DIR,
    QUARANTINE_DIR,
    SPEC_FILE,
    TRIALS_FILE,
    file_metadata,
)
from tune_sana.record.writer import ResultsWriter
from tune_sana.testing.sweeps import RUNNING, SMALL, _history_rows, write_sweep

KINDS = ("trials", "history", "frontier", "spec")
HOWS = ("truncated", "garbage")


def _garble(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(random.Random(0).randbytes(len(data)))


def _run(tmp_path: Path) -> Path:
    """SMALL + the running t12 (history parts of 20 rows), with a frontier.parquet, and a
    sweep.yaml that ``tune-sana resume`` takes as it is (the spec's own YAML, also in the
    metadata of every file, as the engine writes it)."""
    run = write_sweep(tmp_path / "run", SMALL, [RUNNING], flush_rows=20)
    text = space.parse_spec(read_spec(run), source="test").to_yaml()
    (run / SPEC_FILE).write_text(text)
    meta = file_metadata(text)
    write_atomic(pq.read_table(run / TRIALS_FILE).replace_schema_metadata(meta),
                 run / TRIALS_FILE)
    write_atomic(FRONTIER_SCHEMA.empty_table().replace_schema_metadata(meta),
                 run / FRONTIER_FILE)
    return run


def _parts(run: Path) -> list[Path]:
    return sorted((run / HISTORY_DIR).glob("*.parquet"))


def _file(run: Path, kind: str) -> Path:
    return {"trials": run / TRIALS_FILE, "frontier": run / FRONTIER_FILE,
            "spec": run / SPEC_FILE, "history": _parts(run)[3]}[kind]


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in captured.out + captured.err, err
    return err


def _args(command: str, run: Path) -> list[str]:
    return {"report": ["report", str(run)],
            "best": ["best", str(run), "--frontier", str(run)],
            "resume": ["resume", str(run), "--num-cpus", "1"]}[command]


# best reads no history (test_best_needs_no_history); a resume moves a corrupt history part
# aside (the quarantine tests below).
NAMED = [(command, kind) for command in ("report", "best", "resume") for kind in KINDS
         if command == "report" or kind != "history"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(("command", "kind"), NAMED)
def test_a_corrupt_file_is_named_in_one_line(command: str, kind: str, how: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path)
    target = _file(run, kind)
    _garble(target, how)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(_args(command, run)) == 2
    err = _one_line(capsys)
    assert err.startswith(f"tune-sana: error: {target}: "), err
    assert any(w in err for w in ("corrupt", "truncated", "malformed")), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_best_needs_no_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """best reads trials.parquet and sweep.yaml only: a corrupt history part changes nothing."""
    run = _run(tmp_path)
    assert main(["best", str(run)]) == 0
    answer = capsys.readouterr().out
    _garble(_file(run, "history"), "garbage")
    assert main(["best", str(run)]) == 0
    assert capsys.readouterr().out == answer


@pytest.mark.parametrize("kind", KINDS)
def test_report_skip_corrupt_reports_the_rest(kind: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path)
    target = _file(run, kind)
    _garble(target, "truncated")
    assert main(["report", "--skip-corrupt", str(run)]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"tune-sana: --skip-corrupt: left out 1 unreadable file: {target}: "
                          ), err
    assert "Traceback" not in err and "\n" not in err
    # without trials.parquet no trial has finished: all 13 show from their history alone
    completed, running = ("0", "13") if kind == "trials" else ("4", "1")
    rows = [line.split() for line in captured.out.split("\n\n", 1)[0].splitlines()]
    assert ["completed", completed] in rows and ["running", running] in rows, captured.out


def test_resume_quarantines_a_corrupt_part_and_a_rerun_fills_its_gap(tmp_path: Path) -> None:
    """No Ray: the running t12's middle part (steps 20..39) and t00's first part (steps 0..19)
    are garbled; prepare_resume moves both aside and names t00; t12 re-run from the start
    through a resumed writer records exactly its missing steps."""
    run = _run(tmp_path)
    parts = _parts(run)
    by_part = {p: {(r["trial_id"], r["step"]) for r in pq.read_table(p).to_pylist()}
               for p in parts}
    t00 = parts[0]
    t12_middle = next(p for p in parts if {t for t, _ in by_part[p]} == {"t12"}
                      and min(s for _, s in by_part[p]) == 20)
    everything = set().union(*by_part.values())
    for part in (t00, t12_middle):
        _garble(part, "garbage")

    line = prepare_resume(run)
    assert line is not None and "\n" not in line
    assert line.startswith(f"resume: moved 2 corrupt history parts into {run / QUARANTINE_DIR} "
                           f"({t00.name}, {t12_middle.name})"), line
    assert line.endswith("lost history rows: t00"), line
    assert sorted(p.name for p in (run / QUARANTINE_DIR).iterdir()) == sorted(
        [t00.name, t12_middle.name])
    assert prepare_resume(run) is None  # what is left reads cleanly

    writer = ResultsWriter(run, resume=True)
    for row in _history_rows(RUNNING):  # t12 re-run from the start
        writer.add_step("t12", row)
    writer.flush()
    pairs = [(r["trial_id"], r["step"]) for r in read_history(run, ["trial_id", "step"])
             .to_pylist()]
    assert len(pairs) == len(set(pairs)), "a step was recorded twice"
    assert set(pairs) == everything - by_part[t00]


STEPS = 30


def _finished(run: Path) -> set[str]:
    return set(trials_by_id(run)) if (run / TRIALS_FILE).is_file() else set()


def _pairs(part: Path) -> set[tuple[str, int]]:
    return {(r["trial_id"], r["step"]) for r in pq.read_table(part).to_pylist()}


def _parts_of_unfinished(run: Path) -> list[Path]:
    """History parts holding steps of a trial that has not finished (it re-runs on resume)."""
    finished = _finished(run)
    return [p for p in _parts(run) if any(t not in finished for t, _ in _pairs(p))]


@pytest.mark.slow
def test_resume_of_a_real_sweep_with_a_corrupt_part(tmp_path: Path) -> None:
    """A synthetic sweep killed mid-run; a history part holding steps of a running trial
    garbled; --resume moves it into quarantine/, says so in one line, and finishes with every
    step recorded once, but for the lost part's steps of trials that had finished before."""
    space_file = write_space(tmp_path, "corrupt", {
        "trial": "synthetic",
        "search": {"algorithm": "random", "num_samples": 4, "seed": 0, "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": STEPS, "step_seconds": 0.1, "diverge_above": 10.0},
        "space": {"lr": {"loguniform": [1e-4, 1e-2]}},
    })
    run = tmp_path / "k"
    driver = start_sweep(space_file, tmp_path, "--report-every", "0")
    deadline = time.monotonic() + 180
    while not _parts_of_unfinished(run):
        assert driver.poll() is None, driver.stderr.read() if driver.stderr else ""
        assert time.monotonic() < deadline, "no history part of a running trial in time"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    newest = _parts_of_unfinished(run)[-1]
    finished = _finished(run)
    lost = {(t, s) for t, s in _pairs(newest) if t in finished}
    _garble(newest, "garbage")

    resumed = start_sweep(space_file, tmp_path, "--resume")
    _, err = resumed.communicate(timeout=300)
    text = err.decode()
    assert resumed.returncode == 0, text[-2000:]
    lines = [line for line in text.splitlines() if line.startswith("resume: moved")]
    assert len(lines) == 1 and f"({newest.name})" in lines[0], text[-2000:]
    assert [p.name for p in (run / QUARANTINE_DIR).iterdir()] == [newest.name]

    after = trials_by_id(run)
    assert len(after) == 4
    pairs = [(r["trial_id"], r["step"]) for r in read_history(run, ["trial_id", "step"])
             .to_pylist()]
    assert len(pairs) == len(set(pairs)), "a step was recorded twice"
    expected = {(t, s) for t in after for s in range(1, STEPS + 1)} - lost
    assert set(pairs) == expected
