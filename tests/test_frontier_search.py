"""The frontier searcher's rules (bisection, seeds, the open-ended cases, k-section, resume),
first against an oracle without Ray, then in real sweeps of the synthetic trial."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.engine import run_cli, start_sweep, trials_by_id, write_space
from tune_sana.config import UserError
from tune_sana.engine.frontier import FrontierSearcher, combo_id
from tune_sana.engine.space import parse_spec
from tune_sana.record.readers import read_frontier, read_history

# (lr, seed, combo) -> diverges (at step 5), or the step it diverges at (0: before any update)
Oracle = Callable[[float, int, dict[str, Any]], "bool | int"]


def _spec(space: dict[str, Any] | None = None, **search: Any) -> Any:
    return parse_spec({
        "trial": "synthetic",
        "search": {"algorithm": "frontier", "num_samples": 500, "max_concurrent": 2, **search},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": 10},
        "space": space or {"lr": {"loguniform": [1e-5, 1.0]}},
    }, "test")


def _drive(searcher: FrontierSearcher, diverges: Oracle, slots: int,
           stop_after: int | None = None, first_id: int = 0
           ) -> list[tuple[float, int, dict[str, Any]]]:
    """Run the searcher as Tune would with ``slots`` concurrent trials, finishing the oldest
    running trial first; returns every (lr, seed, combo) in the order suggested."""
    running: list[tuple[str, dict[str, Any]]] = []
    asked: list[tuple[float, int, dict[str, Any]]] = []
    n = first_id
    while True:
        while len(running) < slots:
            config = searcher.suggest(f"t{n}")
            if config is None or config == FrontierSearcher.FINISHED:
                break
            running.append((f"t{n}", config))
            combo = {k: v for k, v in config.items() if k not in ("lr", "seed")}
            asked.append((config["lr"], config["seed"], combo))
            n += 1
        if not running or (stop_after is not None and n >= stop_after):
            return asked
        trial_id, config = running.pop(0)
        _finish(searcher, diverges, trial_id, config)


def _finish(searcher: FrontierSearcher, diverges: Oracle, trial_id: str,
            config: dict[str, Any]) -> None:
    """Tell the searcher the trial's result, as the oracle decides it."""
    combo = {k: v for k, v in config.items() if k not in ("lr", "seed")}
    verdict = diverges(config["lr"], config["seed"], combo)
    if verdict is not False:
        step = 5 if verdict is True else int(verdict)
        result = {"step": step, "outcome": "diverged", "divergence_cause": "nonfinite_loss",
                  "diverged_step": step, "nonfinite_module": "blocks.0.attn1"}
    else:
        result = {"step": 10, "outcome": "completed", "steps_run": 10}
    searcher.on_trial_complete(trial_id, {**result, "config": config})


def _row(searcher: FrontierSearcher, **combo: Any) -> dict[str, Any]:
    return next(r for r in searcher.rows() if r["combo_id"] == combo_id(combo))


def test_bisection_brackets_a_boundary_within_the_tolerance_in_every_seed() -> None:
    searcher = FrontierSearcher(_spec(), None, "val_loss", "min")
    asked = _drive(searcher, lambda lr, seed, c: lr > 3e-3, slots=1)
    row = _row(searcher)
    assert row["verdict"] == "bracketed" and searcher.finished()
    assert row["stable_lr"] <= 3e-3 < row["diverged_lr"]
    assert row["ratio"] == row["diverged_lr"] / row["stable_lr"] <= 1.25
    assert (row["stable_seeds"], row["diverged_seeds"], row["diverged_count"]) == (2, 2, 2)
    assert row["nonfinite_module"] == "blocks.0.attn1" and row["diverged_step"] == 5
    assert asked[0][:2] == (1.0, 0)  # the upper bound first
    # Bisection: 5 decades to a ratio of 1.25 takes 6 halvings of log-lr (2**-6 * 11.5 < 0.22),
    # plus the upper bound, plus the second seed at both ends.
    assert len(asked) == row["trials"] == 1 + 6 + 2
    assert row["trial_steps"] == sum(10 if lr <= 3e-3 else 5 for lr, _, _ in asked)
    assert json.loads(row["probes_json"])[0][:3] == [min(lr for lr, _, _ in asked), 0,
                                                     "completed"]


