"""Synthetic sweeps with known answers, written through the real ResultsWriter.

``write_small_sweep`` writes 12 finished trials (+ optionally one still running) whose
stability counts, best config and divergence causes are worked out by hand in the tests;
``write_confirmed_sweep`` adds a confirm stage (2 fresh seeds for each of the top 3
configurations) whose means, standard errors and winner are worked out by hand too. Every
trial has the record's step-0 row (the untouched base: val and retain loss) before its updates
1..N, and the summary's base, improvement, retain, stage and config_id columns.
``large_sweep`` / ``write_large_parquet`` make a big random sweep (for bench/report_speed.py)
as numpy columns and write it with the results module's table builders, in part files of
``flush_rows`` rows as the writer flushes.

Like the engine, a trial's config holds only the searched keys (Ray's ``trial.config``); the
fixed settings are in sweep.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from tune_sana.outcomes import Stage
from tune_sana.record.atomic import write_atomic
from tune_sana.record.compaction import compact_trials
from tune_sana.record.schema import (
    HISTORY_DIR,
    HISTORY_SCHEMA,
    SPEC_FILE,
    TRIALS_FILE,
    file_metadata,
)
from tune_sana.record.writer import ResultsWriter, trial_row, trials_table

FIXED = {"model": "demo-base", "data": "builtin:shapes", "steps": 100, "batch_size": 8,
         "eval_every": 10, "device": "cpu"}
SPACE = {"lr": {"loguniform": [1.0e-5, 1.0e-1]},
         "precision": {"choice": ["fp32", "bf16-amp", "fp16-amp", "fp16"]},
         "variant": {"choice": ["fp16", "bf16"]},
         "warmup_steps": {"choice": [0, 20]},
         "max_grad_norm": {"choice": [None, 1.0]}}
EVAL_EVERY = 10


def spec_yaml(fixed: dict[str, Any] | None = None, space: dict[str, Any] | None = None,
              search: dict[str, Any] | None = None) -> str:
    spec: dict[str, Any] = {"trial": "sana_finetune", "metric": "val_loss", "mode": "min",
                            "fixed": FIXED if fixed is None else fixed,
                            "space": SPACE if space is None else space}
    if search is not None:
        spec["search"] = search
    return yaml.safe_dump(spec, sort_keys=False)


@dataclass(frozen=True)
class Synth:
    """One synthetic trial. ``val`` is the final (= best) validation loss of a finite trial;
    ``base`` / ``base_retain`` the untouched base's validation / retain loss (its step-0 row);
    ``steps`` the updates attempted. ``stage`` / ``config_id``: a confirm replica shares the
    config_id of the search trial it repeats (a search trial's config_id is its trial id
    unless given) and differs from it in ``seed`` only."""

    trial_id: str
    precision: str
    variant: str
    lr: float
    warmup_steps: int
    max_grad_norm: float | None
    outcome: str
    val: float | None = None
    steps: int = 100
    cause: str | None = None
    module: str | None = None
    diverged_step: int | None = None
    base: float = 1.0
    base_retain: float = 0.5
    stage: str = Stage.SEARCH.value
    config_id: str | None = None
    seed: int | None = None
    damaged: bool | None = None  # damaged_at_load (None: no load check recorded)
    native_base: float | None = None  # native_base_val_loss

    @property
    def config(self) -> dict[str, Any]:
        config = {"lr": self.lr, "precision": self.precision, "variant": self.variant,
                  "warmup_steps": self.warmup_steps, "max_grad_norm": self.max_grad_norm}
        return config if self.seed is None else {**config, "seed": self.seed}

    @property
    def cid(self) -> str:
        return self.config_id or self.trial_id


def replica(of: Synth, trial_id: str, seed: int, val: float | None,
            outcome: str = "completed", **changes: Any) -> Synth:
    """A confirm-stage replica of search trial ``of``: the same config and config_id, another
    seed and its own result (a diverged replica needs ``diverged_step`` and ``cause``)."""
    result: dict[str, Any] = {"cause": None, "module": None, "diverged_step": None,
                              "steps": of.steps, **changes}
    if "steps" not in changes and result["diverged_step"] is not None:
        result["steps"] = result["diverged_step"]
    return replace(of, trial_id=trial_id, seed=seed, val=val, outcome=outcome,
                   stage=Stage.CONFIRM.value, config_id=of.cid, **result)


ATTN = "transformer_blocks.0.attn1"
FF = "transformer_blocks.1.ff"

# Known answers (asserted in tests/test_report.py and tests/test_best.py):
#   best completed: t01 (0.20); t12 is running with 0.28 in its history. Base 1.0 everywhere.
SMALL = [
    Synth("t00", "fp32", "bf16", 3e-5, 0, None, "completed", 0.30),
    Synth("t01", "fp32", "bf16", 3e-4, 20, 1.0, "completed", 0.20),
    Synth("t02", "fp32", "fp16", 3e-3, 0, None, "diverged", steps=60, cause="loss_spike",
          diverged_step=60),
    Synth("t03", "bf16-amp", "bf16", 2e-4, 20, None, "completed", 0.25),
    Synth("t04", "bf16-amp", "fp16", 5e-4, 0, 1.0, "pruned", 0.40, steps=40),
    Synth("t05", "bf16-amp", "bf16", 2e-2, 0, None, "diverged", steps=20,
          cause="nonfinite_grad", module=ATTN, diverged_step=20),
    Synth("t06", "fp16-amp", "fp16", 1e-4, 20, 1.0, "completed", 0.22),
    Synth("t07", "fp16-amp", "fp16", 4e-3, 0, None, "diverged", steps=30,
          cause="nonfinite_loss", module=ATTN, diverged_step=30),
    Synth("t08", "fp16", "fp16", 1e-5, 0, None, "diverged", steps=10, cause="nonfinite_params",
          diverged_step=10),
    Synth("t09", "fp16", "fp16", 5e-4, 20, 1.0, "diverged", steps=40, cause="nonfinite_grad",
          module=FF, diverged_step=40),
    Synth("t10", "fp16-amp", "bf16", 6e-5, 0, None, "error", steps=5),
    Synth("t11", "bf16-amp", "bf16", 1e-4, 20, None, "pruned", 0.35, steps=40),
]
# A second sweep for side-by-side reports: u00 shares the (fp32, bf16, 1e-4) cell with t01.
SECOND = [
    Synth("u00", "fp32", "bf16", 2e-4, 0, None, "completed", 0.18),
    Synth("u01", "fp16", "bf16", 2e-4, 0, None, "diverged", steps=15, cause="nonfinite_loss",
          module=ATTN, diverged_step=15),
    Synth("u02", "bf16-amp", "bf16", 3e-3, 20, 1.0, "completed", 0.27),
    Synth("u03", "fp16-amp", "bf16", 5e-5, 0, None, "pruned", 0.45, steps=40),
]
RUNNING = Synth("t12", "fp32", "fp16", 1e-4, 0, None, "running", 0.28, steps=50)
# SMALL followed by a confirm stage (top 3 configurations, 2 fresh seeds each). Known answers:
#   t01: 0.208, 0.212 -> mean 0.21, SE 0.002 (the search's own 0.20 is biased low): the best;
#   t06: 0.236, 0.240 -> mean 0.238, SE 0.002: told apart from t01 (0.028 > 2 * 0.00283);
#   t03: one seed diverged, one 0.205: lower, but disqualified.
CONFIRM_SEARCH = {"confirm": {"top_k": 3, "seeds": 2}}
CONFIRMED = [
    *SMALL,
    replica(SMALL[1], "t13", 101, 0.208), replica(SMALL[1], "t14", 102, 0.212),
    replica(SMALL[6], "t15", 101, 0.236), replica(SMALL[6], "t16", 102, 0.240),
    replica(SMALL[3], "t17", 101, None, "diverged", diverged_step=50, cause="loss_spike"),
    replica(SMALL[3], "t18", 102, 0.205),
]


def val_curve(t: Synth) -> list[tuple[int, float]]:
    """(step, val loss) at every evaluation after the base's (step 0 is ``t.base``). Finite
    trials fall from the base to exactly ``t.val`` at their last update; diverged ones dip
    then rise until the update before they diverge; collapsed ones dip, then rise past 2 x base
    at their last two evaluations (the last one at ``diverged_step``)."""
    last = t.steps
    if t.outcome == "collapsed":
        assert t.diverged_step is not None
        d = t.diverged_step
        return [(s, t.base * (0.8 + 3.0 * (s / d) ** 2))
                for s in range(EVAL_EVERY, d + 1, EVAL_EVERY)]  # d: a multiple of EVAL_EVERY
    if t.outcome == "diverged":
        assert t.diverged_step is not None
        d = t.diverged_step
        return [(s, t.base - 0.4 * (s / d) + 0.6 * (s / d) ** 4)
                for s in range(EVAL_EVERY, d, EVAL_EVERY)]
    if t.outcome == "error" or t.val is None:
        return []
    steps = sorted({*range(EVAL_EVERY, last, EVAL_EVERY), last})
    fall = 1.0 - math.exp(-last / 30)
    return [(s, t.val + (t.base - t.val) * (math.exp(-s / 30) - math.exp(-last / 30)) / fall)
            for s in steps]


def retain_curve(t: Synth) -> dict[int, float]:
    """Retain loss at every evaluation: the base's at step 0, rising with lr (forgetting)."""
    return {0: t.base_retain, **{s: t.base_retain * (1 + 100 * t.lr * s / max(t.steps, 1))
                                 for s, _ in val_curve(t)}}


