"""Faults inside a sweep: a trial process killed from outside is retried from its checkpoint;
a trial that raises ends as `error` and the sweep goes on; neither loses or doubles a row."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.engine import last_steps, trials_by_id, write_space
from trials import sana_finetune
from tune_sana.config import build_config
from tune_sana.record.readers import read_history

pytestmark = pytest.mark.slow

TRIAL = {"model": "demo-base", "steps": 240, "eval_every": 40, "checkpoint_every": 40,
         "lr": 1e-3, "precision": "fp32", "device": "cpu", "threads": 1}


def _trial_processes(driver_pid: int) -> list[psutil.Process]:
    """The trial processes of this driver's own Ray (its descendants), never another Ray's on
    this machine."""
    found = []
    for proc in psutil.Process(driver_pid).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if cmdline.startswith("ray::ImplicitFunc") or cmdline.startswith("ray::_trainable"):
            found.append(proc)
    return found


def test_killed_trial_is_retried_from_its_checkpoint_and_ends_as_if_never_killed(
        tmp_path: Path, demo_base: Path) -> None:
    space_file = write_space(tmp_path, "kill", {
        "trial": "sana_finetune", "max_retries": 2,
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1},
        "scheduler": {"type": "fifo"},
        "fixed": TRIAL,
        "space": {"seed": {"grid": [0]}},
    })
    driver = subprocess.Popen(
        [sys.executable, "-m", "tune_sana.cli", "sweep", str(space_file), "--storage",
         str(tmp_path), "--name", "k", "--num-cpus", "2", "--progress-every", "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    run_dir = tmp_path / "k"
    deadline = time.monotonic() + 240
    while not list(run_dir.glob("*/checkpoint_*")):
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:] if driver.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint was written in time"
        time.sleep(0.2)
    victims = _trial_processes(driver.pid)
    assert victims, "the trial's process was not found"
    for proc in victims:
        proc.send_signal(signal.SIGKILL)
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err.decode()[-2000:]

    (row,) = trials_by_id(run_dir).values()
    assert row["outcome"] == "completed" and row["retries"] == 1
    steps = read_history(run_dir, ["step"]).column(0).to_pylist()
    assert sorted(steps) == list(range(TRIAL["steps"] + 1))  # each step once (0: the base)

    reference: list[dict[str, object]] = []
    sana_finetune.run(build_config({**TRIAL, "seed": 0}), reference.append)
    assert row["best_val_loss"] == reference[-1]["best_val_loss"]  # resumed exactly


def test_out_of_memory_is_an_error_row_not_a_retry_and_the_sweep_goes_on(
        tmp_path: Path) -> None:
    space_file = write_space(tmp_path, "boom", {
        "trial": "synthetic", "max_retries": 2,
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": 10, "diverge_above": 10.0},
        "space": {"allocate_gb": {"grid": [None, 1.0e6]}},  # a million GiB: the allocator says no
    })
    result = subprocess.run(
        [sys.executable, "-m", "tune_sana.cli", "sweep", str(space_file), "--storage",
         str(tmp_path), "--name", "b", "--num-cpus", "2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {json.loads(r["config_json"])["allocate_gb"]: r
            for r in trials_by_id(tmp_path / "b").values()}
    assert rows[None]["outcome"] == "completed"
    oom = rows[1.0e6]
    assert oom["outcome"] == "error" and oom["retries"] == 0
    assert oom["error"].startswith("out of memory: RuntimeError") and "\n" not in oom["error"]
    assert last_steps(tmp_path / "b")[oom["trial_id"]] == 1  # steps 0-1 ran, then it failed
