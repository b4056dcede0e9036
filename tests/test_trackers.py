"""--track: every step row reaches TensorBoard, MLflow and W&B, read back from their real files."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

from tests.engine import run_in_terminal, write_space
from tune_sana.config import UserError
from tune_sana.engine import trackers
from tune_sana.record.readers import read_history, read_trials

pytestmark = pytest.mark.slow

# Two trials of 24 steps; val_loss every 4 steps. Rows reach the driver in batches (relay.py):
# a row carrying the metric is sent at once with the rows held before it.
_SPACE = {
    "trial": "synthetic",
    "search": {"algorithm": "random", "num_samples": 2, "seed": 1, "max_concurrent": 2},
    "scheduler": {"type": "fifo"},
    "fixed": {"steps": 24, "eval_every": 4},
    "space": {"lr": {"loguniform": [1e-4, 1e-3]}},
}


_WANDB_TEST = os.environ.get("TUNE_SANA_TEST_WANDB") == "1"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """One sweep tracked by TensorBoard and MLflow (and W&B with TUNE_SANA_TEST_WANDB=1), run
    as a user runs it: ``tune-sana sweep`` in a terminal (a pseudo-terminal), with its own
    embedded Ray. Its run directory, exit status and what it wrote to the terminal."""
    folder = tmp_path_factory.mktemp("tracked")
    space = write_space(folder, "tracked", _SPACE)
    names = ["tensorboard", "mlflow", *(["wandb"] if _WANDB_TEST else [])]
    env: dict[str, str | None] = {var: None for var in (
        "WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI")}
    env.update(NETRC=str(folder / "no-netrc"), WANDB_SILENT="true")  # no W&B login either
    code, text = run_in_terminal(
        ["sweep", str(space), "--storage", str(folder), "--name", "t", "--num-cpus", "2",
         "--report-every", "30", *[arg for name in names for arg in ("--track", name)]],
        env=env)
    return folder / "t", code, text


def _history(run_dir: Path) -> dict[str, dict[str, dict[int, float]]]:
    """Per trial id, per metric, step -> value, from the Parquet record."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for row in read_history(run_dir, ["trial_id", "step", "train_loss", "val_loss"]).to_pylist():
        for key in ("train_loss", "val_loss"):
            if row[key] is not None:
                out.setdefault(row["trial_id"], {}).setdefault(key, {})[row["step"]] = row[key]
    return out


def _trial_id(name: str, ids: list[str]) -> str:
    """The trial id a tracker's run name (Ray's trial name, <trainable>_<id>) ends with."""
    (found,) = [i for i in ids if name.endswith(i)]
    return found


def test_the_tracked_sweep_showed_the_live_table_in_its_terminal(
        tracked: tuple[Path, int, str]) -> None:
    _, code, text = tracked
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert code == 0, plain[-3000:]
    assert "\x1b[" in text and "tune-sana sweep: 2 of 2 trials finished" in plain, plain[-3000:]
    assert "best val_loss" in plain and "eta 0s" in plain
    assert "[    " not in plain  # the plain progress lines are for logs, not terminals
    assert "tune-sana: sweep done: 2 completed" in plain


def test_mlflow_store_holds_every_step_row_and_the_config(tracked: tuple[Path, int, str]
                                                           ) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tracked[0]
    history = _history(run_dir)
    configs = {r["trial_id"]: r for r in read_trials(run_dir, ["trial_id", "lr"]).to_pylist()}
    client = MlflowClient(f"sqlite:///{run_dir / trackers.MLFLOW_DB}")
    experiment = client.get_experiment_by_name("t")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 == len(history)
    for run in runs:
        trial_id = _trial_id(run.info.run_name, list(history))
        assert run.info.status == "FINISHED"
        assert math.isclose(float(run.data.params["lr"]), configs[trial_id]["lr"])
        for key, by_step in history[trial_id].items():
            logged = client.get_metric_history(run.info.run_id, key)
            assert {m.step: m.value for m in logged} == pytest.approx(by_step)
            assert len(logged) == len(by_step)  # each row once
        assert len(history[trial_id]["train_loss"]) == 24


def test_tensorboard_events_hold_every_step_row(tracked: tuple[Path, int, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked[0]
    history = _history(run_dir)
    folders = sorted((run_dir / trackers.TENSORBOARD_FOLDER).iterdir())
    assert len(folders) == 2
    for folder in folders:
        events = EventAccumulator(str(folder))
        events.Reload()
        trial_id = _trial_id(folder.name, list(history))
        for key, by_step in history[trial_id].items():
            scalars = events.Scalars(f"ray/tune/{key}")
            assert len(scalars) == len(by_step)
            assert {s.step: s.value for s in scalars} == pytest.approx(by_step, rel=1e-6)


def test_bad_tracker_names_say_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="--track nope: unknown tracker; choose from"):
        trackers.check(["nope"])
    with pytest.raises(UserError, match="keeps the trackers it began with"):
        trackers.check(["mlflow"], resume=True)
    with pytest.raises(UserError, match="use a local --storage"):
        trackers.check(["tensorboard"], storage="s3://bucket/runs")
    assert trackers.check(["mlflow", "mlflow", "tensorboard"]) == ("mlflow", "tensorboard")
    # a tracker whose package is missing (here: a module name nothing provides)
    monkeypatch.setitem(trackers._PACKAGES, "mlflow", ("no_such_module_here", "mlflow-skinny"))
    with pytest.raises(UserError, match=r"--track mlflow: the mlflow-skinny package is not "
                       r"installed; pip install mlflow-skinny \(or pip install "
                       r"'tune-sana\[track\]'\)"):
        trackers.check(["mlflow"])


@pytest.mark.skipif(not _WANDB_TEST, reason="W&B offline costs about a minute more per sweep "
                    "here (Ray's W&B logger starts two Ray actors per trial, each starting "
                    "wandb); TUNE_SANA_TEST_WANDB=1 runs it")
def test_wandb_writes_an_offline_run_per_trial(tracked: tuple[Path, int, str]) -> None:
    run_dir = tracked[0]
    offline = list((run_dir / trackers.WANDB_FOLDER).glob("offline-run-*"))
    assert len(offline) == 2, offline
    for run in offline:
        assert list(run.glob("*.wandb"))  # the run's own log, which wandb sync uploads
