"""Trial overhead: the trial program with every check and report on vs a bare PyTorch loop.

    TUNE_SANA_HOME=/tmp/tshome .venv/bin/python bench/trial_overhead.py [--steps 100] [--rounds 40]

Per precision mode (--precisions, default fp32 and bf16 autocast), both sides train the same
model (the demo base by default) on the same data with the same seed, batches, noise, optimizer,
lr schedule and clipping for --steps steps, and evaluate the fixed validation loss once at the
end (their final validation losses must match: checked):

  trial: trials/sana_finetune.run with its health checks (loss and grad-norm finiteness before
         each step, parameter norm after, spike detector, loss-scale floor), a row built and
         reported every step to a no-op list append;
  bare:  forward, backward, clip, AdamW step, scheduler step; no checks, no .item(), no rows
         (the same evaluations as the trial: the base's and the final validation and retain
         losses).

The timing helpers are bench/health_overhead.py's (the same comparison, one precision, written
for the health-check issue): each side is timed from its model being ready to the end of its
final validation. One warm-up pair, then --rounds interleaved rounds alternating which side goes
first (many short rounds rather than a few long ones: other processes on a shared machine add
noise of their own, which more samples average out); medians compared, on wall clock (``ratio``)
and on this process's CPU time (``cpu_ratio``); ``min_ratio`` compares the fastest run of each
side (noise from other work only ever adds time). Target: the trial at most 3% slower
(ratio <= 1.03). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import _common as c
from health_overhead import time_bare, time_trial


def measure(config: Any, rounds: int) -> dict[str, Any]:
    """Warm-up pair, then ``rounds`` interleaved pairs; medians and the paired ratio."""
    time_trial(config), time_bare(config)
    wall: dict[str, list[float]] = {"trial": [], "bare": []}
    cpu: dict[str, list[float]] = {"trial": [], "bare": []}
    vals: set[float | None] = set()
    for round_ in range(rounds):
        for side in ("trial", "bare") if round_ % 2 == 0 else ("bare", "trial"):
            if side == "trial":
                (seconds, cpu_s), val, reported = time_trial(config)
                assert reported == config.steps + 1, reported  # + the base row (step 0)
            else:
                (seconds, cpu_s), val = time_bare(config)
            wall[side].append(seconds)
            cpu[side].append(cpu_s)
            vals.add(val)
    trial_med, bare_med = statistics.median(wall["trial"]), statistics.median(wall["bare"])
    return {
        "trial_s": c.rounded(trial_med), "bare_s": c.rounded(bare_med),
        "ratio": c.rounded(trial_med / bare_med),
        "paired_ratio_median": c.rounded(statistics.median(
            t / b for t, b in zip(wall["trial"], wall["bare"], strict=True))),
        "cpu_ratio": c.rounded(statistics.median(cpu["trial"]) / statistics.median(cpu["bare"])),
        "min_ratio": c.rounded(min(wall["trial"]) / min(wall["bare"])),
        "overhead_ms_per_step": c.rounded(1000 * (trial_med - bare_med) / config.steps),
        "same_val_loss": len(vals) == 1,
        "trial_runs_s": [c.rounded(s) for s in wall["trial"]],
        "bare_runs_s": [c.rounded(s) for s in wall["bare"]],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (after a warm-up)")
    parser.add_argument("--precisions", default="fp32,bf16-amp")
    parser.add_argument("--model", default="demo-base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (both sides)")
    args = parser.parse_args(argv)
    load0 = c.load_now()

    import torch

    from tune_sana.config import build_config

    c.ensure_model(args.model)
    torch.set_num_threads(args.threads)
    modes: dict[str, Any] = {}
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        config = build_config({
            "model": args.model, "precision": precision, "steps": args.steps,
            "batch_size": args.batch_size, "lr": 1e-4, "max_grad_norm": 1.0,
            "eval_every": args.steps, "device": "cpu", "threads": args.threads, "seed": 0,
        }, source="bench")
        modes[precision] = m = measure(config, args.rounds)
        c.say(f"{precision:<9} trial {m['trial_s']:.3f} s vs bare {m['bare_s']:.3f} s for "
              f"{args.steps} steps (median of {args.rounds}): ratio {m['ratio']:.3f}, CPU-time "
              f"ratio {m['cpu_ratio']:.3f}, fastest-run ratio {m['min_ratio']:.3f}, "
              f"{m['overhead_ms_per_step']:+.3f} ms/step; same "
              f"final val loss: {m['same_val_loss']}")
    worst = max(m["ratio"] for m in modes.values())
    worst_cpu = max(m["cpu_ratio"] for m in modes.values())
    result = {
        "benchmark": "trial_overhead", "steps": args.steps, "rounds": args.rounds,
        "model": args.model, "batch_size": args.batch_size, "threads": args.threads,
        "worst_ratio": worst, "worst_cpu_ratio": worst_cpu,
        "target_met": worst <= 1.03,
        "modes": modes,
        "machine": c.machine(load0),
    }
    c.say(f"worst wall ratio {worst:.3f} (CPU-time {worst_cpu:.3f}); target <= 1.03: "
          f"{'met' if result['target_met'] else 'MISSED'}")
    c.emit(result)
    return result


if __name__ == "__main__":
    main()
