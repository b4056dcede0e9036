"""Runs stored at a URI that pyarrow understands: the storage module on a local path and on a
file:// URI, the Parquet record written and read through a URI, and a real sweep with
``--storage file:///...`` (report, resume) end to end."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from tests.engine import run_cli, write_space
from tune_sana.cli import main
from tune_sana.config import UserError
from tune_sana.record.readers import read_history, read_metadata, read_trials
from tune_sana.record.schema import HISTORY_DIR, SPEC_FILE, TRIALS_FILE
from tune_sana.record.storage import Location, is_uri
from tune_sana.record.writer import ResultsWriter


def _locations(tmp_path: Path) -> list[str]:
    """The same kind of folder named two ways: a local path and a file:// URI."""
    (tmp_path / "local").mkdir()
    (tmp_path / "uri").mkdir()
    return [str(tmp_path / "local"), (tmp_path / "uri").as_uri()]


def test_is_uri() -> None:
    assert is_uri("file:///tmp/x") and is_uri("s3://bucket/runs")
    assert not is_uri("/tmp/x") and not is_uri("runs") and not is_uri(Path("/tmp/x"))


def test_uri_naming_keeps_the_scheme(tmp_path: Path) -> None:
    root = Location.of(tmp_path.as_uri() + "/")  # a trailing slash is dropped
    run = root / "r1"
    assert run.text == tmp_path.as_uri() + "/r1"
    assert run.path == str(tmp_path / "r1")
    assert run.name == "r1"
    assert run.parent.text == tmp_path.as_uri()
    assert run.public() == run.text
    local = Location.of(tmp_path) / "r1"
    assert local.public() == tmp_path / "r1" and local.name == "r1"


def test_an_unknown_scheme_is_a_user_error() -> None:
    with pytest.raises(UserError, match="not a storage URI"):
        Location.of("nosuchscheme://x/y")


@pytest.mark.parametrize("kind", [0, 1], ids=["local", "file-uri"])
def test_atomic_writes_leave_no_temp_file_and_listing_ignores_dot_files(
        tmp_path: Path, kind: int) -> None:
    root = Location.of(_locations(tmp_path)[kind])
    folder = root / "sub"
    table = pa.table({"x": [1, 2, 3]})
    (folder / "a.parquet").write_table_atomic(table)
    (folder / "b.txt").write_text_atomic("hello\n")
    (folder / "b.txt").write_text_atomic("again\n")  # replaces in place
    on_disk = Path(folder.path)
    assert sorted(p.name for p in on_disk.iterdir()) == ["a.parquet", "b.txt"]
    assert (folder / "a.parquet").read_table().equals(table)
    assert (folder / "b.txt").read_text() == "again\n"
    assert (folder / "a.parquet").is_file() and folder.is_dir() and folder.exists()
    assert not (folder / "absent").exists()

    (on_disk / ".a.parquet.123.tmp").write_bytes(b"torn")
    assert [e.name for e in folder.entries()] == ["a.parquet", "b.txt"]
    assert [e.name for e in folder.entries(suffix=".parquet")] == ["a.parquet"]
    hidden = folder.entries(prefix=".", suffix=".tmp", hidden=True)
    assert [e.name for e in hidden] == [".a.parquet.123.tmp"]
    hidden[0].delete()
    hidden[0].delete()  # an absent file is fine
    assert sorted(p.name for p in on_disk.iterdir()) == ["a.parquet", "b.txt"]
    assert (root / "nothing-here").entries() == []


@pytest.mark.parametrize("kind", [0, 1], ids=["local", "file-uri"])
def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path, kind: int) -> None:
    target = Location.of(_locations(tmp_path)[kind]) / "t.parquet"
    target.write_table_atomic(pa.table({"x": [1]}))

    def boom() -> None:
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        target.write_table_atomic(pa.table({"x": [2]}), before_commit=boom)
    assert target.read_table()["x"].to_pylist() == [1]
    assert [p.name for p in Path(target.path).parent.iterdir()] == ["t.parquet"]


