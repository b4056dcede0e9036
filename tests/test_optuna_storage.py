"""The Optuna study on disk (engine/study.py): every trial in its true state, read back with
Optuna's own API; --resume loads the study instead of duplicating it; a URI run's study."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.samplers._tpe.sampler import _split_trials
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from tests import test_warm_start as warm_runs
from tests.engine import run_cli, trials_by_id, write_space
from tune_sana.engine import space, study
from tune_sana.engine.search import (
    PrunedByValueTPE,
    _PrunedAsComplete,
    build_searcher,
    tpe_sampler,
)

SPACE: dict[str, Any] = {
    "trial": "synthetic", "fixed": {"steps": 10},
    "space": {"lr": {"loguniform": [1e-5, 1.0]}, "nan_from": {"choice": [None, 3]}},
    "search": {"num_samples": 6, "seed": 1},
}
SPEC = space.parse_spec(SPACE, "t.yaml")


def _load(run_dir: Path) -> optuna.Study:
    """The run's study, opened as optuna-dashboard opens it: the journal file, by name."""
    storage = JournalStorage(JournalFileBackend(str(run_dir / study.STUDY_FILE)))
    assert optuna.get_all_study_names(storage) == [run_dir.name]  # one study, never a copy
    return optuna.load_study(study_name=run_dir.name, storage=storage)


def _searcher(spec: space.SweepSpec, run_dir: Path) -> Any:
    searcher, _ = build_searcher(spec, str(run_dir))
    return searcher


def test_each_outcome_is_stored_in_its_true_state(tmp_path: Path) -> None:
    run_dir = tmp_path / "run-1"
    searcher = _searcher(SPEC, run_dir)
    for trial_id in "abcdef":
        assert searcher.suggest(trial_id) is not None
    searcher.on_trial_result("e", {"val_loss": 0.7, "step": 5, "training_iteration": 1})
    searcher.on_trial_complete("a", {"val_loss": 0.5, "step": 10, "outcome": "completed"})
    searcher.on_trial_complete("b", {"step": 5, "outcome": "diverged",
                                     "divergence_cause": "nonfinite_loss"})
    searcher.on_trial_complete("c", {"val_loss": 0.9, "step": 10, "outcome": "collapsed",
                                     "divergence_cause": "loss_collapse"})
    # the scheduler stopped e at step 10: Ray skips on_trial_result for that result
    searcher.on_trial_complete("e", {"val_loss": 0.6, "step": 10})
    searcher.on_trial_complete("f", {"step": 2, "outcome": "error", "error": "ValueError: x"})
    searcher.on_trial_complete("d", None, error=True)  # its process died past its retries

    trials = _load(run_dir).trials
    assert [t.user_attrs["trial_id"] for t in trials] == list("abcdef")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL,
                                                                     TrialState.PRUNED,
                                                                     TrialState.FAIL]
    assert [t.user_attrs["outcome"] for t in trials] == [
        "completed", "diverged", "collapsed", "error", "pruned", "error"]
    completed, diverged, collapsed, _, pruned, _ = trials
    assert completed.value == 0.5 and completed.constraints == {}
    # a penalty past the worst finite value so far (0.5): 0.5 + (|0.5| + 1)
    assert diverged.constraints == {"diverged": 1.0} and diverged.value == 2.0
    assert collapsed.constraints == {"collapsed": 1.0} and collapsed.value == 2.0
    assert pruned.value == 0.6 and pruned.intermediate_values == {5: 0.7, 10: 0.6}