def test_a_seed_that_diverges_at_the_stable_end_moves_the_bracket_down() -> None:
    # Seed 0 survives up to 1e-2, seed 1 only up to 4e-3: the frontier is seed 1's.
    limits = {0: 1e-2, 1: 4e-3}
    searcher = FrontierSearcher(_spec(), None, "val_loss", "min")
    asked = _drive(searcher, lambda lr, seed, c: lr > limits[seed], slots=1)
    row = _row(searcher)
    assert row["verdict"] == "bracketed"
    assert row["stable_lr"] <= 4e-3 < row["diverged_lr"] and row["ratio"] <= 1.25
    assert row["stable_seeds"] == 2 and row["diverged_seeds"] == 2
    assert 1 <= row["diverged_count"] <= 2
    # Seed 1 was first run at seed 0's bracket, diverged there, and bisection went on below
    # with seed 1, the seed that broke first; seed 0 ran again only at the final ends.
    at = next(i for i, (_, seed, _) in enumerate(asked) if seed == 1)
    assert asked[at][0] > 4e-3
    after = [seed for _, seed, _ in asked[at + 1:]]
    assert after.count(1) >= 2 and after.count(0) == 2 and after[-2:] == [0, 0]


def test_stable_to_the_upper_bound_and_unstable_at_the_lower_bound() -> None:
    space = {"lr": {"loguniform": [1e-4, 1e-1]},
             "diverge_above": {"choice": [1e-6, 3e-3, 10.0]}}
    searcher = FrontierSearcher(_spec(space, frontier={"tolerance": 1.5, "seeds": 3}), None,
                                "val_loss", "min")
    _drive(searcher, lambda lr, seed, c: lr > c["diverge_above"], slots=2)
    never = _row(searcher, diverge_above=10.0)
    assert never["verdict"] == "stable_to_upper"
    assert never["stable_lr"] == 1e-1 and never["diverged_lr"] is None
    assert never["stable_seeds"] == 3 and never["trials"] == 3  # only the upper bound, 3 seeds
    always = _row(searcher, diverge_above=1e-6)
    assert always["verdict"] == "unstable_at_lower"
    assert always["diverged_lr"] == 1e-4 and always["stable_lr"] is None
    assert (always["diverged_seeds"], always["diverged_count"]) == (3, 3)
    middle = _row(searcher, diverge_above=3e-3)
    assert middle["verdict"] == "bracketed" and middle["ratio"] <= 1.5
    assert middle["label"] == "diverge_above 0.003"
    assert searcher.finished()


def test_a_divergence_before_any_update_goes_straight_to_the_lower_bound() -> None:
    searcher = FrontierSearcher(_spec(), None, "val_loss", "min")
    asked = _drive(searcher, lambda lr, seed, c: 0, slots=1)  # the base itself breaks
    row = _row(searcher)
    assert row["verdict"] == "unstable_at_lower" and row["diverged_step"] == 0
    assert [a[:2] for a in asked] == [(1.0, 0), (1e-5, 0), (1e-5, 1)]


