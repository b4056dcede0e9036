"""Multi-worker trials under Ray: a sweep whose trials each run as a 2-worker Ray Train
TorchTrainer (gloo on this CPU box), one of whose worker processes is killed mid-trial."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.engine import start_sweep, trials_by_id, write_space
from tune_sana.record.readers import read_history

pytestmark = pytest.mark.slow

STEPS = 40


def _space(tmp_path: Path) -> Path:
    # Two identical configurations, one after the other: the first is killed, the second not.
    # 2 workers x 0.5 CPU + 0.1 for the trial that starts them: fits 2 CPUs (hpo.md's sizing).
    return write_space(tmp_path, "workers", {
        "trial": "sana_finetune",
        "metric": "val_loss",
        "search": {"algorithm": "random", "num_samples": 2, "seed": 0, "max_concurrent": 1},
        "scheduler": {"type": "fifo"},
        "resources": {"workers": 2, "cpu": 0.5},
        "fixed": {"model": "sana-tiny", "steps": STEPS, "batch_size": 4, "val_batch_size": 16,
                  "eval_every": 10, "checkpoint_every": 10, "device": "cpu", "threads": 1},
        "space": {"warmup_steps": {"choice": [0]}},
    })


def _train_workers(driver_pid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_killed_worker_resumes_its_trial_to_the_loss_of_an_unkilled_one(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "k"
    driver = start_sweep(_space(tmp_path), tmp_path)
    deadline = time.monotonic() + 400
    killed = None
    while killed is None:  # the first trial's first checkpoint, then kill one of its workers
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint of the first trial appeared"
        if any(run_dir.glob("*/train/checkpoint_*")):
            workers = _train_workers(driver.pid)
            if workers:
                killed = workers[-1]
                killed.send_signal(signal.SIGKILL)
        time.sleep(0.05)
    _, err = driver.communicate(timeout=400)
    assert driver.returncode == 0, err.decode()[-3000:]

    trials = sorted(trials_by_id(run_dir).values(), key=lambda row: row["ended_at"])
    assert [t["outcome"] for t in trials] == ["completed", "completed"]
    assert {t["workers"] for t in trials} == {2}
    first, second = trials
    assert first["final_val_loss"] == second["final_val_loss"]  # as if never killed
    history = read_history(run_dir, ["trial_id", "step"]).to_pylist()
    for trial in trials:
        steps = sorted(r["step"] for r in history if r["trial_id"] == trial["trial_id"])
        assert steps == list(range(STEPS + 1)), "a step lost or recorded twice"


def test_workers_that_cannot_all_fit_are_refused_before_any_trial(tmp_path: Path) -> None:
    space = _space(tmp_path)
    space.write_text(space.read_text().replace("cpu: 0.5", "cpu: 1"))  # 2 x 1 + 0.1 > 2 CPUs
    result = subprocess.run(
        [sys.executable, "-m", "tune_sana.cli", "sweep", str(space), "--storage",
         str(tmp_path / "r"), "--num-cpus", "2"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tune-sana: error: resources.workers 2 x (cpu 1, gpu 0) plus 0.1 CPU")
    assert not any((tmp_path / "r").glob("*/sweep.yaml"))
