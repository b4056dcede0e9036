"""The demo fine-tune has something to learn: improvement, seed spread, lr response, forgetting.

    TUNE_SANA_HOME=/tmp/tshome .venv/bin/python bench/demo_finetune.py [--lrs 1e-5,...,3e-2]
        [--seeds 0,1,2] [--precision fp32] [--steps 120] [--draws-seeds 16]

Runs the real trial program (trials/sana_finetune.run, in-process, no Ray) on the demo base and
the built-in data with the quickstart's fixed settings (--steps, batch 8, eval every 20), for
every lr in --lrs and every seed in --seeds. Per lr: outcome, mean and spread over seeds of the
best validation loss (fine-tune held-out set), improvement over the base (step 0), and the final
retain loss (held-out pretraining set: forgetting). Then:

  improvement     of the best lr's mean; target >= 0.30
  seed_spread     the sample standard deviation over seeds of the best lr's best_val_loss
  separation      (worst - best) mean best_val_loss among completed lrs / seed_spread; >= 10
  low_lr_share    improvement at the lowest lr / the best improvement: the share of the gain a
                  too-low lr reaches in the budget; "most of the gain unreached" is < 0.5
  high_lr         at the highest lr: diverged, or retain loss risen over the base (forgets)
  val_draws       the validation noise K draws remove: at the base model, the standard deviation
                  of the validation loss over --draws-seeds different sets of draws, for K = 1
                  and K = the default val_draws; variance_removed = 1 - (std_K / std_1)^2

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import _common as c


def run_grid(lrs: list[float], seeds: list[int], base: dict[str, Any]) -> list[dict[str, Any]]:
    from trials import sana_finetune
    from tune_sana.config import build_config

    out = []
    for lr in lrs:
        for seed in seeds:
            started = time.perf_counter()
            summary = sana_finetune.run(build_config({**base, "lr": lr, "seed": seed}, "bench"),
                                        lambda _row: None)
            out.append({"lr": lr, "seed": seed, **{k: summary.get(k) for k in (
                "outcome", "divergence_cause", "nonfinite_module", "best_val_loss",
                "base_val_loss", "improvement", "base_retain_loss", "final_retain_loss")}})
            c.say(f"lr {lr:.0e} seed {seed}: {summary['outcome']:<9} best val "
                  f"{summary.get('best_val_loss') or float('nan'):.4f} retain "
                  f"{summary.get('final_retain_loss') or float('nan'):.4f} "
                  f"({time.perf_counter() - started:.1f} s)")
    return out


def per_lr(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for lr in sorted({r["lr"] for r in rows}):
        runs = [r for r in rows if r["lr"] == lr]
        done = [r for r in runs if r["outcome"] == "completed"]
        vals = [float(r["best_val_loss"]) for r in done]
        retain = [float(r["final_retain_loss"]) for r in done
                  if r["final_retain_loss"] is not None]
        table.append({
            "lr": lr, "seeds": len(runs), "completed": len(done),
            "diverged": sum(r["outcome"] == "diverged" for r in runs),
            "causes": sorted({f"{r['divergence_cause']}@{r['nonfinite_module']}"
                              for r in runs if r["outcome"] == "diverged"}),
            "mean_best_val": statistics.fmean(vals) if vals else None,
            "seed_std": statistics.stdev(vals) if len(vals) > 1 else None,
            "mean_improvement": statistics.fmean(float(r["improvement"]) for r in done)
            if done else None,
            "mean_final_retain": statistics.fmean(retain) if retain else None,
        })
    return table


def validation_noise(draws: int, n_sets: int, base: dict[str, Any]) -> dict[str, Any]:
    """Std of the base's validation loss over ``n_sets`` different sets of draws, K=1 vs K."""
    import torch

    from trials import sana_finetune
    from tune_sana.config import build_config
    from tune_sana.training.validation import FixedValidation

    parts = sana_finetune.setup(build_config(base, "bench"))
    cfg = parts.config

    def spread(k: int) -> float:
        values = [FixedValidation(parts.data.val, cfg.val_batch_size, cfg.logit_mean,
                                  cfg.logit_std, cfg.flow_shift, torch.device("cpu"),
                                  draws=k, seed=1000 + s)(parts.model, torch.float32)
                  for s in range(n_sets)]
        return statistics.stdev(values)

    one, many = spread(1), spread(draws)
    return {"draws": draws, "sets": n_sets, "std_k1": c.rounded(one, 6),
            "std_k": c.rounded(many, 6), "variance_removed": c.rounded(1 - (many / one) ** 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="demo-base")
    parser.add_argument("--draws-seeds", type=int, default=16)
    args = parser.parse_args(argv)
    load0 = c.load_now()

    import torch

    from tune_sana.config import TrialConfig

    c.ensure_model(args.model)
    torch.set_num_threads(1)
    base = {"model": args.model, "data": "builtin:shapes", "steps": args.steps,
            "batch_size": args.batch_size, "eval_every": 20, "precision": args.precision,
            "device": "cpu", "threads": 1}
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    rows = run_grid(lrs, seeds, base)
    table = per_lr(rows)
    done = [t for t in table if t["completed"] == t["seeds"] and t["mean_best_val"] is not None]
    if not done:
        raise SystemExit("no lr completed in every seed: nothing to compare")
    best = min(done, key=lambda t: t["mean_best_val"])
    worst = max(done, key=lambda t: t["mean_best_val"])
    spread = best["seed_std"]
    base_val = rows[0]["base_val_loss"]
    base_retain = rows[0]["base_retain_loss"]
    low, high = table[0], table[-1]
    high_forgets = high["diverged"] > 0 or (
        high["mean_final_retain"] is not None and base_retain is not None
        and high["mean_final_retain"] > 1.1 * base_retain)
    low_share = (low["mean_improvement"] / best["mean_improvement"]
                 if low["mean_improvement"] is not None and best["mean_improvement"] else None)
    separation = ((worst["mean_best_val"] - best["mean_best_val"]) / spread
                  if spread else None)
    noise = validation_noise(int(TrialConfig.model_fields["val_draws"].default),
                             args.draws_seeds, {**base, "lr": best["lr"]})
    targets = {"improvement>=0.30": (best["mean_improvement"] or 0) >= 0.30,
               "separation>=10": separation is not None and separation >= 10,
               "low_lr_share<0.5": low_share is not None and low_share < 0.5,
               "high_lr_forgets_or_diverges": high_forgets}
    result = {
        "benchmark": "demo_finetune", "precision": args.precision, "steps": args.steps,
        "seeds": seeds, "base_val_loss": c.rounded(base_val, 5),
        "base_retain_loss": c.rounded(base_retain, 5),
        "best_lr": best["lr"], "improvement": c.rounded(best["mean_improvement"]),
        "seed_spread": c.rounded(spread, 6), "separation": c.rounded(separation, 1),
        "low_lr_share": c.rounded(low_share), "high_lr_forgets_or_diverges": high_forgets,
        "targets": targets, "target_met": all(targets.values()),
        "val_draws": noise,
        "per_lr": [{k: (c.rounded(v, 5) if isinstance(v, float) and k != "lr" else v)
                    for k, v in t.items()} for t in table],
        "machine": c.machine(load0),
    }
    c.say(f"base val {_f(base_val, '.4f')}, retain {_f(base_retain, '.4f')}; best lr "
          f"{best['lr']:.0e}: improvement {_f(best['mean_improvement'], '.1%')} over "
          f"{len(seeds)} seeds, seed spread {_f(spread, '.5f')}, best-worst separation "
          f"{_f(separation, '.1f')}x the spread; lowest lr reaches {_f(low_share, '.0%')} of the "
          f"gain; highest lr forgets or diverges: {high_forgets}; K={noise['draws']} validation "
          f"draws remove {_f(noise['variance_removed'], '.0%')} of the validation loss's "
          "variance")
    c.emit(result)
    return result


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