def _history_rows(t: Synth) -> list[dict[str, Any]]:
    vals = {0: t.base, **dict(val_curve(t))}
    retain = retain_curve(t)
    rows = []
    for s in range(t.steps + 1):
        diverging = t.outcome == "diverged" and s == t.diverged_step
        rows.append({"step": s,
                     "train_loss": None if s == 0 else math.nan if diverging
                     else 1.0 / (1 + 0.05 * s),
                     "val_loss": vals.get(s), "retain_loss": retain.get(s),
                     "grad_norm": None if s == 0 else math.inf if diverging else 1.0,
                     "lr": t.lr, "loss_scale": None, "skipped": False, "step_time_s": 0.1,
                     "timestamp": 1000.0 + 0.1 * s})
    return rows


def _summary(t: Synth) -> dict[str, Any]:
    vals = [v for _, v in val_curve(t)]
    best = min(vals) if vals else None
    finished = vals and t.outcome != "diverged"  # a collapsed trial's last val is finite
    return {"outcome": t.outcome, "divergence_cause": t.cause, "diverged_step": t.diverged_step,
            "nonfinite_at": "forward" if t.outcome == "diverged" and t.cause else None,
            "nonfinite_module": t.module, "best_val_loss": best,
            "final_val_loss": vals[-1] if finished else None,
            "base_val_loss": t.base, "improvement": None if best is None else 1 - best / t.base,
            "base_retain_loss": t.base_retain,
            "final_retain_loss": retain_curve(t)[t.steps] if finished else None,
            "steps_run": t.steps, "wall_time_s": 0.1 * t.steps,
            "error": "RuntimeError: synthetic" if t.outcome == "error" else None,
            "stage": t.stage, "config_id": t.cid,
            "damaged_at_load": t.damaged, "native_base_val_loss": t.native_base}


