"""Does the searcher learn where training diverges? Ray's stock OptunaSearch vs tune-sana's.

    .venv/bin/python bench/searcher_divergence.py [--trials 30] [--seeds 0,1,2,3,4]

The space: the synthetic trial (trials/synthetic.py: an lr-dependent loss curve, best at lr 1e-3,
NaN every step from step 5 when lr > 1e-2, never checking itself) over lr loguniform [1e-5, 1]
(40% of the log range diverges) and its seed in 0..3 (a nuisance dimension), 40 steps, val_loss
every step (Ray's stock OptunaSearch needs the metric in every result). For each searcher seed,
two runs of --trials trials on one local Ray, concurrency 2, ASHA (grace 10, reduction factor 3)
on val_loss, the same TPE seed and startup trials (n_startup_trials as tune-sana sets it):

  stock:     plain Ray Tune: Tuner + ray.tune.search.optuna.OptunaSearch + ASHAScheduler, the
             trial reporting what it computes (NaN included), TPESampler(seed, n_startup_trials)
             with Optuna's defaults otherwise.
  tune-sana: tune_sana.engine.sweep.run with search.algorithm optuna (DivergenceAware-
             OptunaSearch with tune-sana's TPE settings: a quarter of the finished trials modelled
             as good; the
             engine's stopper and sanitised reports).

A trial is diverged when its lr is above the threshold (true by construction of the trial, and
checked against tune-sana's record). Reported: the share of diverged trials in the first and the
second half of each run (in the order the searcher proposed them), pooled over seeds and per
seed, and the Optuna trial states at the end (RUNNING / COMPLETE / FAIL / PRUNED) read from each
run's saved searcher state. Target: tune-sana's second-half share at most half its first-half
share, and below the stock run's second-half share. The last line printed is one JSON object.

Note on the baseline: Optuna 5's TPESampler defaults to constant_liar=True, which counts RUNNING
trials as bad when it samples. The stock run's NaN trials stay RUNNING forever, so its TPE also
steers away from them, by accident; with constant_liar=False (the default before Optuna 5.0)
it would ignore them entirely.
"""

from __future__ import annotations

import argparse
from typing import Any

import _common as c

DIVERGE_ABOVE = 1e-2


def stock_trainable(config: dict[str, Any]) -> None:
    """The synthetic trial under plain Ray Tune: every row reported as computed."""
    from ray import tune

    from trials import synthetic

    synthetic.run(config, tune.report)