def test_tpe_ranks_a_stored_pruned_trial_by_its_value() -> None:
    """ASHA never prunes the first trial at a rung: a mediocre early trial completes, a better
    later one is pruned. Stored as PRUNED, it is still the good one TPE draws around (plain
    TPE draws around the completed one)."""
    lr = optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)
    sampler = tpe_sampler(seed=0, n_startup_trials=0)
    assert isinstance(sampler, PrunedByValueTPE)
    found = optuna.create_study(sampler=sampler)
    found.add_trial(optuna.trial.create_trial(params={"lr": 1e-5}, distributions={"lr": lr},
                                              value=0.45))
    found.add_trial(optuna.trial.create_trial(params={"lr": 0.3}, distributions={"lr": lr},
                                              state=TrialState.PRUNED, value=0.19,
                                              intermediate_values={10: 0.19}))
    assert [t.state for t in found.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    for seen_by, good in ((found, 0), (_PrunedAsComplete(found), 1)):
        below, _ = _split_trials(seen_by, seen_by._get_trials(deepcopy=False), n_below=1)
        assert [t.number for t in below] == [good]
    drawn = []
    for _ in range(20):
        asked = found.ask({"lr": lr})
        drawn.append(asked.params["lr"])
        found.tell(asked, state=TrialState.FAIL)  # TPE ignores it: each draw sees two trials
    assert all(x > 1e-2 for x in drawn)  # all near 0.3; plain TPE draws none above 1e-2


def test_a_resume_that_starts_afresh_loads_the_study_and_queues_no_point_twice(
        tmp_path: Path) -> None:
    spec = space.parse_spec({**SPACE, "search": {
        **SPACE["search"], "points_to_evaluate": [{"lr": 1e-3}, {"lr": 2e-3}]}}, "t.yaml")
    run_dir = tmp_path / "run-2"
    first = _searcher(spec, run_dir)
    assert first.suggest("a")["lr"] == 1e-3
    first.on_trial_complete("a", {"val_loss": 2.0, "step": 10, "outcome": "completed"})
    assert first.suggest("b")["lr"] == 2e-3  # then the driver is killed: b never finishes

    again = _searcher(spec, run_dir)  # no Ray state to restore: a new searcher, same storage
    assert again._penalty() == 5.0  # worst so far, 2.0, plus |2.0| + 1
    assert again.suggest("c")["lr"] not in (1e-3, 2e-3)  # both points ran: none queued again
    trials = _load(run_dir).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.RUNNING]
    assert "resumed" in trials[1].user_attrs["stopped"]


def test_ray_restore_fails_trials_asked_after_its_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run-3"
    searcher = _searcher(SPEC, run_dir)
    at_start = pickle.dumps(searcher)  # as in Ray's tuner.pkl
    searcher.suggest("a")
    searcher.suggest("b")
    saved = tmp_path / "searcher.pkl"
    searcher.save(str(saved))  # Ray's experiment checkpoint
    searcher.on_trial_complete("a", {"val_loss": 0.5, "step": 10, "outcome": "completed"})
    searcher.suggest("c")  # asked after the checkpoint; then the driver dies

    restored = pickle.loads(at_start)
    restored.restore(str(saved))  # as Tuner.restore does
    restored.on_trial_complete("a", {"val_loss": 0.4, "step": 10, "outcome": "completed"})
    restored.on_trial_complete("b", {"val_loss": 0.3, "step": 10, "outcome": "completed"})
    a, b, c = _load(run_dir).trials
    assert (a.state, a.value) == (TrialState.COMPLETE, 0.5)  # told once, before the crash
    assert (b.state, b.value) == (TrialState.COMPLETE, 0.3)
    assert c.state == TrialState.FAIL and "checkpoint" in c.user_attrs["stopped"]


def test_close_fails_running_trials_only_once_the_search_is_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run-4"
    searcher = _searcher(SPEC, run_dir)
    searcher.suggest("a")
    study.close(SPEC, run_dir, stopped=None)  # no trial recorded: cut short, kept for --resume
    assert _load(run_dir).trials[0].state == TrialState.RUNNING
    study.close(SPEC, run_dir, stopped="failure budget reached: ...")
    [trial] = _load(run_dir).trials
    assert trial.state == TrialState.FAIL and "failure budget" in trial.user_attrs["stopped"]


