"""The failure budget (engine/budget.py, search.max_diverged): the rule, the key, the stopper,
and a real sweep over a space that diverges everywhere, stopped early with its record kept."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.stopper import Stopper

from tests.engine import run_cli, trials_by_id, write_space
from tune_sana.config import UserError
from tune_sana.engine import space
from tune_sana.engine.budget import (
    EXIT_STATUS,
    MIN_FINISHED,
    STOP_FILE,
    FailureBudget,
    failure_budget,
    reached,
    stop_note,
)
from tune_sana.engine.study import STUDY_FILE
from tune_sana.record.writer import ResultsWriter


def _spec(**search: Any) -> space.SweepSpec:
    return space.parse_spec({"trial": "synthetic", "space": {"lr": {"loguniform": [1e-5, 1.0]}},
                             "search": search}, "s.yaml")


def test_a_count_is_reached_at_that_many_divergences() -> None:
    assert not reached(3, diverged=2, finished=2)
    assert reached(3, diverged=3, finished=3)
    assert reached(1, diverged=1, finished=1)  # the first divergence


def test_a_fraction_applies_from_the_minimum_of_finished_trials_on() -> None:
    assert MIN_FINISHED == 5
    assert not reached(0.8, diverged=4, finished=4)  # all diverged, but too few yet
    assert reached(0.8, diverged=4, finished=5)
    assert not reached(0.8, diverged=7, finished=9)  # 0.78
    assert reached(0.5, diverged=5, finished=10)  # a share reached, not exceeded


@pytest.mark.parametrize("value", [0, -1, 1.5, 2.5, True, "half"])
def test_the_key_takes_a_whole_count_or_a_fraction(value: Any) -> None:
    with pytest.raises(UserError) as err:
        _spec(max_diverged=value)
    message = str(err.value)
    assert message.startswith("s.yaml: key 'search.max_diverged': ") and "\n" not in message


def test_a_count_stays_a_count_and_the_default_is_off(tmp_path: Path) -> None:
    assert _spec().search.max_diverged is None and failure_budget(_spec(), tmp_path) is None
    count = _spec(max_diverged=3.0).search.max_diverged
    assert count == 3 and type(count) is int
    assert "max_diverged: 3\n" in _spec(max_diverged=3).to_yaml()
    assert _spec(max_diverged=0.8).search.max_diverged == 0.8


@dataclass
class _Trial:
    """What the budget reads of a Ray trial."""

    trial_id: str
    last_result: dict[str, Any] = field(default_factory=dict)


def _trial(trial_id: str, outcome: str | None) -> _Trial:
    return _Trial(trial_id, {"step": 5, **({"outcome": outcome} if outcome else {})})


def test_the_budget_counts_finished_trials_and_stops_the_sweep_once(tmp_path: Path) -> None:
    stream = io.StringIO()
    budget = FailureBudget(str(tmp_path), 0.8, "search", stream=stream)
    assert isinstance(budget, Stopper)
    budget.setup()
    for i, outcome in enumerate(["diverged", "diverged", None, "diverged"]):
        budget.on_trial_complete(0, [], _trial(f"t{i}", outcome))
    assert (budget.finished, budget.diverged) == (4, 3) and not budget.stop_all()
    budget.on_trial_complete(0, [], _trial("t3", "diverged"))  # the same trial again: once
    budget.on_trial_error(0, [], _trial("t4", None))
    assert not budget.stop_all()  # 3 of 5
    for i in range(5, 10):
        budget.on_trial_complete(0, [], _trial(f"t{i}", "diverged"))
    assert not budget("t9", {"outcome": "diverged"})  # never stops one trial
    assert budget.stop_all() and budget.stop_all()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "8 of 10 finished trials diverged" in lines[0]
    assert stop_note(tmp_path) == lines[0].removeprefix("tune-sana: ")


def test_a_pickled_budget_recounts_the_record_at_setup(tmp_path: Path) -> None:
    writer = ResultsWriter(tmp_path, "")
    for i, outcome in enumerate(["diverged", "diverged", "completed"]):
        writer.finish_trial(f"t{i}", {"lr": 0.1}, {"outcome": outcome, "stage": "search"})
    writer.finish_trial("c0", {"lr": 0.1}, {"outcome": "diverged", "stage": "confirm"})
    writer.flush()
    budget = FailureBudget(str(tmp_path), 3, "search")
    budget.on_trial_complete(0, [], _trial("x", "diverged"))
    restored = pickle.loads(pickle.dumps(budget))  # as Ray keeps it in tuner.pkl
    assert restored.limit == 3 and restored.finished == 0
    restored.setup()
    assert (restored.finished, restored.diverged) == (3, 2)  # the search stage only
    restored.on_trial_complete(0, [], _trial("t1", "diverged"))  # recorded already
    assert not restored.stop_all()
    restored.on_trial_complete(0, [], _trial("t9", "diverged"))
    assert restored.stop_all()


# --- a real sweep -----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_sweep_over_an_unstable_space_stops_on_its_budget(
        tmp_path: Path, local_ray: None, capsys: pytest.CaptureFixture[str]) -> None:
    """lr bounds typed 1000x too large (synthetic diverges above 1e-2): after 5 finished trials
    the sweep stops with one line, exit status 3, its record kept, no confirm stage, and no
    Optuna trial left RUNNING; a resume stops again at once."""
    space_file = write_space(tmp_path, "wrong", {
        "trial": "synthetic",
        "search": {"algorithm": "optuna", "num_samples": 20, "seed": 0, "max_concurrent": 2,
                   "max_diverged": 0.8, "confirm": {"top_k": 1, "seeds": 1}},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": 40, "diverge_above": 1e-2},
        "space": {"lr": {"loguniform": [1.0, 1000.0]}},
    })
    args = (str(space_file), "--storage", str(tmp_path), "--name", "w", "--num-cpus", "2")
    assert run_cli(*args) == EXIT_STATUS
    err = capsys.readouterr().err
    assert err.count("failure budget reached: ") == 1
    assert "sweep stopped by its failure budget: " in err and "sweep done" not in err
    assert "confirm" not in err and "Failed to fetch metrics" not in err

    run_dir = tmp_path / "w"
    rows = trials_by_id(run_dir)
    assert MIN_FINISHED <= len(rows) < 20
    assert {r["outcome"] for r in rows.values()} == {"diverged"}
    assert f"{len(rows)} of {len(rows)} finished trials diverged" in str(stop_note(run_dir))
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(run_dir / STUDY_FILE)))
    trials = optuna.load_study(study_name="w", storage=storage).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == len(rows)

    assert run_cli(*args, "--resume") == EXIT_STATUS
    assert trials_by_id(run_dir) == rows  # nothing re-run, nothing lost
    assert (run_dir / STOP_FILE).is_file()