def _space(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {
        "trial": "synthetic", "metric": "val_loss", "mode": "min",
        "search": {"algorithm": "optuna", "num_samples": args.trials, "seed": seed,
                   "max_concurrent": args.concurrency},
        "scheduler": {"type": "asha", "grace_period": args.grace, "reduction_factor": 3},
        "resources": {"cpu": 1, "gpu": 0},
        "fixed": {"steps": args.steps, "diverge_above": DIVERGE_ABOVE, "eval_every": 1},
        "space": {"lr": {"loguniform": [1e-5, 1.0]}, "seed": {"int": [0, 3]}},
    }


def halves(diverged: list[bool]) -> tuple[float, float]:
    """Share of True in the first and the second half (the middle trial of an odd count goes
    to the second half)."""
    mid = len(diverged) // 2
    first, second = diverged[:mid], diverged[mid:]
    return (sum(first) / len(first) if first else 0.0,
            sum(second) / len(second) if second else 0.0)


def _summary(study: Any) -> tuple[list[bool], dict[str, int]]:
    ordered = sorted(study.trials, key=lambda t: t.number)
    return [float(t.params["lr"]) > DIVERGE_ABOVE for t in ordered], c.optuna_states(study)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30, help="trials per run")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="searcher seeds (one run pair each)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--grace", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--workdir", help="keep the runs here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    load0 = c.load_now()
    c.ship_by_value(__name__)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from tune_sana.engine.space import optuna_space, parse_spec

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    c.say(f"{len(seeds)} seeds x 2 searchers x {args.trials} synthetic trials "
          f"(NaN above lr {DIVERGE_ABOVE:g}), concurrency {args.concurrency}, ASHA")
    runs: dict[str, list[dict[str, Any]]] = {"stock": [], "tune_sana": []}
    with c.workdir(args.workdir, "bench-searcher-") as work, c.local_ray(args.concurrency):
        for seed in seeds:
            spec = _space(args, seed)
            parsed = parse_spec(spec, "bench")
            startup = min(8, max(2, args.trials // 3))  # as tune_sana.engine.search.build_searcher
            searcher = OptunaSearch(
                space=optuna_space(parsed), metric="val_loss", mode="min",
                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup))
            stock = c.run_plain_ray(
                stock_trainable, param_space=dict(spec["fixed"]),
                storage=work, name=f"stock-{seed}", metric="val_loss", mode="min",
                num_samples=args.trials, max_concurrent=args.concurrency, search_alg=searcher,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=args.steps,
                                        grace_period=args.grace, reduction_factor=3))
            ours = c.run_tune_sana(spec, work, f"tune_sana-{seed}")
            for side, exp_dir, wall, steps, recorded in (
                    ("stock", stock.experiment_dir, stock.wall_s, len(stock.rows), None),
                    ("tune_sana", ours.run_dir, ours.wall_s, len(ours.history),
                     sum(t["outcome"] == "diverged" for t in ours.trials))):
                diverged, states = _summary(c.optuna_study(exp_dir))
                first, second = halves(diverged)
                runs[side].append({"seed": seed, "trials": len(diverged),
                                   "diverged": sum(diverged), "first_half_share": first,
                                   "second_half_share": second, "optuna_states": states,
                                   "steps": steps, "wall_s": c.rounded(wall, 2),
                                   "recorded_diverged": recorded,
                                   "sequence": "".join("x" if d else "." for d in diverged)})
                c.say(f"seed {seed} {side:<9} {runs[side][-1]['sequence']}  first half "
                      f"{first:.0%}, second {second:.0%}; Optuna {states}; {wall:.1f} s")

    result: dict[str, Any] = {"benchmark": "searcher_divergence", "trials_per_run": args.trials,
                              "seeds": seeds, "diverge_above": DIVERGE_ABOVE}
    for side, rs in runs.items():
        mids = [r["trials"] // 2 for r in rs]
        first_n = sum(mids)
        second_n = sum(r["trials"] for r in rs) - first_n
        first_d = sum(sum(1 for ch in r["sequence"][:m] if ch == "x") for r, m in zip(rs, mids,
                                                                                      strict=True))
        second_d = sum(r["diverged"] for r in rs) - first_d
        states: dict[str, int] = {}
        for r in rs:
            for k, v in r["optuna_states"].items():
                states[k] = states.get(k, 0) + v
        result[side] = {
            "first_half_share": c.rounded(first_d / first_n if first_n else 0.0),
            "second_half_share": c.rounded(second_d / second_n if second_n else 0.0),
            "optuna_states": states,
            "total_steps": sum(r["steps"] for r in rs),
            "wall_s": c.rounded(sum(r["wall_s"] or 0 for r in rs), 2),
            "runs": rs,
        }
    ours_r, stock_r = result["tune_sana"], result["stock"]
    result["target_met"] = bool(
        ours_r["second_half_share"] <= 0.5 * ours_r["first_half_share"]
        and ours_r["second_half_share"] < stock_r["second_half_share"])
    result["tune_sana_record_agrees"] = all(
        r["recorded_diverged"] == r["diverged"] for r in ours_r["runs"])
    result["machine"] = c.machine(load0)
    for side in ("stock", "tune_sana"):
        r = result[side]
        c.say(f"{side:<9}: diverged share first half {r['first_half_share']:.0%} -> second "
              f"half {r['second_half_share']:.0%}; Optuna states {r['optuna_states']}")
    c.say(f"target (tune-sana second half <= half its first half, and < stock's second half): "
          f"{'met' if result['target_met'] else 'MISSED'}")
    c.emit(result)
    return result


if __name__ == "__main__":
    main()
