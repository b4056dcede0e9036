"""Orchestration efficiency: how much of the machine's time goes to the trials' own compute.

    TUNE_SANA_HOME=/tmp/tshome .venv/bin/python bench/orchestration.py [--trials 6]
        [--trial-seconds 30] [--plain-report-every 25]

Work: --trials runs of the real trial program (trials/sana_finetune.py: the demo base, fp32,
lr 1e-4, one CPU thread, validation at the end only; the trials differ by seed), each sized to
about --trial-seconds of compute: the driver first times --calibrate steps alone and sets
steps = trial_seconds / seconds per step. Real CPU compute, not sleep: concurrent trials compete
for the cores as they would on a real node. The same trials run at --concurrency twice on one
local Ray, the trial program reporting a row every step on both sides:

  plain:     Ray Tune alone: Tuner + grid search + FIFO, a trainable that hands every row to
             tune.report, no stopper, no recorder.
  tune-sana: tune_sana.engine.sweep.run (sanitised rows relayed to Ray in batches
             (tune_sana/engine/relay.py: evaluations, verdicts and checkpoints at once,
             other rows at least every second),
             divergence stopper, Parquet recorder).

Figures per side:
  efficiency       sum of the trials' compute / (sweep wall time x concurrency), where compute is
                   the sum of the trials' per-step times (forward, backward, checks, optimizer:
                   step_time_s of every row; it leaves out the reports and the final validation)
  loop_efficiency  the same with each trial's loop wall time instead (wall_time_s: includes the
                   reports to Ray and the final validation)
  startup_s        per trial: from its slot freeing (the sweep's start for the first trials, else
                   the end of the trial it replaced) to its first step starting (Ray scheduling,
                   actor start or reuse, the trial's imports, data and model loading); median and
                   max. Times: plain, the driver's clock when each row arrived; tune-sana,
                   the time the trial made each row (the history's timestamp).
  report_ms        per step: (loop wall time - step times) / steps, mostly the report round trip
                   to the driver (the training thread waits for Ray to take each result).
--plain-report-every K adds a third run: plain Ray Tune with a report every K steps only (each
report carrying the step times of the rows it stands for), to measure what batching the
per-step reports would save. Ray's own start (ray.init) is timed apart:
tune_sana_efficiency_with_ray_start adds it to the sweep, as `tune-sana sweep` on a fresh machine
sees it. Target: efficiency >= 0.90 (tune-sana). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import _common as c


def plain_trainable(config: dict[str, Any], every: int = 1) -> None:
    """The trial program under plain Ray Tune: its rows straight to tune.report (every
    ``every``-th row and the last one; each row still carries its own step_time_s)."""
    from ray import tune

    from trials import sana_finetune
    from tune_sana.config import build_config

    cfg = build_config(config, "bench config")
    pending: list[float] = []

    def report(row: dict[str, Any]) -> None:
        pending.append(float(row.get("step_time_s") or 0.0))
        if len(pending) >= every or row["step"] >= cfg.steps or "outcome" in row:
            tune.report({**row, "step_time_s": sum(pending), "rows": len(pending)})
            pending.clear()

    sana_finetune.run(cfg, report)


def _with_fixed(config: dict[str, Any], fixed: dict[str, Any], every: int) -> None:
    plain_trainable({**fixed, **config}, every)


def calibrate(fixed: dict[str, Any], steps: int) -> float:
    """Median seconds per training step of the trial alone (one thread), after 5 warm-up steps."""
    import torch

    from trials import sana_finetune
    from tune_sana.config import build_config

    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    sana_finetune.run(build_config({**fixed, "steps": steps + 5, "eval_every": steps + 5},
                                   "bench"), rows.append)
    return statistics.median(float(r["step_time_s"]) for r in rows[5:])


def timeline(rows: list[dict[str, Any]], ts_key: str, sweep_start: float,
             concurrency: int) -> dict[str, Any]:
    """Per-trial compute, loop time and startup latency from rows stamped with the driver's
    clock (``ts_key``) when they arrived."""
    trials = c.by_trial(rows)
    spans = []
    compute = loop = 0.0
    steps = 0
    for trial_rows in trials.values():
        first, last = trial_rows[0], trial_rows[-1]
        compute += sum(float(r.get("step_time_s") or 0.0) for r in trial_rows)
        loop += float(last.get("wall_time_s") or 0.0)
        steps += sum(int(r.get("rows", 1)) for r in trial_rows)
        spans.append((float(first[ts_key]) - float(first.get("step_time_s") or 0.0),
                      float(last[ts_key])))
    spans.sort()
    ends = sorted(end for _, end in spans)
    startups = [start - (ends[k - concurrency] if k >= concurrency else sweep_start)
                for k, (start, _) in enumerate(spans)]
    return {"trials": len(trials), "compute_s": compute, "loop_s": loop, "steps": steps,
            "startup_s": startups, "last_end": ends[-1] if ends else sweep_start,
            "start": sweep_start}


def figures(tl: dict[str, Any], wall: float, concurrency: int) -> dict[str, Any]:
    # slot time = wall x concurrency = trial loops + startups + the tail after the last trial
    # ended (on every slot) + whatever else (slots left idle while trials ran)
    tail = tl["start"] + wall - tl["last_end"]
    idle = wall * concurrency - tl["loop_s"] - sum(tl["startup_s"]) - tail * concurrency
    return {
        "tail_s": c.rounded(tail, 2),
        "slot_idle_other_s": c.rounded(idle, 2),
        "trials": tl["trials"],
        "wall_s": c.rounded(wall, 2),
        "compute_s": c.rounded(tl["compute_s"], 2),
        "efficiency": c.rounded(tl["compute_s"] / (wall * concurrency)),
        "loop_efficiency": c.rounded(tl["loop_s"] / (wall * concurrency)),
        "startup_s_median": c.rounded(c.median(tl["startup_s"]), 2),
        "startup_s_max": c.rounded(max(tl["startup_s"], default=0.0), 2),
        "report_ms": c.rounded(1000 * (tl["loop_s"] - tl["compute_s"]) / max(1, tl["steps"]), 3),
        "steps": tl["steps"],
        "startup_s": [c.rounded(x, 2) for x in tl["startup_s"]],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--trial-seconds", type=float, default=30.0,
                        help="compute per trial to aim for (sets the steps)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--model", default="demo-base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calibrate", type=int, default=40, help="steps timed to size trials")
    parser.add_argument("--steps", type=int, help="steps per trial (skips the calibration)")
    parser.add_argument("--plain-report-every", type=int, default=0, metavar="K",
                        help="also run plain Ray Tune reporting every K-th step only (what "
                        "batching reports would save); 0 = skip this third run")
    parser.add_argument("--workdir", help="keep both runs here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    load0 = c.load_now()
    c.ship_by_value(__name__)

    from ray import tune


    fixed = {"model": args.model, "data": "builtin:shapes", "precision": "fp32", "lr": 1e-4,
             "batch_size": args.batch_size, "device": "cpu", "threads": 1}
    seeds = list(range(args.trials))
    spec: dict[str, Any] = {
        "trial": "sana_finetune", "metric": "val_loss", "mode": "min",
        "search": {"algorithm": "grid", "num_samples": 1, "seed": 0,
                   "max_concurrent": args.concurrency},
        "scheduler": {"type": "fifo"}, "resources": {"cpu": 1, "gpu": 0},
        "fixed": {**fixed, "steps": 1, "eval_every": 1}, "space": {"seed": {"grid": seeds}},
    }
    c.ensure_model(args.model)  # the demo base, built once, outside every timing
    step_s = None
    if args.steps:
        steps = args.steps
    else:
        step_s = calibrate(fixed, args.calibrate)
        steps = max(10, round(args.trial_seconds / step_s))
    fixed.update(steps=steps, eval_every=steps)
    spec["fixed"] = fixed
    c.say(f"{args.trials} trials x {steps} steps of the real trial (calibrated "
          f"{'-' if step_s is None else format(step_s * 1000, '.1f')} ms/step alone, aiming at "
          f"{args.trial_seconds:g} s each), concurrency {args.concurrency}")

    with c.workdir(args.workdir, "bench-orch-") as work, c.local_ray(args.concurrency) as ray_s:
        t0 = time.time()
        plain = c.run_plain_ray(
            tune.with_parameters(_with_fixed, fixed=fixed, every=1),
            param_space={"seed": tune.grid_search(seeds)}, storage=work, name="plain",
            metric="val_loss", mode="min", num_samples=1, max_concurrent=args.concurrency)
        plain_tl = timeline(plain.rows, "received_at", t0, args.concurrency)
        c.say(f"plain Ray Tune: {plain.wall_s:.1f} s")
        batched = None
        if args.plain_report_every > 1:
            t0 = time.time()
            batched = c.run_plain_ray(
                tune.with_parameters(_with_fixed, fixed=fixed, every=args.plain_report_every),
                param_space={"seed": tune.grid_search(seeds)}, storage=work,
                name="plain_batched", metric="val_loss", mode="min", num_samples=1,
                max_concurrent=args.concurrency)
            batched_tl = timeline(batched.rows, "received_at", t0, args.concurrency)
            c.say(f"plain Ray Tune, a report every {args.plain_report_every} steps: "
                  f"{batched.wall_s:.1f} s")
        t0 = time.time()
        ours = c.run_tune_sana(spec, work, "tune_sana")
        ours_tl = timeline(ours.history, "timestamp", t0, args.concurrency)
        walls = {r["trial_id"]: r["wall_time_s"] for r in ours.trials}
        # the history rows carry step metrics; a trial's loop time is in trials.parquet
        ours_tl["loop_s"] = sum(float(w or 0.0) for w in walls.values())
        c.say(f"tune-sana: {ours.wall_s:.1f} s")

    plain_f = figures(plain_tl, plain.wall_s, args.concurrency)
    ours_f = figures(ours_tl, ours.wall_s, args.concurrency)
    ours_f["efficiency_with_ray_start"] = c.rounded(
        ours_tl["compute_s"] / ((ours.wall_s + ray_s) * args.concurrency))
    result = {
        "benchmark": "orchestration", "trials": args.trials, "steps_per_trial": steps,
        "concurrency": args.concurrency, "model": args.model,
        "calibrated_step_ms": c.rounded(step_s * 1000, 2) if step_s else None,
        "tune_sana_efficiency": ours_f["efficiency"],
        "tune_sana_efficiency_with_ray_start": ours_f["efficiency_with_ray_start"],
        "plain_efficiency": plain_f["efficiency"],
        "ray_init_s": c.rounded(ray_s, 2),
        "target_met": (ours_f["efficiency"] or 0.0) >= 0.90,
        "tune_sana": ours_f, "plain": plain_f,
        "machine": c.machine(load0),
    }
    sides = [("plain", plain_f), ("tune-sana", ours_f)]
    if batched is not None:
        result["plain_batched"] = batched_f = figures(batched_tl, batched.wall_s,
                                                      args.concurrency)
        batched_f["report_every"] = args.plain_report_every
        sides.append((f"plain/{args.plain_report_every}", batched_f))
    for side, f in sides:
        c.say(f"{side:<10} wall {f['wall_s']:.1f} s, compute {f['compute_s']:.1f} s: efficiency "
              f"{f['efficiency']:.3f} (loop {f['loop_efficiency']:.3f}); startup per trial "
              f"median {f['startup_s_median']:.2f} s, max {f['startup_s_max']:.2f} s; "
              f"{f['report_ms']:.2f} ms/step outside compute")
    c.say(f"target tune-sana efficiency >= 0.90: {'met' if result['target_met'] else 'MISSED'}"
          f" (with Ray's start {ours_f['efficiency_with_ray_start']:.3f})")
    c.emit(result)
    return result


if __name__ == "__main__":
    main()
