"""Search efficiency: trial-steps spent until a near-best configuration is found.

    .venv/bin/python bench/search_efficiency.py [--seeds 0,...,9] [--trials 60]

The space: the synthetic trial (trials/synthetic.py: loss 0.1 + 1/(1 + speed*step) + seeded
noise, speed = exp(-|log10(lr) + 3|), so the best lr is 1e-3 at every step; NaN every step from
step 5 when lr > 1e-2; it never checks itself), lr loguniform [1e-5, 1], 40 steps, val_loss every
5 steps. "Best" is the known optimum: the lowest val_loss the trial reports at lr = 1e-3 (no lr
does better at any step, the noise does not depend on lr). A configuration counts as found when a
trial reports a val_loss within 2% of it (--tolerance); only trials run to (nearly) full length
get there. Per searcher seed, on one local Ray at concurrency 2:

  random:    plain Ray Tune random search (tune.loguniform, seeded), FIFO, no stopper: every trial
             runs its 40 steps, NaN included.
  tune-sana: tune_sana.engine.sweep.run with TPE (DivergenceAwareOptunaSearch), ASHA (grace 10,
             reduction factor 3) and the divergence stopper.
Both get the same budget of --trials trials.

Compute until found = trial-steps reported by all trials up to the report that found it, in the
order they ran (tune-sana: each history row's time, as the trial made it; random: when the driver
received the row). A run that never finds one within its budget counts as worse
than every run that did (infinite, for the median; its steps run are listed); a median over
seeds that is not found is null and misses the target. Reported per side: the median over
seeds (and each seed) and how many runs found one; and the probability p that a random lr lands
in the 2% window (so the random side's expectation, about 40 / p steps, can be checked).
Target: tune-sana's median at most one third of random search's. The last line printed is one
JSON object.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import _common as c

DIVERGE_ABOVE = 1e-2
LR_RANGE = (1e-5, 1.0)


def random_trainable(config: dict[str, Any]) -> None:
    """The synthetic trial under plain Ray Tune, every row as computed (NaN included)."""
    from ray import tune

    from trials import synthetic

    synthetic.run(config, tune.report)


def known_best(fixed: dict[str, Any]) -> float:
    """The lowest val_loss the trial reports at its optimum lr (1e-3)."""
    from trials import synthetic

    rows: list[dict[str, Any]] = []
    synthetic.run({**fixed, "lr": 1e-3}, rows.append)
    return min(float(r["val_loss"]) for r in rows if "val_loss" in r)


def hit_probability(fixed: dict[str, Any], threshold: float, points: int = 4000) -> float:
    """Share of the log-lr range whose trial, run in full, reports a val_loss <= threshold."""
    from trials import synthetic

    lo, hi = (math.log10(x) for x in LR_RANGE)
    hits = 0
    for i in range(points):
        rows: list[dict[str, Any]] = []
        synthetic.run({**fixed, "lr": 10 ** (lo + (hi - lo) * (i + 0.5) / points)}, rows.append)
        vals = [r["val_loss"] for r in rows if "val_loss" in r and not c.nonfinite(r["val_loss"])]
        hits += bool(vals) and min(vals) <= threshold
    return hits / points


def steps_to_found(rows: list[dict[str, Any]], ts_key: str, threshold: float) -> tuple[int, bool]:
    """Trial-steps received before and including the first val_loss <= threshold."""
    ordered = sorted(rows, key=lambda r: float(r[ts_key]))
    for n, row in enumerate(ordered, start=1):
        val = row.get("val_loss")
        if isinstance(val, float) and math.isfinite(val) and val <= threshold:
            return n, True
    return len(ordered), False


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9",
                        help="searcher seeds (one pair of runs each)")
    parser.add_argument("--trials", type=int, default=60, help="trials per run (both sides)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--grace", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--workdir", help="keep the runs here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    load0 = c.load_now()
    c.ship_by_value(__name__)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    fixed = {"steps": args.steps, "diverge_above": DIVERGE_ABOVE, "eval_every": 5}
    best = known_best(fixed)
    threshold = best * (1 + args.tolerance)
    p_hit = hit_probability(fixed, threshold)
    c.say(f"known best val_loss {best:.5f} (lr 1e-3); found = val_loss <= {threshold:.5f}; a "
          f"random lr lands there with p = {p_hit:.3f} (expect ~{args.steps / p_hit:.0f} "
          f"steps for random search)" if p_hit else "no lr reaches the threshold")

    runs: dict[str, list[dict[str, Any]]] = {"random": [], "tune_sana": []}
    with c.workdir(args.workdir, "bench-search-") as work, c.local_ray(args.concurrency):
        for seed in seeds:
            plain = c.run_plain_ray(
                random_trainable,
                param_space={**fixed, "lr": tune.loguniform(*LR_RANGE)}, storage=work,
                name=f"random-{seed}", metric="val_loss", mode="min",
                num_samples=args.trials, max_concurrent=args.concurrency,
                search_alg=BasicVariantGenerator(random_state=seed,
                                                 max_concurrent=args.concurrency))
            ours = c.run_tune_sana({
                "trial": "synthetic", "metric": "val_loss", "mode": "min",
                "search": {"algorithm": "optuna", "num_samples": args.trials, "seed": seed,
                           "max_concurrent": args.concurrency},
                "scheduler": {"type": "asha", "grace_period": args.grace,
                              "reduction_factor": 3},
                "resources": {"cpu": 1, "gpu": 0}, "fixed": fixed,
                "space": {"lr": {"loguniform": list(LR_RANGE)}},
            }, work, f"tune_sana-{seed}")
            for side, rows, key, wall in (("random", plain.rows, "received_at", plain.wall_s),
                                          ("tune_sana", ours.history, "timestamp",
                                           ours.wall_s)):
                steps, found = steps_to_found(rows, key, threshold)
                best_seen = min((float(r["val_loss"]) for r in rows
                                 if isinstance(r.get("val_loss"), float)
                                 and math.isfinite(r["val_loss"])), default=None)
                runs[side].append({"seed": seed, "steps_to_found": steps if found else None,
                                   "found": found,
                                   "total_steps": len(rows), "best_val": c.rounded(best_seen, 5),
                                   "wall_s": c.rounded(wall, 2)})
                c.say(f"seed {seed} {side:<9}: {'found after' if found else 'NOT found in'} "
                      f"{steps} trial-steps (run total {len(rows)}, best val "
                      f"{best_seen if best_seen is None else format(best_seen, '.5f')}, "
                      f"{wall:.1f} s)")

    summary: dict[str, Any] = {}
    for side, rs in runs.items():
        found_steps = [r["steps_to_found"] for r in rs if r["found"]]
        med = c.median([float(x) for x in found_steps] + [math.inf] * (len(rs) - len(found_steps)))
        summary[side] = {
            "median_steps_to_found": None if med is None or math.isinf(med) else med,
            "mean_steps_to_found_when_found": c.rounded(
                sum(found_steps) / len(found_steps), 1) if found_steps else None,
            "found": len(found_steps), "runs": rs,
        }
    ours_m, rand_m = (summary["tune_sana"]["median_steps_to_found"],
                      summary["random"]["median_steps_to_found"])
    ratio = ours_m / rand_m if ours_m is not None and rand_m else None
    result = {
        "benchmark": "search_efficiency", "seeds": seeds, "tolerance": args.tolerance,
        "best": "known optimum (lr 1e-3)", "best_val_loss": c.rounded(best, 6),
        "threshold": c.rounded(threshold, 6), "random_hit_probability": c.rounded(p_hit, 4),
        "tune_sana_median_steps": ours_m, "random_median_steps": rand_m,
        "ratio": c.rounded(ratio), "target_met": ratio is not None and ratio <= 1 / 3,
        "tune_sana": summary["tune_sana"], "random": summary["random"],
        "machine": c.machine(load0),
    }
    c.say(f"median trial-steps to within {args.tolerance:.0%} of the best: tune-sana {ours_m} "
          f"({summary['tune_sana']['found']}/{len(seeds)} found) vs random {rand_m} "
          f"({summary['random']['found']}/{len(seeds)} found): ratio "
          f"{'-' if ratio is None else format(ratio, '.3f')}; target <= 0.333: "
          f"{'met' if result['target_met'] else 'MISSED'}")
    c.emit(result)
    return result


if __name__ == "__main__":
    main()