def write_sweep(run_dir: Path, trials: Sequence[Synth], running: Sequence[Synth] = (),
                fixed: dict[str, Any] | None = None, space: dict[str, Any] | None = None,
                flush_rows: int = 150, finish: bool = True,
                search: dict[str, Any] | None = None) -> Path:
    """Write ``trials`` (finished) and ``running`` (history only) through ResultsWriter;
    ``search`` is the spec's ``search:`` block (e.g. CONFIRM_SEARCH)."""
    text = spec_yaml(fixed, space, search)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC_FILE).write_text(text)
    writer = ResultsWriter(run_dir, text, flush_rows=flush_rows, flush_seconds=1e9)
    for t in [*trials, *running]:
        for row in _history_rows(t):
            writer.add_step(t.trial_id, row)
        if finish and t.outcome != "running":
            writer.finish_trial(t.trial_id, t.config, _summary(t))
    writer.flush()
    compact_trials(run_dir)  # as a sweep's end leaves trials.parquet; history parts kept
    return run_dir


def write_small_sweep(run_dir: Path, with_running: bool = False) -> Path:
    return write_sweep(run_dir, SMALL, [RUNNING] if with_running else [])


def write_confirmed_sweep(run_dir: Path) -> Path:
    """SMALL, then a confirm stage (CONFIRMED)."""
    return write_sweep(run_dir, CONFIRMED, search=CONFIRM_SEARCH)


