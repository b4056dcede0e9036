"""What the trial's health checks and reporting cost: the trial against a bare PyTorch loop.

    TUNE_SANA_HOME=/tmp/tshome .venv/bin/python bench/health_overhead.py [--steps 200] [--rounds 5]

Both sides build their parts with the trial's own ``setup`` (trials/sana_finetune.py): the same
model, data, seed, batches, noise, optimizer, lr schedule and scaler; both clip, and evaluate the
fixed validation loss once at the end (so their final validation losses must be equal: it is
checked and printed). The trial's ``train`` runs every check (loss and grad-norm finiteness before
the step, parameter norm after it, spike detector, loss-scale floor under fp16-amp), builds and
reports a row per step (to a list). The bare loop is forward, backward, clip, AdamW step,
scheduler step: no checks, no host sync (but GradScaler.step's own, under fp16-amp).

Each side is timed from the moment its model is ready (setup's ``on_model`` seam, on both sides)
to the end of its final validation, so data loading and model building are left out of both.
Rounds alternate which side goes first; the medians are compared (wall clock as ``ratio``; this
process's CPU time as ``cpu_ratio``, less sensitive to other processes on a shared machine;
``min_ratio`` compares the least-disturbed runs). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trials import sana_finetune  # noqa: E402
from tune_sana.config import TrialConfig, build_config  # noqa: E402
from tune_sana.outcomes import Outcome  # noqa: E402

Timing = tuple[float, float]  # (wall seconds, CPU seconds of this process)


def _clock() -> Timing:
    return time.perf_counter(), time.process_time()


def _since(start: Timing) -> Timing:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def time_trial(config: TrialConfig) -> tuple[Timing, float | None, int]:
    """Time from model-ready to the returned summary; final val loss; rows reported."""
    rows: list[dict[str, Any]] = []
    ready: list[Timing] = []
    summary = sana_finetune.run(config, rows.append, on_model=lambda _m: ready.append(_clock()))
    elapsed = _since(ready[0])
    if summary["outcome"] != Outcome.COMPLETED.value:
        raise SystemExit(f"the benchmark trial did not complete: {summary['outcome']}")
    return elapsed, summary["final_val_loss"], len(rows)


def time_bare(config: TrialConfig) -> tuple[Timing, float]:
    """The same training with no checks and no per-step host sync: the trial's own setup (the
    same model, data, optimizer, scheduler, scaler, batches and noise), then a bare loop."""
    ready: list[Timing] = []
    parts = sana_finetune.setup(config, on_model=lambda _m: ready.append(_clock()))
    assert config.max_grad_norm is not None
    # The base, as the trial evaluates it at step 0, with its picture grid (sample_steps).
    parts.validation(), parts.retention(), parts.sample_grid()
    for _ in range(config.steps):
        loss = parts.loss(parts.next_batch())
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        parts.scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(parts.params, config.max_grad_norm, foreach=True)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.scheduler.step()
    val = parts.validation()
    parts.retention(), parts.sample_grid()  # a completed trial's too
    return _since(ready[0]), val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    parser.add_argument("--model", default="sana-tiny")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (both sides)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    config = build_config({
        "model": args.model, "precision": args.precision, "steps": args.steps,
        "batch_size": args.batch_size, "lr": 1e-4, "max_grad_norm": 1.0,
        "eval_every": args.steps, "device": args.device, "threads": args.threads, "seed": 0,
    }, source="bench")
    torch.set_num_threads(args.threads)

    time_trial(config), time_bare(config)  # warm-up: lazy inits, allocator, caches
    trial_s: list[float] = []
    bare_s: list[float] = []
    trial_cpu: list[float] = []
    bare_cpu: list[float] = []
    vals: set[tuple[str, float | None]] = set()
    for round_ in range(args.rounds):
        order = ("trial", "bare") if round_ % 2 == 0 else ("bare", "trial")
        for side in order:
            if side == "trial":
                (seconds, cpu), val, reported = time_trial(config)
                trial_s.append(seconds)
                trial_cpu.append(cpu)
                assert reported == args.steps
            else:
                (seconds, cpu), val = time_bare(config)
                bare_s.append(seconds)
                bare_cpu.append(cpu)
            vals.add((side, val))
        print(f"round {round_ + 1}/{args.rounds}: trial {trial_s[-1]:.3f} s, "
              f"bare {bare_s[-1]:.3f} s", file=sys.stderr, flush=True)

    trial_med, bare_med = statistics.median(trial_s), statistics.median(bare_s)
    paired = statistics.median(t / b for t, b in zip(trial_s, bare_s, strict=True))
    same_val = len({val for _side, val in vals}) == 1
    result = {
        "trial_s": round(trial_med, 4),
        "bare_s": round(bare_med, 4),
        "ratio": round(trial_med / bare_med, 4),
        "paired_ratio_median": round(paired, 4),
        "steps": args.steps,
        "rounds": args.rounds,
        "min_ratio": round(min(trial_s) / min(bare_s), 4),
        "cpu_ratio": round(statistics.median(trial_cpu) / statistics.median(bare_cpu), 4),
        "overhead_ms_per_step": round(1000 * (trial_med - bare_med) / args.steps, 4),
        "same_val_loss": same_val,
        "trial_runs_s": [round(s, 4) for s in trial_s],
        "bare_runs_s": [round(s, 4) for s in bare_s],
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "model": args.model,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"trial {trial_med:.3f} s vs bare {bare_med:.3f} s for {args.steps} steps "
          f"(median of {args.rounds}): ratio {result['ratio']:.3f} (target <= 1.03), "
          f"{result['overhead_ms_per_step']:.3f} ms/step; "
          f"CPU-time ratio {result['cpu_ratio']:.3f}; same final val loss: {same_val}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