def test_a_uri_run_keeps_its_study_in_a_local_cache_and_copies_it_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNE_SANA_HOME", str(tmp_path / "home"))
    run = (tmp_path / "bucket" / "run-5").as_uri()
    searcher, _ = build_searcher(SPEC, run)
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"val_loss": 0.5, "step": 10, "outcome": "completed"})
    local = study.journal_path(run)
    assert local.is_relative_to(tmp_path / "home")
    study.close(SPEC, run, stopped="failure budget reached")
    copied = tmp_path / "bucket" / "run-5" / study.STUDY_FILE
    assert copied.read_text() == local.read_text()

    local.unlink()  # a resume on another machine: fetched back from the run
    loaded = study.load(run)
    assert loaded is not None and loaded.trials[0].value == 0.5


# --- a real sweep -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_real_sweeps_study_matches_its_record(tmp_path: Path, local_ray: None) -> None:
    """Optuna's own API reads every trial of a real sweep: the state and value trials.parquet
    says, none RUNNING; --resume leaves the one study as it was."""
    points = [{"lr": 1e-3, "nan_from": None},  # completed
              {"lr": 0.5, "nan_from": None},  # diverged at step 5
              {"lr": 1e-3, "nan_from": "oops"},  # raises at step 1 (int >= str): error
              {"lr": 2e-5, "nan_from": None}]  # learns slowly: pruned at the first rung
    space_file = write_space(tmp_path, "opt", {
        "trial": "synthetic",
        "search": {"algorithm": "optuna", "num_samples": 8, "seed": 0, "max_concurrent": 2,
                   "points_to_evaluate": points},
        "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 3},
        "fixed": {"steps": 40, "diverge_above": 1e-2},
        "space": {"lr": {"loguniform": [1e-5, 1.0]},
                  "nan_from": {"choice": [None, "oops"]}},
    })
    assert run_cli(str(space_file), "--storage", str(tmp_path), "--name", "r",
                   "--num-cpus", "2") == 0
    run_dir = tmp_path / "r"
    rows = trials_by_id(run_dir)
    trials = _load(run_dir).trials
    assert sorted(t.user_attrs["trial_id"] for t in trials) == sorted(rows)
    expected = {"completed": TrialState.COMPLETE, "diverged": TrialState.COMPLETE,
                "pruned": TrialState.PRUNED, "error": TrialState.FAIL}
    for trial in trials:
        row = rows[trial.user_attrs["trial_id"]]
        assert trial.state == expected[row["outcome"]], (row, trial)
        assert trial.user_attrs["outcome"] == row["outcome"]
        if row["outcome"] in ("completed", "pruned"):
            assert trial.value == row["final_val_loss"]
        assert (trial.constraints.get("diverged") == 1.0) == (row["outcome"] == "diverged")
    assert {r["outcome"] for r in rows.values()} == set(expected)

    assert run_cli(str(space_file), "--storage", str(tmp_path), "--name", "r", "--resume",
                   "--num-cpus", "2") == 0
    again = _load(run_dir).trials  # still one study, every trial as it was
    assert [(t.number, t.state, t.value) for t in again] == [
        (t.number, t.state, t.value) for t in trials]


@pytest.mark.slow
def test_a_warm_started_sweep_from_the_cli(tmp_path: Path, local_ray: None) -> None:
    """The CLI: the new run's study holds the warm trials first, then its own; its record
    holds only its own trials."""
    earlier = warm_runs.earlier_run(tmp_path / "first")
    space_file = write_space(tmp_path, "warm", warm_runs.SPACE)
    assert run_cli(str(space_file), "--storage", str(tmp_path), "--name", "second",
                   "--warm-start", str(earlier), "--num-cpus", "2") == 0
    run_dir = tmp_path / "second"
    rows = trials_by_id(run_dir)
    assert len(rows) == 3
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / study.STUDY_FILE)))
    trials = optuna.load_study(study_name="second", storage=storage).trials
    warm = [t for t in trials if warm_runs.warmstart.RUN_ATTR in t.user_attrs]
    own = [t for t in trials if warm_runs.warmstart.RUN_ATTR not in t.user_attrs]
    assert len(warm) == 4 and [t.number for t in warm] == [0, 1, 2, 3]
    assert sorted(t.user_attrs["trial_id"] for t in own) == sorted(rows)
    assert all(t.state.is_finished() for t in trials)
