"""The sweep's progress: plain lines with an ETA off a terminal, a live table on one. (A real
sweep in a pseudo-terminal: tests/test_trackers.py, whose tracked sweep runs in one.)"""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tune_sana.engine import space
from tune_sana.engine.progress import Progress, Snapshot, duration, eta_s, line, render, table
from tune_sana.engine.recorder import ResultsRecorder

_COUNTS = {"completed": 3, "diverged": 2, "pruned": 1}
_SNAP = Snapshot(elapsed_s=60.0, running=2, pending=1, counts=_COUNTS,
                 best=(0.1488, "ab12_00003"), finished=6, total=10,
                 eta_s=eta_s(10, finished=6, finished_before=0, elapsed_s=60.0),
                 steps=(("ab12_00006", 17), ("ab12_00007", None)))


def test_eta_is_the_trials_left_at_this_sessions_rate() -> None:
    assert eta_s(10, finished=6, finished_before=0, elapsed_s=60.0) == pytest.approx(40.0)
    # resumed with 4 done before: 2 finished here in 60 s, 4 left
    assert eta_s(10, finished=6, finished_before=4, elapsed_s=60.0) == pytest.approx(120.0)
    assert eta_s(10, finished=4, finished_before=4, elapsed_s=60.0) is None  # no rate yet
    assert eta_s(None, finished=6, finished_before=0, elapsed_s=60.0) is None
    assert eta_s(10, finished=10, finished_before=0, elapsed_s=60.0) == 0.0
    assert [duration(s) for s in (None, 4.4, 185.0, 7620.0)] == ["?", "4s", "3m05s", "2h07m"]


def test_off_a_terminal_progress_is_plain_lines_with_the_eta() -> None:
    stream = io.StringIO()  # not a terminal
    view = Progress(every_s=3600.0, stream=stream)
    assert not view.live
    view.show(_SNAP, force=True)
    view.show(_SNAP)  # within every_s: nothing
    assert stream.getvalue() == (
        "[    60s] running 2 | pending 1 | completed 3 | diverged 2 | collapsed 0 | pruned 1 | "
        "error 0 | best val_loss 0.1488 (ab12_00003) | eta 40s\n")
    assert "\x1b" not in stream.getvalue()
    assert line(Snapshot(elapsed_s=1.0, running=0, pending=0, counts={})).endswith("error 0")


def test_on_a_terminal_the_table_shows_counts_best_and_eta_and_redraws_in_place() -> None:
    text = _plain(render(table(_SNAP)))
    assert "tune-sana sweep: 6 of 10 trials finished | elapsed 1m00s | eta 40s" in text
    header, counts = [row for row in text.splitlines() if "│" in row or "┃" in row][:2]
    names = ["running", "pending", "completed", "diverged", "collapsed", "pruned", "error"]
    assert [header.index(n) for n in names] == sorted(header.index(n) for n in names)
    assert re.findall(r"\d+", counts) == ["2", "1", "3", "2", "0", "1", "0"]
    assert "best val_loss 0.1488 (ab12_00003)" in text
    assert max(len(row) for row in text.splitlines()) <= 80  # an 80-column terminal
    assert "ab12_00006" in text and "17" in text

    stream = io.StringIO()
    view = Progress(every_s=3600.0, stream=stream, live=True)
    view.show(_SNAP, force=True)
    first = stream.getvalue()
    height = first.count("\n")
    assert "\x1b[" in first and "╭" not in first  # a terminal's text, in rich's table box
    view.show(_SNAP, force=True)
    second = stream.getvalue()[len(first):]
    assert second.startswith(f"\x1b[{height}F\x1b[J")  # up over the last table, cleared below
    view.close()
    view.show(_SNAP, force=True)  # after close: drawn below, nothing overwritten
    assert not re.match(r"\x1b\[\d+F", stream.getvalue()[len(first) + len(second):])


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_a_line_printed_under_the_live_table_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure budget's line (or any warning) printed to sys.stderr between two redraws
    is not drawn over: the next table goes below it; close() gives sys.stderr back."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    view = Progress(every_s=3600.0, live=True)
    view.show(_SNAP, force=True)
    view.show(_SNAP, force=True)
    assert stream.getvalue().count("F\x1b[J") == 1  # redrawn in place once
    print("tune-sana: failure budget reached", file=sys.stderr)
    before = len(stream.getvalue())
    view.show(_SNAP, force=True)
    assert not re.match(r"\x1b\[\d+F", stream.getvalue()[before:])
    view.show(_SNAP, force=True)
    assert stream.getvalue().count("F\x1b[J") == 2  # in place again, below the line
    view.close()
    assert sys.stderr is stream


@dataclass
class _Trial:
    """What the recorder reads of a ray.tune Trial."""

    trial_id: str
    config: dict[str, Any]
    status: str = "RUNNING"
    last_result: dict[str, Any] = field(default_factory=dict)
    num_failures: int = 0


def test_the_recorder_prints_the_eta_from_rays_sample_count(tmp_path: Path) -> None:
    spec = space.parse_spec({"trial": "synthetic", "search": {"num_samples": 4},
                             "space": {"lr": {"loguniform": [1e-4, 1e-2]}}}, "test")
    stream = io.StringIO()
    recorder = ResultsRecorder(str(tmp_path / "run"), spec.to_yaml(), progress_every_s=3600.0,
                               stream=stream)
    recorder.setup(stop=None, num_samples=4, total_num_samples=4)  # as Tune calls it
    trials = [_Trial(f"t_{i}", {"lr": 1e-3}) for i in range(2)]
    recorder.on_trial_start(0, trials, trials[0])
    done = {"step": 3, "train_loss": 0.5, "val_loss": 0.25, "outcome": "completed"}
    trials[0].last_result, trials[0].status = done, "TERMINATED"
    recorder.on_trial_result(0, trials, trials[0], done)
    recorder.on_trial_complete(0, trials, trials[0])
    last = stream.getvalue().splitlines()[-1]
    assert "running 1 | pending 0 | completed 1" in last and "best val_loss 0.25 (t_0)" in last
    assert re.search(r"\| eta \d+s$", last), last  # 3 trials left at 1 per elapsed
