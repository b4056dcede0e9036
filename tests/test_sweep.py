"""The sweep engine end to end on a real local Ray: divergence stopping, Parquet, Optuna."""

from __future__ import annotations

import glob
import pickle
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from tests.engine import last_steps, no_nonfinite, run_cli, trials_by_id, write_space
from trials import synthetic
from tune_sana.record.readers import read_history, read_metadata, read_trials
from tune_sana.record.schema import SCHEMA_VERSION

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]



def _nan_space(tmp_path: Path) -> Path:
    return write_space(tmp_path, "nan", {
        "trial": "synthetic",
        "search": {"algorithm": "random", "num_samples": 2, "seed": 0, "max_concurrent": 2},
        "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 3},
        "fixed": {"steps": 100, "nan_from": 3, "diverge_above": 100.0, "eval_every": 1},
        "space": {"lr": {"loguniform": [1e-4, 1e-2]}},
    })


def test_engine_stops_an_unchecked_nan_trial_at_that_report(tmp_path: Path) -> None:
    assert run_cli(str(_nan_space(tmp_path)), "--storage", str(tmp_path), "--name", "r") == 0
    run_dir = tmp_path / "r"
    trials = trials_by_id(run_dir)
    assert len(trials) == 2
    for trial_id, row in trials.items():
        assert row["outcome"] == "diverged"
        assert row["divergence_cause"] == "nonfinite_metric"
        assert row["diverged_step"] == 3
        assert last_steps(run_dir)[trial_id] == 3  # no report after the NaN one
    assert no_nonfinite(read_history(run_dir)) and no_nonfinite(read_trials(run_dir))


def test_plain_asha_lets_the_same_nan_trial_run_to_the_end(tmp_path: Path) -> None:
    """The baseline the engine fixes (reference/hpo.md): ASHA alone never stops a NaN trial."""
    def trainable(config: dict[str, float]) -> None:
        synthetic.run(config, tune.report)

    tuner = tune.Tuner(
        trainable,
        param_space={"steps": 100, "nan_from": 3, "diverge_above": 100.0, "eval_every": 1,
                     "lr": 1e-3},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=1,
                                    scheduler=ASHAScheduler(grace_period=10, max_t=100)),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="plain", verbose=0),
    )
    result = tuner.fit()[0]
    assert result.metrics is not None and result.metrics["training_iteration"] == 100


def test_optuna_sweep_records_every_trial_once_and_tells_optuna(tmp_path: Path) -> None:
    space_file = write_space(tmp_path, "mixed", {
        "trial": "synthetic",
        "search": {"algorithm": "optuna", "num_samples": 8, "seed": 3, "max_concurrent": 2},
        "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 3},
        "fixed": {"steps": 30, "diverge_above": 1e-2},
        "space": {"lr": {"loguniform": [1e-4, 1.0]}, "seed": {"int": [0, 3]}},
    })
    assert run_cli(str(space_file), "--storage", str(tmp_path), "--name", "m") == 0
    run_dir = tmp_path / "m"

    trials = read_trials(run_dir)
    assert trials.num_rows == 8 and len(set(trials["trial_id"].to_pylist())) == 8
    outcomes = set(trials["outcome"].to_pylist())
    assert "diverged" in outcomes and "completed" in outcomes
    steps = last_steps(run_dir)
    for row in trials.to_pylist():
        assert row["lr"] is not None
        if row["outcome"] == "diverged":
            assert row["diverged_step"] == steps[row["trial_id"]] == 5
        if row["outcome"] == "completed":
            assert steps[row["trial_id"]] == 30 and row["best_val_loss"] is not None
    # steps 1..N: the synthetic trial reports no base row
    assert ds.dataset(run_dir / "history").count_rows() == sum(steps.values())
    assert read_metadata(run_dir / "trials.parquet")["tune_sana.schema_version"] == str(
        SCHEMA_VERSION)
    assert (run_dir / "sweep.yaml").is_file()

    state_file = glob.glob(str(run_dir / "searcher-state-*.pkl"))
    assert state_file
    with open(state_file[0], "rb") as fh:
        state = pickle.load(fh)
    study = state["_ot_study"] if isinstance(state, dict) else state[2]
    ot_states = [t.state.name for t in study.trials]
    assert ot_states.count("RUNNING") == 0
    diverged = [t for t in study.trials if t.user_attrs.get("diverged")]
    assert len(diverged) == trials["outcome"].to_pylist().count("diverged")
    assert all(t.state.name == "COMPLETE" and t.constraints == {"diverged": 1.0}
               for t in diverged)


def test_sana_sweep_diverges_for_real_and_stops_at_the_diverged_step(tmp_path: Path) -> None:
    """The real trial program under the engine: pure fp16 diverges, fp32 and bf16-amp train."""
    space_file = write_space(tmp_path, "sana", {
        "trial": "sana_finetune",
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "fixed": {"model": "demo-base", "steps": 30, "eval_every": 10, "lr": 3e-4,
                  "device": "cpu"},
        "space": {"precision": {"grid": ["fp32", "fp16", "bf16-amp"]}},
    })
    assert run_cli(str(space_file), "--storage", str(tmp_path), "--name", "s") == 0
    run_dir = tmp_path / "s"
    rows = {r["precision"]: r for r in read_trials(run_dir).to_pylist()}
    assert rows["fp16"]["outcome"] == "diverged"
    assert rows["fp16"]["divergence_cause"] == "nonfinite_params"
    assert last_steps(run_dir)[rows["fp16"]["trial_id"]] == rows["fp16"]["diverged_step"]
    for mode in ("fp32", "bf16-amp"):
        assert rows[mode]["outcome"] == "completed" and rows[mode]["steps_run"] == 30
        assert rows[mode]["best_val_loss"] > 0
    assert no_nonfinite(read_history(run_dir))

    # The relay sent the steps in batches (evaluations at once), and every step arrived once.
    fp32 = rows["fp32"]["trial_id"]
    hist = read_history(run_dir, ["trial_id", "step", "timestamp"]).to_pylist()
    steps = [r["step"] for r in hist if r["trial_id"] == fp32]
    assert sorted(steps) == list(range(31))  # step 0: the base
    ray_results = glob.glob(str(run_dir / f"*{fp32}*" / "result.json"))
    assert len(ray_results) == 1
    n_results = len(Path(ray_results[0]).read_text().splitlines())
    assert 3 <= n_results < 30  # at least the three evaluations, fewer than one per step
    times = [r["timestamp"] for r in sorted(hist, key=lambda r: r["step"])
             if r["trial_id"] == fp32]
    assert times == sorted(times) and len(set(times)) == 31  # each row's own time
