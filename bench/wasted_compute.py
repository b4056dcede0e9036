"""Wasted compute on divergence: plain Ray Tune + ASHA vs tune-sana on the same real trials.

    TUNE_SANA_HOME=/tmp/tshome .venv/bin/python bench/wasted_compute.py [--steps 100]

One seeded set of configurations of the real trial (the demo base fine-tuned on the built-in
data; the grid --precisions x --lrs, 8 by default: pure fp16 and fp16 autocast at high lr
diverge for real, fp32 and bf16 autocast train) runs twice on one local Ray, same concurrency,
same ASHA (on val_loss, grace --grace, reduction factor 3), one CPU per trial:

  plain:     what a user writes with Ray Tune alone: Tuner + grid search + ASHAScheduler, and a
             bare training loop over the trial's own setup (sana_finetune.setup: model, data,
             batches, noise, precision policy, AdamW, schedule; the flow loss, the same clipping)
             that reports train_loss, grad_norm and val_loss each step as it computes them, NaN
             included: no health checks.
  tune-sana: tune_sana.engine.sweep.run with the same grid, ASHA and resources
             (trials/sana_finetune.py with its health checks, the engine's stopper and
             divergence-aware record).

Both loops draw the same batches, noise and timesteps from the same seed and clip with the same
function, so a configuration follows the same trajectory on both sides. A trial's divergence
onset is the first step whose loss, gradient or parameters went non-finite: for the plain run the
first step whose reported train_loss or val_loss is NaN/inf, or whose grad_norm is (except
under fp16 autocast, where GradScaler skips overflowing steps by design); for tune-sana the
step its check names (nonfinite_* causes). A trial's onset is the earlier of the two (parameters
that went NaN in step k's update show in the plain run's loss only at step k+1). Steps after
onset = last step run - onset. Reported per side: steps after onset (total and per diverged
trial), total steps, wall time; trials tune-sana stopped while their plain twin stayed finite
(loss spike, loss-scale collapse: lost work, not waste saved); and plain trials that went
non-finite and came back (GradScaler skipped the bad steps) to finish finite: their steps after
onset count here, yet tune-sana's default policy (on_nonfinite: stop) gave up a trial that
would have trained; on_nonfinite: skip with max_skips is the policy for keeping them.
Target: tune-sana runs 0 steps after onset. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import _common as c

from tune_sana.outcomes import Cause, Outcome

NONFINITE_CAUSES = {cause.value for cause in (Cause.NONFINITE_LOSS, Cause.NONFINITE_GRAD,
                                               Cause.NONFINITE_PARAMS, Cause.NONFINITE_METRIC)}
DIVERGED = Outcome.DIVERGED.value
KEYS = ("precision", "lr")


def bare_trainable(config: dict[str, Any]) -> None:
    """A plain training loop under Ray Tune: reports what it computes each step, checks nothing.

    Its parts (model, data, optimizer, schedule, scaler, batches, noise) are the trial's own
    setup's, so both sides follow one trajectory; the loop is a user's, without the trial's.
    """
    from ray import tune

    from trials import sana_finetune
    from tune_sana.config import build_config
    from tune_sana.training.guard import grad_norm

    cfg = build_config(config, source="bench config")
    parts = sana_finetune.setup(cfg)
    for step in range(1, cfg.steps + 1):  # a step counts updates, as the trial's rows do
        loss = parts.loss(parts.next_batch())
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        parts.scaler.unscale_(parts.optimizer)
        gnorm = grad_norm(parts.params, cfg.max_grad_norm)  # the trial's clip: same trajectory
        parts.scaler.step(parts.optimizer)  # a disabled scaler just calls optimizer.step()
        parts.scaler.update()
        parts.scheduler.step()
        row: dict[str, Any] = {"step": step, "train_loss": float(loss),
                               "grad_norm": float(gnorm)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row["val_loss"] = parts.validation()
        tune.report(row)


def plain_onset(rows: list[dict[str, Any]], precision: str) -> int | None:
    """First step a plain run's reports show non-finite (GradScaler overflow skips excepted)."""
    for row in rows:
        if c.nonfinite(row.get("train_loss")) or c.nonfinite(row.get("val_loss")):
            return int(row["step"])
        if precision != "fp16-amp" and c.nonfinite(row.get("grad_norm")):
            return int(row["step"])
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per trial (ASHA max_t)")
    parser.add_argument("--precisions", default="fp32,bf16-amp,fp16-amp,fp16")
    parser.add_argument("--lrs", default="3e-3,1e-2")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--grace", type=int, default=20, help="ASHA grace period (reports)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="demo-base")
    parser.add_argument("--seed", type=int, default=0, help="the trials' seed (both sides)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--workdir", help="keep both runs here (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    load0 = c.load_now()
    c.ship_by_value(__name__)

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    fixed = {"model": args.model, "data": "builtin:shapes", "steps": args.steps,
             "batch_size": args.batch_size, "eval_every": args.eval_every, "device": "cpu",
             "threads": 1, "seed": args.seed}
    configs = [{"precision": p, "lr": lr} for p, lr in itertools.product(precisions, lrs)]
    c.say(f"{len(configs)} configurations x {args.steps} steps of the real trial on "
          f"{args.model}, concurrency {args.concurrency}, ASHA grace {args.grace}")

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler


    spec = {
        "trial": "sana_finetune", "metric": "val_loss", "mode": "min",
        "search": {"algorithm": "grid", "num_samples": 1, "seed": 0,
                   "max_concurrent": args.concurrency},
        "scheduler": {"type": "asha", "grace_period": args.grace, "reduction_factor": 3,
                      "max_t": args.steps},
        "resources": {"cpu": 1, "gpu": 0},
        "fixed": fixed,
        "space": {"precision": {"grid": precisions}, "lr": {"grid": lrs}},
    }
    c.ensure_model(args.model)  # build the demo base once, outside both timings

    with c.workdir(args.workdir, "bench-wasted-") as work, c.local_ray(args.concurrency) as ray_s:
        plain = c.run_plain_ray(
            tune.with_parameters(_bare_with_fixed, fixed=fixed),
            param_space={"precision": tune.grid_search(precisions), "lr": tune.grid_search(lrs)},
            storage=work, name="plain", metric="val_loss", mode="min", num_samples=1,
            max_concurrent=args.concurrency,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=args.steps,
                                    grace_period=args.grace, reduction_factor=3))
        c.say(f"plain Ray Tune + ASHA: {plain.wall_s:.1f} s")
        ours = c.run_tune_sana(spec, work, "tune_sana")
        c.say(f"tune-sana: {ours.wall_s:.1f} s")

    plain_by_cfg = {c.config_key(cfg, KEYS): tid for tid, cfg in plain.configs.items()}
    plain_rows = c.by_trial(plain.rows)
    ours_hist = c.by_trial(ours.history)
    per_trial = []
    for trow in sorted(ours.trials, key=lambda r: c.config_key(r, KEYS)):
        key = c.config_key(trow, KEYS)
        prows = plain_rows.get(plain_by_cfg.get(key, ""), [])
        p_onset = plain_onset(prows, str(trow["precision"]))
        o_onset = (int(trow["diverged_step"]) if trow["outcome"] == DIVERGED
                   and trow["divergence_cause"] in NONFINITE_CAUSES else None)
        onsets = [x for x in (p_onset, o_onset) if x is not None]
        onset = min(onsets) if onsets else None
        p_last = max((int(r["step"]) for r in prows), default=0)
        o_last = max((int(r["step"]) for r in ours_hist.get(trow["trial_id"], [])), default=0)
        p_vals = [r["val_loss"] for r in prows if "val_loss" in r]
        per_trial.append({
            "precision": trow["precision"], "lr": trow["lr"], "onset": onset,
            "plain_onset": p_onset, "tune_sana_onset": o_onset,
            "plain_steps": p_last, "tune_sana_steps": o_last,
            "plain_after_onset": max(0, p_last - onset) if onset is not None else 0,
            "tune_sana_after_onset": max(0, o_last - onset) if onset is not None else 0,
            "tune_sana_outcome": trow["outcome"], "cause": trow["divergence_cause"],
            "plain_final_val": c.rounded(p_vals[-1]) if p_vals else None,
            "tune_sana_final_val": c.rounded(trow["final_val_loss"]),
            "stopped_while_finite": trow["outcome"] == DIVERGED and onset is None,
            # a non-finite step the plain run came back from (GradScaler skipped it)
            "plain_recovered": p_onset is not None and bool(p_vals)
            and not c.nonfinite(p_vals[-1]) and p_last == args.steps,
        })

    diverged = [t for t in per_trial if t["onset"] is not None]
    finite_same = [t for t in per_trial if t["onset"] is None and t["plain_steps"] == args.steps
                   and t["tune_sana_steps"] == args.steps]
    result = {
        "benchmark": "wasted_compute",
        "configs": len(configs), "steps_per_trial": args.steps, "model": args.model,
        "diverged_trials": len(diverged),
        "plain_steps_after_onset": sum(t["plain_after_onset"] for t in per_trial),
        "tune_sana_steps_after_onset": sum(t["tune_sana_after_onset"] for t in per_trial),
        "plain_total_steps": sum(t["plain_steps"] for t in per_trial),
        "tune_sana_total_steps": sum(t["tune_sana_steps"] for t in per_trial),
        "plain_wall_s": c.rounded(plain.wall_s, 2),
        "tune_sana_wall_s": c.rounded(ours.wall_s, 2),
        "stopped_while_finite": sum(t["stopped_while_finite"] for t in per_trial),
        "plain_recovered_after_onset": sum(t["plain_recovered"] for t in per_trial),
        "same_final_val_when_finite": all(
            t["plain_final_val"] == t["tune_sana_final_val"] for t in finite_same),
        "target_met": sum(t["tune_sana_after_onset"] for t in per_trial) == 0,
        "ray_init_s": c.rounded(ray_s, 2),
        "per_trial": per_trial,
        "machine": c.machine(load0),
    }
    c.say(f"{'config':<18} {'onset':>5} {'plain steps':>11} {'after':>5} "
          f"{'tune-sana steps':>15} {'after':>5}  outcome")
    for t in per_trial:
        c.say(f"{t['precision'] + ' ' + format(t['lr'], '.0e'):<18} "
              f"{'-' if t['onset'] is None else t['onset']:>5} {t['plain_steps']:>11} "
              f"{t['plain_after_onset']:>5} {t['tune_sana_steps']:>15} "
              f"{t['tune_sana_after_onset']:>5}  {t['tune_sana_outcome']}"
              f"{' (' + t['cause'] + ')' if t['cause'] else ''}")
    c.say(f"steps after onset: plain {result['plain_steps_after_onset']}, tune-sana "
          f"{result['tune_sana_steps_after_onset']} (target 0: "
          f"{'met' if result['target_met'] else 'MISSED'}); total steps plain "
          f"{result['plain_total_steps']} vs {result['tune_sana_total_steps']}; wall "
          f"{plain.wall_s:.1f} s vs {ours.wall_s:.1f} s")
    for t in per_trial:
        if t["plain_recovered"]:
            c.say(f"note: {t['precision']} lr {t['lr']:g} went non-finite at step {t['onset']} "
                  f"and recovered in the plain run (final val {t['plain_final_val']}); "
                  "tune-sana stopped it there (on_nonfinite: stop; skip with max_skips keeps "
                  "such trials)")
    c.emit(result)
    return result


def _bare_with_fixed(config: dict[str, Any], fixed: dict[str, Any]) -> None:
    bare_trainable({**fixed, **config})


if __name__ == "__main__":
    main()
