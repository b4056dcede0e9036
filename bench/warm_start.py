"""Warm start: trial-steps a second sweep spends to reach the first sweep's best, cold or warm.

    .venv/bin/python bench/warm_start.py [--seeds 0,1,2,3,4] [--trials 24] [--first-trials 24]

The trial is the synthetic one (trials/synthetic.py: loss 0.1 + 1/(1 + speed*step) + seeded
noise, best lr 1e-3, NaN from step 5 above lr 1e-2), searched over lr loguniform [1e-5, 1], 40
steps, val_loss every 5 steps; Optuna TPE + ASHA (grace 10, reduction factor 3), concurrency 2,
one local Ray, all through tune_sana.engine.sweep.run as ``tune-sana sweep`` runs it.

1. A first sweep (searcher seed 1000, --first-trials trials) is run once; its best val_loss B is
   the lowest any of its trials reported.
2. Per searcher seed, two second sweeps of --trials trials each, the same space and seed:
   cold:  a fresh study;
   warm:  ``--warm-start <first sweep>``: its finished trials are told to the study first.
3. Each second sweep's trial-steps until a trial reports val_loss <= B * (1 + --tolerance)
   (default 0.5%: B itself sits at the optimum to within the trial's noise, so reaching it
   exactly is luck; search_efficiency.py allows 2%), counting steps >= 1 of every trial in the
   order they ran, as search_efficiency.py does; a sweep that never gets there counts as worse
   than any that did.

Target: the warm median is below the cold median (the issue asks for fewer trial-steps). The
ratio warm/cold and each seed's pair are printed; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import _common as c
from search_efficiency import LR_RANGE, steps_to_found

FIRST_SEED = 1000
STEPS, EVAL_EVERY, GRACE = 40, 5, 10


def spec(seed: int, trials: int, concurrency: int) -> dict[str, Any]:
    return {
        "trial": "synthetic", "metric": "val_loss", "mode": "min",
        "search": {"algorithm": "optuna", "num_samples": trials, "seed": seed,
                   "max_concurrent": concurrency},
        "scheduler": {"type": "asha", "grace_period": GRACE, "reduction_factor": 3},
        "resources": {"cpu": 1, "gpu": 0},
        "fixed": {"steps": STEPS, "diverge_above": 1e-2, "eval_every": EVAL_EVERY},
        "space": {"lr": {"loguniform": list(LR_RANGE)}},
    }


def best_seen(rows: list[dict[str, Any]]) -> float | None:
    values = [float(r["val_loss"]) for r in rows
              if (r.get("step") or 0) >= 1 and isinstance(r.get("val_loss"), float)
              and math.isfinite(r["val_loss"])]
    return min(values, default=None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--trials", type=int, default=24, help="trials per second sweep")
    parser.add_argument("--first-trials", type=int, default=24, help="trials of the first")
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--workdir", help="keep the runs here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    load0 = c.load_now()
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
    with c.workdir(args.workdir, "bench-warm-") as work, c.local_ray(args.concurrency):
        first = c.run_tune_sana(spec(FIRST_SEED, args.first_trials, args.concurrency), work,
                                "first")
        best = best_seen(first.history)
        if best is None:
            raise SystemExit("the first sweep reported no finite val_loss")
        threshold = best * (1 + args.tolerance)
        c.say(f"first sweep: {len(first.trials)} trials, best val_loss {best:.5f} "
              f"({first.wall_s:.0f} s); target: val_loss <= {threshold:.5f}")
        for seed in seeds:
            for side, warm in (("cold", ()), ("warm", (str(first.run_dir),))):
                run = c.run_tune_sana(spec(seed, args.trials, args.concurrency), work,
                                      f"{side}-{seed}", warm_start=warm)
                steps, found = steps_to_found(run.history, "timestamp", threshold)
                total = sum(1 for r in run.history if (r.get("step") or 0) >= 1)
                runs[side].append({"seed": seed, "steps_to_found": steps if found else None,
                                   "found": found, "total_steps": total,
                                   "best_val": c.rounded(best_seen(run.history), 5),
                                   "wall_s": c.rounded(run.wall_s, 1)})
                c.say(f"seed {seed} {side}: {'found after' if found else 'NOT found in'} "
                      f"{steps} trial-steps (run total {total}, {run.wall_s:.0f} s)")
    medians = {}
    for side, rs in runs.items():
        steps_list = [float(r["steps_to_found"]) if r["found"] else math.inf for r in rs]
        med = c.median(steps_list)
        medians[side] = None if med is None or math.isinf(med) else med
    cold, warm = medians["cold"], medians["warm"]
    ratio = warm / cold if warm is not None and cold else None
    met = warm is not None and (cold is None or warm < cold)
    wins = sum(1 for a, b in zip(runs["cold"], runs["warm"], strict=True)
               if b["found"] and (not a["found"] or b["steps_to_found"] < a["steps_to_found"]))
    c.say(f"median trial-steps to the first sweep's best: warm {warm} vs cold {cold} "
          f"(ratio {'-' if ratio is None else format(ratio, '.3f')}; warm fewer in {wins} of "
          f"{len(seeds)} seeds); target warm < cold: {'met' if met else 'MISSED'}")
    result = {"benchmark": "warm_start", "seeds": seeds, "trials": args.trials,
              "first_trials": args.first_trials, "first_best_val_loss": c.rounded(best, 6),
              "threshold": c.rounded(threshold, 6), "warm_median_steps": warm,
              "cold_median_steps": cold, "ratio": c.rounded(ratio), "warm_fewer_in": wins,
              "target_met": met, "cold": runs["cold"], "warm": runs["warm"],
              "wall_s": round(time.perf_counter() - started, 1), "machine": c.machine(load0)}
    c.emit(result)
    return result


if __name__ == "__main__":
    main()
