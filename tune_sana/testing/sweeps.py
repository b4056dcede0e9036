"""Synthetic sweeps with known answers, written through the real ResultsWriter.

``write_small_sweep`` writes 12 finished trials (+ optionally one still running) whose
stability counts, best config and divergence causes are worked out by hand in the tests.
``large_sweep`` / ``write_large_parquet`` make a big random sweep (for bench/report_speed.py)
as numpy columns and write it with the results module's table builders, in part files of
``flush_rows`` rows as the writer flushes.

Like the engine, a trial's config holds only the searched keys (Ray's ``trial.config``); the
fixed settings are in sweep.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from tune_sana.record.schema import (
    HISTORY_DIR,
    HISTORY_SCHEMA,
    SPEC_FILE,
    TRIALS_FILE,
    file_metadata,
)
from tune_sana.record.writer import ResultsWriter, trial_row, trials_table, write_atomic

FIXED = {"model": "demo-base", "data": "builtin:shapes", "steps": 100, "batch_size": 8,
         "eval_every": 10, "device": "cpu"}
SPACE = {"lr": {"loguniform": [1.0e-5, 1.0e-1]},
         "precision": {"choice": ["fp32", "bf16-amp", "fp16-amp", "fp16"]},
         "variant": {"choice": ["fp16", "bf16"]},
         "warmup_steps": {"choice": [0, 20]},
         "max_grad_norm": {"choice": [None, 1.0]}}
EVAL_EVERY = 10


def spec_yaml(fixed: dict[str, Any] | None = None, space: dict[str, Any] | None = None) -> str:
    spec = {"trial": "sana_finetune", "metric": "val_loss", "mode": "min",
            "fixed": FIXED if fixed is None else fixed,
            "space": SPACE if space is None else space}
    return yaml.safe_dump(spec, sort_keys=False)


@dataclass(frozen=True)
class Synth:
    """One synthetic trial. ``val`` is the final (= best) validation loss of a finite trial."""

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

    @property
    def config(self) -> dict[str, Any]:
        return {"lr": self.lr, "precision": self.precision, "variant": self.variant,
                "warmup_steps": self.warmup_steps, "max_grad_norm": self.max_grad_norm}


ATTN = "transformer_blocks.0.attn1"
FF = "transformer_blocks.1.ff"

# Known answers (asserted in tests/test_report.py and tests/test_best.py):
#   best completed: t01 (0.20); t12 is running with 0.28 in its history.
SMALL = [
    Synth("t00", "fp32", "bf16", 3e-5, 0, None, "completed", 0.30),
    Synth("t01", "fp32", "bf16", 3e-4, 20, 1.0, "completed", 0.20),
    Synth("t02", "fp32", "fp16", 3e-3, 0, None, "diverged", steps=61, cause="loss_spike",
          diverged_step=60),
    Synth("t03", "bf16-amp", "bf16", 2e-4, 20, None, "completed", 0.25),
    Synth("t04", "bf16-amp", "fp16", 5e-4, 0, 1.0, "pruned", 0.40, steps=40),
    Synth("t05", "bf16-amp", "bf16", 2e-2, 0, None, "diverged", steps=21,
          cause="nonfinite_grad", module=ATTN, diverged_step=20),
    Synth("t06", "fp16-amp", "fp16", 1e-4, 20, 1.0, "completed", 0.22),
    Synth("t07", "fp16-amp", "fp16", 4e-3, 0, None, "diverged", steps=31,
          cause="nonfinite_loss", module=ATTN, diverged_step=30),
    Synth("t08", "fp16", "fp16", 1e-5, 0, None, "diverged", steps=11, cause="nonfinite_params",
          diverged_step=10),
    Synth("t09", "fp16", "fp16", 5e-4, 20, 1.0, "diverged", steps=41, cause="nonfinite_grad",
          module=FF, diverged_step=40),
    Synth("t10", "fp16-amp", "bf16", 6e-5, 0, None, "error", steps=5),
    Synth("t11", "bf16-amp", "bf16", 1e-4, 20, None, "pruned", 0.35, steps=40),
]
# A second sweep for side-by-side reports: u00 shares the (fp32, bf16, 1e-4) cell with t01.
SECOND = [
    Synth("u00", "fp32", "bf16", 2e-4, 0, None, "completed", 0.18),
    Synth("u01", "fp16", "bf16", 2e-4, 0, None, "diverged", steps=16, cause="nonfinite_loss",
          module=ATTN, diverged_step=15),
    Synth("u02", "bf16-amp", "bf16", 3e-3, 20, 1.0, "completed", 0.27),
    Synth("u03", "fp16-amp", "bf16", 5e-5, 0, None, "pruned", 0.45, steps=40),
]
RUNNING = Synth("t12", "fp32", "fp16", 1e-4, 0, None, "running", 0.28, steps=50)


def val_curve(t: Synth) -> list[tuple[int, float]]:
    """(step, val loss) at every evaluation. Finite trials fall to exactly ``t.val`` at their
    last evaluation; diverged ones dip then rise until the step before they diverge."""
    last = t.steps - 1
    if t.outcome == "diverged":
        assert t.diverged_step is not None
        d = t.diverged_step
        steps = [s for s in range(EVAL_EVERY - 1, d, EVAL_EVERY)]
        return [(s, 1.0 - 0.4 * (s / d) + 0.6 * (s / d) ** 4) for s in steps]
    if t.outcome == "error" or t.val is None:
        return []
    steps = [s for s in range(EVAL_EVERY - 1, last, EVAL_EVERY)] + [last]
    steps = sorted(set(steps))
    return [(s, t.val + (1.0 - t.val) * (math.exp(-s / 30) - math.exp(-last / 30)))
            for s in steps]


def _history_rows(t: Synth) -> list[dict[str, Any]]:
    vals = dict(val_curve(t))
    rows = []
    for s in range(t.steps):
        diverging = t.outcome == "diverged" and s == t.diverged_step
        rows.append({"step": s,
                     "train_loss": math.nan if diverging else 1.0 / (1 + 0.05 * s),
                     "val_loss": vals.get(s), "grad_norm": math.inf if diverging else 1.0,
                     "lr": t.lr, "loss_scale": None, "skipped": False, "step_time_s": 0.1,
                     "timestamp": 1000.0 + 0.1 * s})
    return rows


def _summary(t: Synth) -> dict[str, Any]:
    vals = [v for _, v in val_curve(t)]
    return {"outcome": t.outcome, "divergence_cause": t.cause, "diverged_step": t.diverged_step,
            "nonfinite_at": None if t.cause is None else "forward",
            "nonfinite_module": t.module, "best_val_loss": min(vals) if vals else None,
            "final_val_loss": vals[-1] if vals and t.outcome != "diverged" else None,
            "steps_run": t.steps, "wall_time_s": 0.1 * t.steps,
            "error": "RuntimeError: synthetic" if t.outcome == "error" else None}


def write_sweep(run_dir: Path, trials: Sequence[Synth], running: Sequence[Synth] = (),
                fixed: dict[str, Any] | None = None, space: dict[str, Any] | None = None,
                flush_rows: int = 150, finish: bool = True) -> Path:
    """Write ``trials`` (finished) and ``running`` (history only) through ResultsWriter."""
    text = spec_yaml(fixed, space)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC_FILE).write_text(text)
    writer = ResultsWriter(run_dir, text, flush_rows=flush_rows, flush_seconds=1e9)
    for t in [*trials, *running]:
        for row in _history_rows(t):
            writer.add_step(t.trial_id, row)
        if finish and t.outcome != "running":
            writer.finish_trial(t.trial_id, t.config, _summary(t))
    writer.flush()
    return run_dir


def write_small_sweep(run_dir: Path, with_running: bool = False) -> Path:
    return write_sweep(run_dir, SMALL, [RUNNING] if with_running else [])


# --- a large random sweep (for the benchmark) -------------------------------------------------

PRECISIONS = ["fp32", "bf16-amp", "fp16-amp", "fp16", "bf16"]
CAUSES = ["nonfinite_loss", "nonfinite_grad", "nonfinite_params", "loss_spike"]
MODULES = [None, "transformer_blocks.0.attn1", "transformer_blocks.1.attn1",
           "transformer_blocks.1.ff", "proj_out"]


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
    a quarter of the finite ones are pruned at n_steps // 4; curves are vectorised numpy."""
    rng = np.random.default_rng(seed)
    lr = 10 ** rng.uniform(-5, -1, n_trials)
    precision = rng.choice(PRECISIONS, n_trials)
    warmup = rng.choice([0, 20, 100], n_trials)
    clip = rng.choice([np.nan, 1.0], n_trials)
    risk = np.clip((np.log10(lr) + 4) / 3, 0, 1) + np.where(precision == "fp16", 0.4, 0.0)
    diverged = rng.uniform(0, 1, n_trials) < risk * 0.8
    pruned = ~diverged & (rng.uniform(0, 1, n_trials) < 0.25)
    div_step = rng.integers(5, n_steps - 1, n_trials)
    steps_run = np.where(diverged, div_step + 1, np.where(pruned, n_steps // 4, n_steps))
    final = 0.15 + 0.1 * np.abs(np.log10(lr) + 3.5) + rng.uniform(0, 0.05, n_trials)
    ids = [f"trial_{i:05d}" for i in range(n_trials)]

    trial_index = np.repeat(np.arange(n_trials), steps_run)
    starts = np.concatenate([[0], np.cumsum(steps_run)[:-1]])
    step = np.arange(trial_index.size) - np.repeat(starts, steps_run)
    f = final[trial_index]
    val = f + (1.0 - f) * np.exp(-step / (n_steps / 5))
    is_eval = (step % eval_every == eval_every - 1) | (step == steps_run[trial_index] - 1)
    last_row = step == steps_run[trial_index] - 1
    bad = last_row & diverged[trial_index]
    val = np.where(is_eval & ~bad, val, np.nan)
    train = np.where(bad, np.nan, 1.0 / (1 + 0.01 * step) + 0.1)
    history = pa.table({
        "trial_id": pa.array(np.asarray(ids, dtype=object)[trial_index], pa.string()),
        "step": pa.array(step, pa.int64()),
        "train_loss": pa.array(train, pa.float64(), from_pandas=True),
        "val_loss": pa.array(val, pa.float64(), from_pandas=True),
        "grad_norm": pa.array(np.where(bad, np.nan, 1.0), pa.float64(), from_pandas=True),
        "lr": pa.array(lr[trial_index], pa.float64()),
        "loss_scale": pa.nulls(step.size, pa.float64()),
        "skipped": pa.array(np.zeros(step.size, bool)),
        "step_time_s": pa.array(np.full(step.size, 0.05)),
        "timestamp": pa.array(1.7e9 + step * 0.05 + trial_index * 100.0),
    }, schema=HISTORY_SCHEMA)

    best = np.fmin.reduceat(np.where(np.isnan(val), np.inf, val), starts)
    configs, summaries = [], []
    for i in range(n_trials):  # per trial (1,000), not per history row
        configs.append({"lr": float(lr[i]), "precision": str(precision[i]),
                        "warmup_steps": int(warmup[i]),
                        "max_grad_norm": None if np.isnan(clip[i]) else float(clip[i])})
        outcome = "diverged" if diverged[i] else "pruned" if pruned[i] else "completed"
        summaries.append({
            "outcome": outcome,
            "divergence_cause": CAUSES[i % len(CAUSES)] if diverged[i] else None,
            "diverged_step": int(div_step[i]) if diverged[i] else None,
            "nonfinite_module": MODULES[i % len(MODULES)] if diverged[i] else None,
            "best_val_loss": float(best[i]) if np.isfinite(best[i]) else None,
            "steps_run": int(steps_run[i]), "wall_time_s": float(steps_run[i]) * 0.05})
    return LargeSweep(configs, summaries, ids, history)


def write_large_parquet(run_dir: Path, sweep: LargeSweep, flush_rows: int = 2000) -> int:
    """Our record of ``sweep``: history in parts of ``flush_rows`` rows, then trials.parquet.
    Returns the number of history part files."""
    space = {"lr": {"loguniform": [1e-5, 1e-1]}, "precision": {"choice": PRECISIONS},
             "warmup_steps": {"choice": [0, 20, 100]}, "max_grad_norm": {"choice": [None, 1.0]}}
    fixed = {**FIXED, "steps": int(sweep.history["step"].to_numpy().max()) + 1}
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
