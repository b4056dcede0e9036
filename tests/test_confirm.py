"""The confirm stage: config_id, the choice of configurations and seeds, and real sweeps whose
best configurations are re-run with fresh seeds into the same record; starting points first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.engine import run_cli, start_sweep, trials_by_id, write_space
from tune_sana.engine import confirm, space
from tune_sana.engine.space import SweepSpec
from tune_sana.record.readers import read_history


def _spec(**search: Any) -> SweepSpec:
    return space.parse_spec({
        "trial": "synthetic",
        "search": {"algorithm": "random", "num_samples": 8, **search},
        "fixed": {"steps": 10},
        "space": {"lr": {"loguniform": [1e-5, 1e-1]}, "nan_from": {"choice": [None, 50]}},
    }, "x.yaml")


def _row(trial_id: str, lr: float, best: float | None, *, seed: int | None = None,
         outcome: str = "completed", stage: str | None = "search",
         nan_from: int | None = None) -> dict[str, Any]:
    fixed = {"steps": 10}
    config = {**fixed, "lr": lr, "nan_from": nan_from, **({"seed": seed} if seed is not None
                                                          else {})}
    return {"trial_id": trial_id, "lr": lr, "seed": seed, "steps": 10, "outcome": outcome,
            "best_val_loss": best, "stage": stage, "config_id": confirm.config_id(config),
            "config_json": json.dumps({"nan_from": nan_from})}


# --- config_id, plan, searcher (no Ray) ------------------------------------------------------

def test_config_id_names_a_configuration_whatever_its_seed_and_record_types() -> None:
    one = confirm.config_id({"lr": 1e-3, "max_grad_norm": 1, "precision": "fp32", "seed": 0})
    assert len(one) == 12 and int(one, 16) >= 0
    assert confirm.config_id({"seed": 7, "precision": "fp32", "max_grad_norm": 1.0,
                              "lr": 1e-3}) == one
    assert confirm.config_id({"lr": 1e-3, "max_grad_norm": 1, "precision": "fp32"}) == one
    assert confirm.config_id({"lr": 2e-3, "max_grad_norm": 1, "precision": "fp32"}) != one
    assert confirm.config_id({"lr": 1e-3, "max_grad_norm": None, "precision": "fp32"}) != one


def test_plan_takes_the_best_distinct_completed_configurations_and_unused_seeds() -> None:
    spec = _spec(confirm={"top_k": 2, "seeds": 3})
    rows = [
        _row("a", 1e-3, 0.20, seed=4),
        _row("b", 1e-3, 0.15, seed=1),  # the same configuration as a, another seed
        _row("c", 3e-3, 0.17),
        _row("d", 1e-2, 0.10, outcome="pruned"),
        _row("e", 1e-1, None, outcome="diverged"),
        _row("f", 5e-4, 0.18, nan_from=50),
        _row("g", 2e-4, 0.01, seed=9, stage="confirm"),  # never chosen, its seed not counted
    ]
    chosen = confirm.plan(spec, rows)
    assert chosen.configs == ({"lr": 1e-3, "nan_from": None}, {"lr": 3e-3, "nan_from": None})
    assert chosen.config_ids == (rows[1]["config_id"], rows[2]["config_id"])
    assert chosen.seeds == (5, 6, 7)  # above every seed the search used (4)
    assert [(r["lr"], r["seed"]) for r in chosen.replicas()] == [
        (1e-3, 5), (3e-3, 5), (1e-3, 6), (3e-3, 6), (1e-3, 7), (3e-3, 7)]
    assert chosen.describe() == ("confirm: re-running top 2 configurations with 3 fresh seeds "
                                 "each (6 trials)")

    done = [{**_row("h", 3e-3, 0.2, seed=6, stage="confirm")}]
    pending = chosen.pending(spec, rows + done)
    assert len(pending) == 5 and {"lr": 3e-3, "nan_from": None, "seed": 6} not in pending

    best_max = confirm.plan(_spec(confirm={"top_k": 1, "seeds": 1}).model_copy(
        update={"mode": "max"}), rows)
    assert best_max.configs == ({"lr": 1e-3, "nan_from": None},)  # 0.20: the largest


def test_plan_with_fewer_completed_than_top_k_or_none() -> None:
    spec = _spec(confirm={"top_k": 3, "seeds": 1})
    fewer = confirm.plan(spec, [_row("a", 1e-3, 0.2), _row("b", 1e-3, 0.1, seed=2)])
    assert len(fewer.configs) == 1 and fewer.seeds == (3,)
    assert fewer.describe() == ("confirm: re-running top 1 configuration with 1 fresh seed each "
                                "(1 trial); only 1 distinct configuration completed (top_k 3)")
    none = confirm.plan(spec, [_row("a", 1e-1, None, outcome="diverged")])
    assert none.replicas() == [] and none.seeds == (1,)
    assert none.describe() == "confirm: no search trial completed; nothing to confirm"


def test_search_finished_counts_the_search_trials_recorded() -> None:
    spec = _spec(confirm={"top_k": 1, "seeds": 1}, num_samples=2)
    assert not confirm.search_finished(spec, [_row("a", 1e-3, 0.2),
                                              _row("c", 1e-3, 0.2, stage="confirm")])
    assert confirm.search_finished(spec, [_row("a", 1e-3, 0.2), _row("b", 1e-3, None,
                                                                     stage=None)])


def test_replica_searcher_hands_out_each_once_and_resumes(tmp_path: Path) -> None:
    from ray.tune.search import Searcher

    searcher = confirm.ReplicaSearcher([{"lr": 1.0, "seed": 1}, {"lr": 2.0, "seed": 1}],
                                       "val_loss", "min")
    assert searcher.suggest("t1") == {"lr": 1.0, "seed": 1}
    searcher.save(str(tmp_path / "state.pkl"))
    assert searcher.suggest("t2") == {"lr": 2.0, "seed": 1}
    assert searcher.suggest("t3") == Searcher.FINISHED
    restored = confirm.ReplicaSearcher([], "val_loss", "min")
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.suggest("t2") == {"lr": 2.0, "seed": 1}
    assert restored.suggest("t3") == Searcher.FINISHED


def _record(run_dir: Path, spec: SweepSpec, rows: list[dict[str, Any]]) -> None:
    from tune_sana.record.writer import ResultsWriter

    writer = ResultsWriter(run_dir, spec.to_yaml())
    for row in rows:
        config = {**spec.fixed, "lr": row["lr"], "nan_from": None,
                  **({"seed": row["seed"]} if row["seed"] is not None else {})}
        writer.finish_trial(row["trial_id"], config, row)


def test_run_confirm_without_ray_when_there_is_nothing_to_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tune_sana.engine.sweep import SweepOptions, run_confirm

    spec = _spec(confirm={"top_k": 1, "seeds": 1}, num_samples=2)
    options = SweepOptions(resume=True)
    run_confirm(_spec(num_samples=2), tmp_path / "none", options)  # no confirm: not even read

    cut = tmp_path / "cut"  # a search stopped early (Ray's fit ends quietly on Ctrl-C)
    _record(cut, spec, [_row("a", 1e-3, 0.2)])
    with pytest.raises(KeyboardInterrupt):
        run_confirm(spec, cut, options)
    assert "confirm: the search stopped before all its trials finished" in capsys.readouterr().err

    failed = tmp_path / "failed"
    _record(failed, spec, [_row("a", 1e-1, None, outcome="diverged"),
                           _row("b", 1e-1, None, outcome="error")])
    run_confirm(spec, failed, options)
    assert "confirm: no search trial completed; nothing to confirm" in capsys.readouterr().err

    done = tmp_path / "done"
    _record(done, spec, [_row("a", 1e-3, 0.2), _row("b", 1e-2, 0.3),
                         _row("c", 1e-3, 0.2, seed=1, stage="confirm")])
    run_confirm(spec, done, options)
    assert "confirm: all 1 trial already recorded" in capsys.readouterr().err


# --- real sweeps on a local Ray ----------------------------------------------------------------

LRS = [1e-4, 1e-3, 3e-3]  # the synthetic trial's best lr is 1e-3, then 3e-3, then 1e-4


def _grid_space(folder: Path, name: str, **search: Any) -> Path:
    return write_space(folder, name, {
        "trial": "synthetic",
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 2, **search},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": 12, "eval_every": 4, "diverge_above": 1.0},
        "space": {"lr": {"grid": LRS}, "seed": {"grid": [0, 1]}},
    })


@pytest.fixture(scope="module")
def confirmed(local_ray: None, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, Path, str]:
    """A grid sweep of 3 lr x 2 seeds, then the confirm stage (top 2, 2 seeds)."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("confirm")
    space_file = _grid_space(folder, "conf", confirm={"top_k": 2, "seeds": 2})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_cli(str(space_file), "--storage", str(folder), "--name", "c") == 0
    return space_file, folder / "c", err.getvalue()