# --- a large random sweep (for the benchmark) -------------------------------------------------

PRECISIONS = ["fp32", "bf16-amp", "fp16-amp", "fp16", "bf16"]
CAUSES = ["nonfinite_loss", "nonfinite_grad", "nonfinite_params", "loss_spike"]
MODULES = [None, "transformer_blocks.0.attn1", "transformer_blocks.1.attn1",
           "transformer_blocks.1.ff", "proj_out"]


BASE_VAL, BASE_RETAIN = 1.0, 0.5


@dataclass
class LargeSweep:
    """Columns of a random sweep: one entry per trial in ``trials``; ``history`` is a
    HISTORY_SCHEMA table (trial after trial, step order)."""

    configs: list[dict[str, Any]]
    summaries: list[dict[str, Any]]
    trial_ids: list[str]
    history: pa.Table


def large_sweep(n_trials: int = 1000, n_steps: int = 1000, eval_every: int = 10,
                seed: int = 0) -> LargeSweep:
    """Random configs; a trial diverges with a probability rising with lr (more under fp16),
    a quarter of the finite ones are pruned at n_steps // 4; every trial starts with its
    step-0 base row (val BASE_VAL, retain BASE_RETAIN); curves are vectorised numpy."""
    rng = np.random.default_rng(seed)
    lr = 10 ** rng.uniform(-5, -1, n_trials)
    precision = rng.choice(PRECISIONS, n_trials)
    warmup = rng.choice([0, 20, 100], n_trials)
    clip = rng.choice([np.nan, 1.0], n_trials)
    risk = np.clip((np.log10(lr) + 4) / 3, 0, 1) + np.where(precision == "fp16", 0.4, 0.0)
    diverged = rng.uniform(0, 1, n_trials) < risk * 0.8
    pruned = ~diverged & (rng.uniform(0, 1, n_trials) < 0.25)
    div_step = rng.integers(5, n_steps - 1, n_trials)
    steps_run = np.where(diverged, div_step, np.where(pruned, n_steps // 4, n_steps))
    final = 0.15 + 0.1 * np.abs(np.log10(lr) + 3.5) + rng.uniform(0, 0.05, n_trials)
    ids = [f"trial_{i:05d}" for i in range(n_trials)]

    # rows: step 0 (the base, before any update), then updates 1..steps_run
    trial_index = np.repeat(np.arange(n_trials), steps_run + 1)
    starts = np.concatenate([[0], np.cumsum(steps_run + 1)[:-1]])
    step = np.arange(trial_index.size) - np.repeat(starts, steps_run + 1)
    f = final[trial_index]
    val = f + (BASE_VAL - f) * np.exp(-step / (n_steps / 5))
    last_row = step == steps_run[trial_index]
    is_eval = (step % eval_every == 0) | last_row
    bad = last_row & diverged[trial_index]
    val = np.where(is_eval & ~bad, val, np.nan)
    retain = np.where(np.isnan(val), np.nan,
                      BASE_RETAIN * (1 + 10 * lr[trial_index] * step / n_steps))
    base_row = step == 0
    train = np.where(bad | base_row, np.nan, 1.0 / (1 + 0.01 * step) + 0.1)
    history = pa.table({
        "trial_id": pa.array(np.asarray(ids, dtype=object)[trial_index], pa.string()),
        "step": pa.array(step, pa.int64()),
        "train_loss": pa.array(train, pa.float64(), from_pandas=True),
        "val_loss": pa.array(val, pa.float64(), from_pandas=True),
        "retain_loss": pa.array(retain, pa.float64(), from_pandas=True),
        "grad_norm": pa.array(np.where(bad | base_row, np.nan, 1.0), pa.float64(),
                              from_pandas=True),
        "lr": pa.array(lr[trial_index], pa.float64()),
        "loss_scale": pa.nulls(step.size, pa.float64()),
        "skipped": pa.array(np.zeros(step.size, bool)),
        "step_time_s": pa.array(np.full(step.size, 0.05)),
        "timestamp": pa.array(1.7e9 + step * 0.05 + trial_index * 100.0),
    }, schema=HISTORY_SCHEMA)

    best = np.fmin.reduceat(np.where(np.isnan(val) | base_row, np.inf, val), starts)
    ends = starts + steps_run
    configs, summaries = [], []
    for i in range(n_trials):  # per trial (1,000), not per history row
        configs.append({"lr": float(lr[i]), "precision": str(precision[i]),
                        "warmup_steps": int(warmup[i]),
                        "max_grad_norm": None if np.isnan(clip[i]) else float(clip[i])})
        outcome = "diverged" if diverged[i] else "pruned" if pruned[i] else "completed"
        found = bool(np.isfinite(best[i]))
        summaries.append({
            "outcome": outcome,
            "divergence_cause": CAUSES[i % len(CAUSES)] if diverged[i] else None,
            "diverged_step": int(div_step[i]) if diverged[i] else None,
            "nonfinite_module": MODULES[i % len(MODULES)] if diverged[i] else None,
            "best_val_loss": float(best[i]) if found else None,
            "base_val_loss": BASE_VAL,
            "improvement": 1 - float(best[i]) / BASE_VAL if found else None,
            "base_retain_loss": BASE_RETAIN,
            "final_retain_loss": None if diverged[i] else float(retain[ends[i]]),
            "steps_run": int(steps_run[i]), "wall_time_s": float(steps_run[i]) * 0.05,
            "stage": "search", "config_id": ids[i]})
    return LargeSweep(configs, summaries, ids, history)


def write_large_parquet(run_dir: Path, sweep: LargeSweep, flush_rows: int = 2000) -> int:
    """Our record of ``sweep``: history in parts of ``flush_rows`` rows, then trials.parquet.
    Returns the number of history part files."""
    space = {"lr": {"loguniform": [1e-5, 1e-1]}, "precision": {"choice": PRECISIONS},
             "warmup_steps": {"choice": [0, 20, 100]}, "max_grad_norm": {"choice": [None, 1.0]}}
    fixed = {**FIXED, "steps": int(sweep.history["step"].to_numpy().max())}
    text = spec_yaml(fixed, space)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC_FILE).write_text(text)
    meta = file_metadata(text)
    hist = sweep.history.replace_schema_metadata(meta)
    parts = 0
    for offset in range(0, hist.num_rows, flush_rows):
        parts += 1
        write_atomic(hist.slice(offset, flush_rows),
                     run_dir / HISTORY_DIR / f"part-{parts:013d}-synthetic.parquet")
    rows = [trial_row(tid, cfg, summary) for tid, cfg, summary
            in zip(sweep.trial_ids, sweep.configs, sweep.summaries, strict=True)]
    write_atomic(trials_table(rows, meta), run_dir / TRIALS_FILE)
    return parts