def test_k_section_uses_every_slot_within_a_combination_and_across_them() -> None:
    searcher = FrontierSearcher(_spec(), None, "val_loss", "min")
    first = [searcher.suggest(f"t{i}") for i in range(4)]
    lrs = sorted(c["lr"] for c in first if isinstance(c, dict))
    assert len(lrs) == 4 and lrs[-1] == 1.0  # the upper bound and three distinct cuts
    logs = [math.log10(x) for x in lrs]
    assert logs[:3] == pytest.approx([-3.75, -2.5, -1.25])  # quarters of [1e-5, 1]
    two = FrontierSearcher(_spec({"lr": {"loguniform": [1e-5, 1.0]},
                                  "diverge_above": {"choice": [1e-3, 1e-2]}}), None,
                           "val_loss", "min")
    pair = [two.suggest("a"), two.suggest("b")]
    assert {c["diverge_above"] for c in pair if isinstance(c, dict)} == {1e-3, 1e-2}


def test_parallel_slots_reach_the_same_bracket() -> None:
    serial = FrontierSearcher(_spec(), None, "val_loss", "min")
    _drive(serial, lambda lr, seed, c: lr > 3e-3, slots=1)
    wide = FrontierSearcher(_spec(), None, "val_loss", "min")
    _drive(wide, lambda lr, seed, c: lr > 3e-3, slots=4)
    for row in (_row(serial), _row(wide)):
        assert row["verdict"] == "bracketed" and row["stable_lr"] <= 3e-3 < row["diverged_lr"]


def test_a_probe_that_raised_is_an_error_verdict_and_the_search_ends() -> None:
    searcher = FrontierSearcher(_spec(), None, "val_loss", "min")
    config = searcher.suggest("t0")
    assert isinstance(config, dict)
    searcher.on_trial_complete("t0", {"outcome": "error", "error": "ValueError: bad",
                                      "config": config})
    row = _row(searcher)
    assert row["verdict"] == "error" and row["error"] == "ValueError: bad"
    assert searcher.suggest("t1") == FrontierSearcher.FINISHED


def test_save_and_restore_in_the_middle_of_a_bisection(tmp_path: Path) -> None:
    def oracle(lr: float, seed: int, c: dict[str, Any]) -> bool:
        return lr > 3e-3

    whole = FrontierSearcher(_spec(), None, "val_loss", "min")
    _drive(whole, oracle, slots=1)
    first = FrontierSearcher(_spec(), None, "val_loss", "min")
    before = _drive(first, oracle, slots=1, stop_after=4)
    first.save(str(tmp_path / "state.json"))
    second = FrontierSearcher(_spec(), None, "val_loss", "min")
    second.restore(str(tmp_path / "state.json"))
    # The 4th suggestion was still running when saved: Ray resumes that trial, so the
    # restored searcher waits for its result instead of asking it again (which ran it twice).
    lr, seed, combo = before[-1]
    _finish(second, oracle, "t3", {"lr": lr, "seed": seed, **combo})
    after = _drive(second, oracle, slots=1, first_id=4)
    assert [a[:2] for a in before + after] == [a[:2] for a in
                                                   _drive(FrontierSearcher(
                                                       _spec(), None, "val_loss", "min"),
                                                       oracle, slots=1)]
    keep = ("verdict", "stable_lr", "diverged_lr", "trials", "trial_steps")
    assert {k: _row(second)[k] for k in keep} == {k: _row(whole)[k] for k in keep}


@pytest.mark.parametrize(("change", "message"), [
    ({"space": {"lr": {"loguniform": [1e-5, 1.0]}, "eps": {"loguniform": [1e-9, 1e-6]}}},
     "bisects one loguniform key"),
    ({"space": {"lr": {"loguniform": [1e-5, 1.0]}, "steps": {"int": [5, 10]}}},
     "space.steps is int"),
    ({"scheduler": {"type": "asha"}}, "set scheduler: {type: fifo}"),
    ({"search": {"algorithm": "frontier", "confirm": {"top_k": 2}}}, "drop search.confirm"),
    ({"search": {"algorithm": "optuna", "frontier": {"seeds": 3}}},
     "search.frontier applies to search.algorithm frontier"),
])
def test_spec_errors_name_the_key_and_the_fix(change: dict[str, Any], message: str) -> None:
    raw: dict[str, Any] = {"trial": "synthetic", "search": {"algorithm": "frontier"},
                           "scheduler": {"type": "fifo"},
                           "space": {"lr": {"loguniform": [1e-5, 1.0]}}, **change}
    with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_spec(raw, "f.yaml")