@pytest.mark.slow  # the module's first sweep: Ray's start and its first workers, ~25 s
@pytest.mark.usefixtures("local_ray")
def test_confirm_stage_re_runs_the_top_configurations_with_fresh_seeds(
        confirmed: tuple[Path, Path, str]) -> None:
    _, run_dir, stderr = confirmed
    rows = list(trials_by_id(run_dir).values())
    search = [r for r in rows if r["stage"] == "search"]
    replicas = [r for r in rows if r["stage"] == "confirm"]
    assert len(search) == 6 and len(replicas) == 4
    assert ("confirm: re-running top 2 configurations with 2 fresh seeds each (4 trials)"
            in stderr)
    # The search's ids: one per lr, shared by its two seeds.
    ids = {r["lr"]: r["config_id"] for r in search}
    assert len(set(ids.values())) == 3
    assert all(r["config_id"] == ids[r["lr"]] for r in search)
    # The replicas: the two best lrs, each with the seeds 2 and 3 that no search trial used.
    assert sorted((r["lr"], r["seed"]) for r in replicas) == [
        (1e-3, 2), (1e-3, 3), (3e-3, 2), (3e-3, 3)]
    assert all(r["config_id"] == ids[r["lr"]] for r in replicas)
    assert all(r["outcome"] == "completed" and r["steps_run"] for r in replicas)
    # Ordinary trials of the run: their history is in the same record, each step once.
    history = read_history(run_dir, ["trial_id", "step"]).to_pylist()
    pairs = [(h["trial_id"], h["step"]) for h in history]
    assert len(pairs) == len(set(pairs))
    assert {h["trial_id"] for h in history} == {r["trial_id"] for r in rows}
    assert (run_dir / confirm.FOLDER).is_dir()  # its Ray experiment, inside the run


