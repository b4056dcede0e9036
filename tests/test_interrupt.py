"""Ctrl-C on a sweep (engine/interrupt.py). Real signals on real sweeps: the first SIGINT ends the
sweep with exit status 130, tune-sana's own resume command and no "done", its record readable;
that command finishes the sweep with nothing lost or doubled; a second SIGINT ends it at once,
leaving only whole files. A live sweep also refuses a second sweep on its run (runlock.py).
The guard itself, in this process: SIGTERM, the second signal held back while Ray writes its
experiment state, and Ray Tune's own interrupt event set by the first signal."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.engine import start_sweep, trials_by_id, write_space
from tune_sana.cli import main
from tune_sana.engine.interrupt import Interrupted, SignalStop, StopTune, resume_command
from tune_sana.engine.runlock import lock_file
from tune_sana.record.readers import read_history
from tune_sana.record.schema import SPEC_FILE

SAMPLES = 4
STEPS = 20


# --- the guard, in this process ----------------------------------------------------------------

def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / SPEC_FILE).write_text("trial: synthetic\n")
    return run


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs in this (main) thread at the next bytecode


def test_sigterm_stops_quietly_then_leaving_raises_the_resume_line(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    said: list[str] = []
    with pytest.raises(Interrupted) as caught:
        with SignalStop(run, say=said.append) as stop:
            _signal_self(signal.SIGTERM)  # no exception here: the sweep winds down
            assert stop.signum == signal.SIGTERM
            assert said and said[0].startswith("SIGTERM: stopping the sweep")
    assert caught.value.code == 128 + signal.SIGTERM
    assert str(caught.value) == (f"interrupted; the record in {run} is whole and readable. "
                                 f"Resume with: tune-sana resume {run}")
    assert {s: signal.getsignal(s) for s in before} == before  # handlers given back
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


def test_no_signal_no_interruption_and_a_keyboard_interrupt_gets_the_line(
        tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    with SignalStop(run, say=lambda line: None) as stop:
        stop.check()  # nothing came: nothing raised
    with pytest.raises(Interrupted, match="Resume with: tune-sana resume"):
        with SignalStop(run, say=lambda line: None):
            raise KeyboardInterrupt  # e.g. the confirm stage cut short
    with pytest.raises(Interrupted, match="interrupted before the sweep began"):
        with SignalStop(tmp_path / "runs" / "fresh", say=lambda line: None):
            raise KeyboardInterrupt


def test_a_second_signal_waits_for_rays_state_write_then_stops_at_once(
        tmp_path: Path) -> None:
    """Ray's experiment state is written by a plain json.dump: a KeyboardInterrupt in it would
    tear the file. The second signal is held back until that write returns."""
    scope: dict[str, Any] = {}
    exec(compile("def save_to_dir(write):\n    write()\n",  # a stand-in with Ray's name and path
                 os.path.join(os.sep, "site-packages", "ray", "tune", "execution", "x.py"),
                 "exec"), scope)
    save_to_dir: Callable[[Callable[[], None]], None] = scope["save_to_dir"]
    written: list[str] = []
    said: list[str] = []

    def write() -> None:
        _signal_self(signal.SIGINT)  # the second signal, in the middle of the write
        time.sleep(0.3)
        written.append("whole")

    with pytest.raises(Interrupted):
        with SignalStop(_run_dir(tmp_path), say=said.append):
            _signal_self(signal.SIGINT)
            save_to_dir(write)
            time.sleep(5)  # the held-back signal lands here
    assert written == ["whole"]  # the write was not cut short
    assert said[-1] == "SIGINT again: stopping at once"


def test_the_first_signal_sets_ray_tunes_own_interrupt_event(tmp_path: Path) -> None:
    """What tune.run does with signals, for real: with the guard on it leaves SIGINT alone, and
    the first signal sets the event its loop checks; its log line about it is dropped."""
    from ray.tune.tune import _setup_signal_catching

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addHandler(handler)
    usr1 = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(Interrupted), SignalStop(_run_dir(tmp_path), say=lambda line: None):
            ours = signal.getsignal(signal.SIGINT)
            event = _setup_signal_catching()  # as tune.run does when fit begins
            assert signal.getsignal(signal.SIGINT) == ours
            _signal_self(signal.SIGINT)
            assert event.is_set()
            assert signal.getsignal(signal.SIGINT) == ours  # still there for a second signal
            StopTune().on_step_begin(0, [])  # the loop's callback: set already, no second call
    finally:
        tune_logger.removeHandler(handler)
        signal.signal(signal.SIGUSR1, usr1)
    assert not [line for line in seen if line.startswith("Stop signal received")]


def test_the_tune_callback_pickles_and_the_resume_command_quotes() -> None:
    assert isinstance(pickle.loads(pickle.dumps(StopTune())), StopTune)

    class Flags:
        address, num_cpus, num_gpus = "10.0.0.1:6379", 4, None

    assert resume_command("/a b/r", Flags()) == \
        "tune-sana resume '/a b/r' --address 10.0.0.1:6379 --num-cpus 4"


# --- real sweeps -----------------------------------------------------------------------------

class _Stderr:
    """A sweep subprocess's stderr, read line by line as it comes."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        stream = proc.stderr
        self._thread = threading.Thread(target=lambda: self.lines.extend(
            line.decode(errors="replace").rstrip("\n") for line in stream), daemon=True)
        self._thread.start()

    def wait_for(self, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert proc.poll() is None or any(text in line for line in self.lines), self.text()
            assert time.monotonic() < deadline, f"no {text!r} in time: {self.text()}"
            time.sleep(0.05)

    def text(self) -> str:
        self._thread.join(timeout=0.01)
        return "\n".join(self.lines)


def _space(tmp_path: Path) -> Path:
    return write_space(tmp_path, "ctrlc", {
        "trial": "synthetic",
        "search": {"algorithm": "random", "num_samples": SAMPLES, "seed": 0, "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": STEPS, "step_seconds": 0.1, "diverge_above": 10.0},
        "space": {"lr": {"loguniform": [1e-4, 1e-2]}},
    })


def _first_trial_finished(driver: subprocess.Popen[bytes], run_dir: Path,
                          stderr: _Stderr) -> None:
    deadline = time.monotonic() + 180
    while not (run_dir / "trials.parquet").is_file():
        assert driver.poll() is None, stderr.text()
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.1)