# --- real sweeps ---------------------------------------------------------------------------------

STEPS = 8
SPACE: dict[str, Any] = {
    "trial": "synthetic",
    "search": {"algorithm": "frontier", "num_samples": 100, "max_concurrent": 2,
               "frontier": {"tolerance": 1.5, "seeds": 2}},
    "scheduler": {"type": "fifo"},
    "fixed": {"steps": STEPS, "eval_every": STEPS, "diverge_spread": 0.2},
    "space": {"lr": {"loguniform": [1e-4, 1.0]},
              "diverge_above": {"choice": [1e-6, 3e-3, 100.0]}},
}


def _expected_limit(seed: int, diverge_above: float = 3e-3) -> float:
    """The synthetic trial's lr limit for a seed (trials/synthetic.py)."""
    import random

    return diverge_above * 10 ** (0.2 * random.Random(f"diverge-{seed}").uniform(-1.0, 1.0))


def _check_record(run_dir: Path) -> None:
    frontier = {r["label"]: r for r in read_frontier(run_dir).to_pylist()}  # type: ignore[union-attr]
    assert frontier["diverge_above 1e-06"]["verdict"] == "unstable_at_lower"
    assert frontier["diverge_above 100.0"]["verdict"] == "stable_to_upper"
    middle = frontier["diverge_above 0.003"]
    limit = min(_expected_limit(0), _expected_limit(1))
    assert middle["verdict"] == "bracketed"
    assert middle["stable_lr"] <= limit < middle["diverged_lr"] <= 1.5 * middle["stable_lr"]
    trials = list(trials_by_id(run_dir).values())
    assert {t["stage"] for t in trials} == {"frontier"}
    assert sum(r["trials"] for r in frontier.values()) == len(trials)
    for row in frontier.values():
        mine = [t for t in trials if t["combo_id"] == row["combo_id"]]
        assert len(mine) == row["trials"]
        assert sum(t["steps_run"] for t in mine) == row["trial_steps"]
    pairs = [(h["trial_id"], h["step"]) for h in
             read_history(run_dir, ["trial_id", "step"]).to_pylist()]
    assert len(pairs) == len(set(pairs)), "a step was recorded twice"


@pytest.mark.slow  # a real frontier sweep: ~25 trials on a local Ray
@pytest.mark.usefixtures("local_ray")
def test_frontier_sweep_writes_frontier_parquet_and_tags_its_trials(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space_file = write_space(tmp_path, "front", SPACE)
    assert run_cli(str(space_file), "--storage", str(tmp_path), "--name", "f") == 0
    _check_record(tmp_path / "f")
    err = capsys.readouterr().err
    assert "frontier: 3 combinations: " in err
    assert all(v in err for v in ("1 bracketed", "1 stable to upper", "1 unstable at lower"))


@pytest.mark.slow  # a real sweep, killed and resumed in subprocesses
def test_sigkill_in_the_middle_of_a_bisection_then_resume(tmp_path: Path) -> None:
    slow = {**SPACE, "fixed": {**SPACE["fixed"], "step_seconds": 0.15}}
    space_file = write_space(tmp_path, "front", slow)
    run_dir = tmp_path / "k"

    driver = start_sweep(space_file, tmp_path)
    deadline = time.monotonic() + 240
    while True:  # kill it once some probes are recorded and the bisection is not done
        table = read_frontier(run_dir) if (run_dir / "frontier.parquet").is_file() else None
        if table is not None and sum(table.column("trials").to_pylist()) >= 5:
            break
        assert driver.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    assert "searching" in table.column("verdict").to_pylist()
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    resumed = start_sweep(space_file, tmp_path, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    _check_record(run_dir)
