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
         losses, and the two picture grids, ``sample_steps``).

fp16-amp runs with ``attention_fp32: true``: without it the demo base diverges at lr 1e-4 (the
seed's failure) and leaves no steady state to time. In pure bf16 the final validation losses
differ by design: the trial clips by a grad norm summed in fp32, torch's clip_grad_norm_ by
one summed in bf16, so the clip factors differ in the last bits.

The timing helpers are bench/health_overhead.py's (the same comparison, one precision, written
for the health-check issue): each side is timed from its model being ready to the end of its
final validation. One warm-up pair, then --rounds interleaved rounds alternating which side goes
first (many short rounds rather than a few long ones: other processes on a shared machine add
noise of their own, which more samples average out); medians compared, on wall clock (``ratio``)
and on this process's CPU time (``cpu_ratio``); ``min_ratio`` compares the fastest run of each
side (noise from other work only ever adds time).

Noise against cost: each round gives one paired ratio (trial / bare, run back to back), so
load that changes between rounds cancels within a pair. The paired median is the figure; its
spread is reported as the interquartile range of the paired ratios and a 95% bootstrap
interval of their median (2,000 resamples, seeded). A mode's verdict: ``met`` when the whole
interval is at or below 1.03, ``missed`` when it is wholly above, ``cannot tell`` when it
straddles 1.03 (more rounds, or a quieter machine, would decide). Target: the trial at most 3%
slower (paired median <= 1.03) in every precision mode it can run: fp32, bf16-amp, fp16-amp
and pure bf16 by default (pure fp16 diverges at its first step on the demo base, so it has no
steady state to time). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import random
import statistics
from typing import Any

import _common as c
from health_overhead import time_bare, time_trial

TARGET = 1.03
BOOTSTRAP = 2000


def spread(ratios: list[float]) -> dict[str, Any]:
    """Interquartile range and a seeded 95% bootstrap interval of the median of ``ratios``."""
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios)))
                     for _ in range(BOOTSTRAP))
    low, high = medians[int(0.025 * BOOTSTRAP)], medians[int(0.975 * BOOTSTRAP) - 1]
    verdict = "met" if high <= TARGET else "missed" if low > TARGET else "cannot tell"
    return {"paired_ratio_iqr": [c.rounded(q1), c.rounded(q3)],
            "paired_ratio_ci95": [c.rounded(low), c.rounded(high)], "verdict": verdict}


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
    paired = [t / b for t, b in zip(wall["trial"], wall["bare"], strict=True)]
    return {
        "trial_s": c.rounded(trial_med), "bare_s": c.rounded(bare_med),
        "ratio": c.rounded(trial_med / bare_med),
        "paired_ratio_median": c.rounded(statistics.median(paired)), **spread(paired),
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
    parser.add_argument("--precisions", default="fp32,bf16-amp,fp16-amp,bf16")
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
    skipped: dict[str, str] = {}
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        config = build_config({
            "model": args.model, "precision": precision, "steps": args.steps,
            "batch_size": args.batch_size, "lr": 1e-4, "max_grad_norm": 1.0,
            "eval_every": args.steps, "device": "cpu", "threads": args.threads, "seed": 0,
            # fp16 autocast diverges in linear attention at lr 1e-4 on the demo base (the
            # seed's failure): timed with its remedy, the attention kept in fp32
            "attention_fp32": precision == "fp16-amp",
        }, source="bench")
        try:
            modes[precision] = m = measure(config, args.rounds)
        except SystemExit as stop:  # the trial diverged: no steady state to time
            skipped[precision] = str(stop)
            c.say(f"{precision:<9} not timed: {stop}")
            continue
        low, high = m["paired_ratio_ci95"]
        c.say(f"{precision:<9} trial {m['trial_s']:.3f} s vs bare {m['bare_s']:.3f} s for "
              f"{args.steps} steps (median of {args.rounds}): paired ratio "
              f"{m['paired_ratio_median']:.3f} (95% CI {low:.3f}-{high:.3f}, IQR "
              f"{m['paired_ratio_iqr'][0]:.3f}-{m['paired_ratio_iqr'][1]:.3f}: "
              f"{m['verdict']}), ratio of medians {m['ratio']:.3f}, CPU-time "
              f"ratio {m['cpu_ratio']:.3f}, fastest-run ratio {m['min_ratio']:.3f}, "
              f"{m['overhead_ms_per_step']:+.3f} ms/step; same "
              f"final val loss: {m['same_val_loss']}")
    if not modes:
        raise SystemExit(f"no precision mode could be timed: {skipped}")
    worst = max(m["paired_ratio_median"] for m in modes.values())
    worst_cpu = max(m["cpu_ratio"] for m in modes.values())
    result = {
        "benchmark": "trial_overhead", "steps": args.steps, "rounds": args.rounds,
        "model": args.model, "batch_size": args.batch_size, "threads": args.threads,
        "worst_ratio": worst, "worst_cpu_ratio": worst_cpu,
        "target_met": worst <= TARGET,
        "verdicts": {mode: m["verdict"] for mode, m in modes.items()},
        "modes": modes, "not_timed": skipped,
        "machine": c.machine(load0),
    }
    c.say(f"worst paired ratio {worst:.3f} (CPU-time {worst_cpu:.3f}); target <= 1.03: "
          f"{'met' if result['target_met'] else 'MISSED'}")
    c.emit(result)
    return result


if __name__ == "__main__":
    main()