def _whole_files(run_dir: Path) -> dict[str, dict[str, object]]:
    """Every file of the record reads (and Ray's experiment state parses); the trials."""
    for state in run_dir.glob("experiment_state-*.json"):
        json.loads(state.read_text())
    read_history(run_dir)
    return trials_by_id(run_dir)


@pytest.mark.slow
def test_first_sigint_stops_cleanly_and_its_resume_command_finishes_the_sweep(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space_file, run_dir = _space(tmp_path), tmp_path / "k"
    driver = start_sweep(space_file, tmp_path)
    stderr = _Stderr(driver)
    _first_trial_finished(driver, run_dir, stderr)

    # While it runs, a second sweep on its run is refused, naming it (also with --resume).
    for extra in ([], ["--resume"]):
        code = main(["sweep", str(space_file), "--storage", str(tmp_path), "--name", "k", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err, err
        assert err.startswith(f"tune-sana: error: {run_dir} is in use by another sweep (host "
                              f"{socket.gethostname()}, pid {driver.pid}, started "), err

    driver.send_signal(signal.SIGINT)  # as `kill -INT <pid>` does: the driver only
    assert driver.wait(timeout=120) == 130, stderr.text()
    text = stderr.text()
    assert "SIGINT: stopping the sweep" in text
    assert "done" not in text and "Tuner.restore" not in text, text
    last = text.strip().splitlines()[-1]
    prefix = f"tune-sana: interrupted; the record in {run_dir} is whole and readable. " \
             "Resume with: "
    assert last.startswith(prefix), last
    before = _whole_files(run_dir)
    assert 1 <= len(before) < SAMPLES
    assert not Path(lock_file(run_dir).path).exists()  # the lock went with the sweep

    command = shlex.split(last[len(prefix):])
    assert command[:3] == ["tune-sana", "resume", str(run_dir)]
    resumed = subprocess.run([sys.executable, "-m", "tune_sana.cli", *command[1:],
                              "--num-cpus", "2", "--progress-every", "30"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "sweep done" in resumed.stderr

    after = trials_by_id(run_dir)
    assert len(after) == SAMPLES
    for trial_id, row in before.items():
        assert after[trial_id] == row  # finished before Ctrl-C: unchanged, not re-run
    pairs = [(r["trial_id"], r["step"]) for r in read_history(run_dir, ["trial_id",
                                                                        "step"]).to_pylist()]
    assert len(pairs) == len(set(pairs)), "a step was recorded twice"
    for trial_id in after:
        assert sorted(s for t, s in pairs if t == trial_id) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_second_sigint_stops_at_once_leaving_whole_files(tmp_path: Path) -> None:
    space_file, run_dir = _space(tmp_path), tmp_path / "k"
    driver = start_sweep(space_file, tmp_path)
    stderr = _Stderr(driver)
    _first_trial_finished(driver, run_dir, stderr)
    driver.send_signal(signal.SIGINT)
    stderr.wait_for("SIGINT: stopping the sweep", driver)
    driver.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = driver.wait(timeout=60)
    took = time.monotonic() - sent
    text = stderr.text()
    assert code != 0 and "SIGINT again: stopping at once" in text, text
    assert "done" not in text and "Traceback" not in text, text
    assert took < 30, took  # most of it is Ray's own shutdown at exit
    _whole_files(run_dir)
    assert not Path(lock_file(run_dir).path).exists()
    deadline = time.monotonic() + 20  # and Ray's processes went with it
    while subprocess.run(["pgrep", "-s", str(driver.pid)], capture_output=True).stdout:
        assert time.monotonic() < deadline, "Ray processes outlived the driver"
        time.sleep(0.5)