@pytest.mark.parametrize("kind", [0, 1], ids=["local", "file-uri"])
def test_the_parquet_record_round_trips(tmp_path: Path, kind: int) -> None:
    run = _locations(tmp_path)[kind] + "/run"
    writer = ResultsWriter(run, "trial: synthetic\n", flush_rows=2)
    for step in range(3):
        writer.add_step("t1", {"step": step, "train_loss": 1.0 / (step + 1)})
    writer.finish_trial("t1", {"lr": 1e-3}, {"outcome": "completed", "best_val_loss": 0.5})
    assert read_trials(run)["trial_id"].to_pylist() == ["t1"]
    assert read_history(run, ["step"])["step"].to_pylist() == [0, 1, 2]
    meta = read_metadata(Location.of(run) / TRIALS_FILE)
    assert meta["tune_sana.spec"] == "trial: synthetic\n"
    files = sorted(p.name for p in (tmp_path / ("local", "uri")[kind] / "run").iterdir())
    assert files == [HISTORY_DIR, TRIALS_FILE]

    # resume: keeps the finished trial, drops repeated steps, removes temp files of a crash
    (Path(Location.of(run).path) / HISTORY_DIR / ".part-x.parquet.1.tmp").write_bytes(b"")
    again = ResultsWriter(run, resume=True)
    assert again.resumed == {"t1"}
    again.add_step("t1", {"step": 2})
    again.flush()
    assert len(read_history(run)) == 3
    assert not any(p.name.startswith(".")
                   for p in (Path(Location.of(run).path) / HISTORY_DIR).iterdir())


def test_readers_reject_a_uri_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a tune-sana run directory"):
        read_trials(tmp_path.as_uri())


def test_export_says_it_needs_a_local_run(tmp_path: Path) -> None:
    from tune_sana.engine.export import export

    with pytest.raises(UserError, match="export reads a local run folder"):
        export(tmp_path.as_uri(), "t1")


# --- a real sweep with --storage file:///... ----------------------------------------------------

@pytest.mark.slow
def test_sweep_report_and_resume_with_a_file_uri(
        tmp_path: Path, local_ray: None, capsys: pytest.CaptureFixture[str]) -> None:
    space_file = write_space(tmp_path, "remote", {
        "trial": "synthetic",
        "search": {"algorithm": "random", "num_samples": 4, "seed": 0, "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": 10, "diverge_above": 1e-3},
        "space": {"lr": {"loguniform": [1e-4, 1e-2]}},
    })
    storage = (tmp_path / "remote").as_uri()
    run = f"{storage}/remote-1"
    assert run_cli(str(space_file), "--storage", storage, "--name", "remote-1") == 0
    assert capsys.readouterr().out.strip() == run

    on_disk = tmp_path / "remote" / "remote-1"
    assert (on_disk / SPEC_FILE).is_file() and (on_disk / TRIALS_FILE).is_file()
    assert any(on_disk.glob("experiment_state-*.json"))  # Ray's own state went there too
    trials = read_trials(run)
    assert trials.num_rows == 4
    assert set(trials["outcome"].to_pylist()) <= {"completed", "diverged", "pruned"}
    history = read_history(run, ["trial_id", "step"])
    assert set(history["trial_id"].to_pylist()) == set(trials["trial_id"].to_pylist())

    assert main(["report", run]) == 0
    text = capsys.readouterr().out
    assert "Runs" in text and "remote-1" in text

    before = {r["trial_id"]: r for r in trials.to_pylist()}
    assert run_cli(str(space_file), "--storage", storage, "--name", "remote-1", "--resume") == 0
    assert main(["resume", run, "--progress-every", "30"]) == 0
    after = {r["trial_id"]: r for r in read_trials(run).to_pylist()}
    assert after == before  # nothing re-run, nothing lost
    pairs = read_history(run, ["trial_id", "step"]).to_pylist()
    assert len(pairs) == history.num_rows
    assert not list(on_disk.rglob("*.tmp"))  # no temp file of an atomic write left behind

    # --resume without --name finds the newest run of this space under the URI
    from tune_sana.engine.sweep import SweepOptions, run_dir_for

    assert run_dir_for("remote", SweepOptions(storage=storage, resume=True)) == run
    with pytest.raises(UserError, match="no earlier run"):
        run_dir_for("other", SweepOptions(storage=storage, resume=True))