@pytest.mark.slow  # the sweep of the test above
@pytest.mark.usefixtures("local_ray")
def test_resume_of_a_confirmed_run_records_nothing_twice(
        confirmed: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    space_file, run_dir, _ = confirmed
    before = trials_by_id(run_dir)
    n_history = read_history(run_dir, ["trial_id"]).num_rows
    assert run_cli(str(space_file), "--storage", str(run_dir.parent), "--name", "c",
                   "--resume") == 0
    assert "confirm: all 4 trials already recorded" in capsys.readouterr().err
    assert trials_by_id(run_dir) == before
    assert read_history(run_dir, ["trial_id"]).num_rows == n_history


@pytest.mark.usefixtures("local_ray")
def test_no_confirm_key_no_confirm_stage(tmp_path: Path) -> None:
    space_file = _grid_space(tmp_path, "plain")
    assert run_cli(str(space_file), "--storage", str(tmp_path), "--name", "p") == 0
    rows = list(trials_by_id(tmp_path / "p").values())
    assert len(rows) == 6 and {r["stage"] for r in rows} == {"search"}
    assert all(r["config_id"] for r in rows)
    assert not (tmp_path / "p" / confirm.FOLDER).exists()


@pytest.mark.usefixtures("local_ray")
@pytest.mark.parametrize("algorithm", ["optuna", "random"])
def test_points_to_evaluate_are_the_first_configurations_run(tmp_path: Path,
                                                             algorithm: str) -> None:
    points = [{"lr": 0.05, "nan_from": None}, {"lr": 2e-5}]
    space_file = write_space(tmp_path, "points", {
        "trial": "synthetic",
        "search": {"algorithm": algorithm, "num_samples": 3, "seed": 0, "max_concurrent": 1,
                   "points_to_evaluate": points},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": 4, "eval_every": 2, "diverge_above": 1.0},
        "space": {"lr": {"loguniform": [1e-5, 1e-1]}, "nan_from": {"choice": [None, 50]}},
    })
    assert run_cli(str(space_file), "--storage", str(tmp_path), "--name", "s") == 0
    run_dir = tmp_path / "s"
    started: dict[str, float] = {}
    for row in read_history(run_dir, ["trial_id", "timestamp"]).to_pylist():
        started[row["trial_id"]] = min(started.get(row["trial_id"], row["timestamp"]),
                                       row["timestamp"])
    rows = trials_by_id(run_dir)
    assert len(rows) == 3  # the points count inside num_samples
    order = sorted(rows.values(), key=lambda r: started[r["trial_id"]])
    assert [r["lr"] for r in order[:2]] == [0.05, 2e-5]
    assert json.loads(order[0]["config_json"])["nan_from"] is None


@pytest.mark.slow  # two drivers, each with its own Ray
def test_sigkill_during_the_confirm_stage_then_resume(tmp_path: Path) -> None:
    """The driver dies with confirm trials recorded and others running: --resume runs each
    missing replica once and leaves every recorded trial as it was."""
    import os
    import signal
    import time

    space_file = write_space(tmp_path, "kill", {
        "trial": "synthetic",
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 2,
                   "confirm": {"top_k": 2, "seeds": 3}},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": 20, "eval_every": 5, "diverge_above": 1.0, "step_seconds": 0.1},
        "space": {"lr": {"grid": LRS}},
    })
    run_dir = tmp_path / "k"

    def stages() -> list[str]:
        if not (run_dir / "trials.parquet").is_file():
            return []
        return [str(r["stage"]) for r in trials_by_id(run_dir).values()]

    driver = start_sweep(space_file, tmp_path)
    deadline = time.monotonic() + 240
    while stages().count("confirm") < 1:
        assert driver.poll() is None, driver.stderr.read() if driver.stderr else ""
        assert time.monotonic() < deadline, "no confirm trial finished in time"
        time.sleep(0.3)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = trials_by_id(run_dir)
    assert 1 <= stages().count("confirm") < 6

    resumed = start_sweep(space_file, tmp_path, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert "(resumed: " in err.decode()
    after = trials_by_id(run_dir)
    for trial_id, row in before.items():
        assert after[trial_id] == row
    replicas = [r for r in after.values() if r["stage"] == "confirm"]
    assert sorted((r["lr"], r["seed"]) for r in replicas) == [
        (lr, seed) for lr in (1e-3, 3e-3) for seed in (1, 2, 3)]
    history = read_history(run_dir, ["trial_id", "step"]).to_pylist()
    pairs = [(h["trial_id"], h["step"]) for h in history]
    assert len(pairs) == len(set(pairs)), "a step was recorded twice"
