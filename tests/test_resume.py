"""A sweep whose driver is SIGKILLed mid-run is finished by --resume: nothing lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.engine import start_sweep, trials_by_id, write_space
from tune_sana.record.atomic import FAULT_ENV
from tune_sana.record.readers import read_history

pytestmark = pytest.mark.slow

SAMPLES = 6
STEPS = 30


def _finished(run_dir: Path) -> dict[str, dict[str, object]]:
    if not (run_dir / "trials.parquet").is_file():
        return {}
    return trials_by_id(run_dir)


def _space(tmp_path: Path) -> Path:
    return write_space(tmp_path, "slow", {
        "trial": "synthetic",
        "search": {"algorithm": "random", "num_samples": SAMPLES, "seed": 0, "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": STEPS, "step_seconds": 0.1, "diverge_above": 10.0},
        "space": {"lr": {"loguniform": [1e-4, 1e-2]}},
    })


def _resume_and_check(space_file: Path, run_dir: Path,
                      before: dict[str, dict[str, object]]) -> None:
    """--resume finishes the sweep: every trial once, finished ones unchanged, no step twice."""
    resumed = start_sweep(space_file, run_dir.parent, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]

    after = _finished(run_dir)
    assert len(after) == SAMPLES
    for trial_id, row in before.items():
        assert after[trial_id] == row  # finished trials unchanged, not re-run
    history = read_history(run_dir, ["trial_id", "step"]).to_pylist()
    pairs = [(r["trial_id"], r["step"]) for r in history]
    assert len(pairs) == len(set(pairs)), "a step was recorded twice"
    for trial_id in after:
        steps = sorted(s for t, s in pairs if t == trial_id)
        assert steps == list(range(1, STEPS + 1)), trial_id  # synthetic: steps 1..N
    assert not list(run_dir.rglob(".*.tmp")), "a crashed write's temp file was left behind"


def test_sigkill_before_the_first_result_then_resume(tmp_path: Path) -> None:
    space_file, run_dir = _space(tmp_path), tmp_path / "k"
    driver = start_sweep(space_file, tmp_path)
    deadline = time.monotonic() + 180
    while not (run_dir / "tuner.pkl").is_file():
        assert driver.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not _finished(run_dir)
    _resume_and_check(space_file, run_dir, {})


def test_sigkill_during_a_parquet_flush_then_resume(tmp_path: Path) -> None:
    """The driver dies inside its 3rd atomic write: the half-written file is never visible."""
    space_file, run_dir = _space(tmp_path), tmp_path / "k"
    driver = start_sweep(space_file, tmp_path, env={FAULT_ENV: "3"})
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == -signal.SIGKILL, err.decode()[-2000:]
    subprocess.run(["pkill", "-9", "-s", str(driver.pid)], check=False)  # its Ray processes
    assert list(run_dir.rglob(".*.tmp")), "the kill should have left a temp file"
    before = _finished(run_dir)  # every visible file reads cleanly
    read_history(run_dir)
    _resume_and_check(space_file, run_dir, before)


def test_sigkill_mid_sweep_then_resume(tmp_path: Path) -> None:
    space_file, run_dir = _space(tmp_path), tmp_path / "k"
    driver = start_sweep(space_file, tmp_path)
    deadline = time.monotonic() + 180
    while len(_finished(run_dir)) < 2:
        assert driver.poll() is None, driver.stderr.read() if driver.stderr else ""
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.5)
    time.sleep(1.5)  # let the next trials get going, so some are cut mid-run
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = _finished(run_dir)
    assert 2 <= len(before) < SAMPLES
    _resume_and_check(space_file, run_dir, before)
