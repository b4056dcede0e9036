"""Search efficiency: trial-steps spent until a near-best configuration is found.

    .venv/bin/python bench/search_efficiency.py [--seeds 0,...,9] [--trials 60]
    TUNE_SANA_HOME=/tmp/tshome .venv/bin/python bench/search_efficiency.py --trial demo \\
        [--seeds 0,...,4] [--trials 24] [--recompute-optimum]

Two trials to search (--trial):

synthetic (the default): trials/synthetic.py: loss 0.1 + 1/(1 + speed*step) + seeded noise,
speed = exp(-|log10(lr) + 3|), so the best lr is 1e-3 at every step; NaN every step from step 5
when lr > 1e-2; it never checks itself. lr loguniform [1e-5, 1], 40 steps, val_loss every 5
steps. "Best" is the known optimum: the lowest val_loss the trial reports at lr = 1e-3 (no lr does
better at any step, the noise does not depend on lr). ASHA grace 10; 60 trials per run.

demo: the real trial (trials/sana_finetune.py) on the demo fine-tune (the demo base, pretrained
on shapes on a dark background, fine-tuned on shapes "on paper"; tune_sana/data/encoded.py),
with the quickstart's fixed settings (search_spaces/quickstart.yaml: demo-base, builtin:shapes,
120 steps, batch 8, eval_every 20, device cpu) plus threads 1 and seed 0, and a cheap subset of
its space: lr loguniform [1e-5, 1e-1], warmup_steps {0, 20}, max_grad_norm {null, 1.0}, precision
fp32 only (bf16-amp is ~6x slower than fp32 on a CPU: 28 s a trial against 5 s; fp16 modes
diverge or need the GPU to mean anything). The known optimum is the best of a dense grid over
that space, run in this process with the same trial seed the searches use: --grid-lrs (17)
log-spaced lrs x every warmup_steps x max_grad_norm (68 trials), then 4 more lrs between the
best point and its grid neighbours (6 minutes on one core; --seeds '' computes only it); cached in
bench/search_efficiency_optimum.json (--optimum) with the command that made it, the settings it
belongs to (every TrialConfig field, the space, DEMO_BASE_VERSION) and the grid's table. A run
reuses the cache when its settings match and the optimum's configuration, run once more (5 s),
reproduces its val_loss within 0.1%; otherwise it stops and says to pass --recompute-optimum
(a missing cache is computed and written; --optimum none computes it and writes nothing). ASHA
grace 40 (the quickstart's); 24 trials per run, 5 searcher seeds: a trial takes 5-10 s on 2
shared cores, so that is what fits in about 15 minutes (see the end).

A configuration counts as found when a trial reports a val_loss within 2% of the known optimum
(--tolerance); only trials run to (nearly) full length get there. Per searcher seed, on one local
Ray at concurrency 2:

  random:    plain Ray Tune random search (tune.loguniform / tune.choice, seeded), FIFO, no
             stopper: every trial runs all its steps (synthetic: NaN included; demo: until the
             trial program itself stops a diverged trial). Demo: once a trial has found one,
             the run starts no more trials and its running ones stop (to save time; what
             follows could not change its count).
  tune-sana: tune_sana.engine.sweep.run with TPE (DivergenceAwareOptunaSearch), ASHA (reduction
             factor 3) and the divergence stopper; no confirm stage.
Both get the same budget of --trials trials.

Compute until found = trial-steps (optimizer updates: rows with step >= 1; a demo trial's step-0
row, its base evaluated before any update, is not a step) reported by all trials up to the report
that found it, in the order they ran (tune-sana: each history row's time, as the trial made it;
random: when the driver received the row). A run that never finds one within its budget counts
as worse than every run that did (infinite, for the median; its steps run are listed); a median
over seeds that is not found is null and misses the target. Reported per side: the median over
seeds (and each seed) and how many runs found one; and the probability p that a random
configuration lands in the 2% window (synthetic: over 4000 lrs; demo: from the grid, each grid
lr standing for the log-lr interval around it), so the random side's expectation, about
steps / p, can be checked. Target: tune-sana's median at most one third of random search's.
The last line printed is one JSON object.

The full demo run (the command above with its defaults: 5 seeds x 24 trials a side, the cache
reused) took 13 minutes on 2 cores shared with other work (load 2-3.6); its figures are in
bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as c

DIVERGE_ABOVE = 1e-2
LR_RANGE = (1e-5, 1.0)

DEMO_LR_RANGE = (1e-5, 1e-1)
DEMO_CHOICES: dict[str, list[Any]] = {"warmup_steps": [0, 20], "max_grad_norm": [None, 1.0]}
DEMO_SPACE: dict[str, Any] = {"lr": {"loguniform": list(DEMO_LR_RANGE)},
                              **{k: {"choice": v} for k, v in DEMO_CHOICES.items()}}
OPTIMUM_FILE = Path(__file__).resolve().parent / "search_efficiency_optimum.json"
REPRODUCE_RTOL = 1e-3  # the cached optimum's val_loss, run again, must come back this close

# Per-mode defaults: (steps, grace, trials, seeds).
DEFAULTS: dict[str, tuple[int, int, int, str]] = {
    "synthetic": (40, 10, 60, "0,1,2,3,4,5,6,7,8,9"),
    "demo": (120, 40, 24, "0,1,2,3,4"),
}


# --- synthetic ------------------------------------------------------------------------------

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


# --- demo: the known optimum ----------------------------------------------------------------

def demo_fixed(args: argparse.Namespace) -> dict[str, Any]:
    """The quickstart's fixed settings (fp32, one thread, trial seed 0)."""
    return {"model": args.model, "data": "builtin:shapes", "steps": args.steps,
            "batch_size": 8, "eval_every": args.eval_every, "precision": "fp32",
            "device": "cpu", "threads": 1, "seed": 0}


def optimum_key(fixed: dict[str, Any], grid_lrs: int) -> dict[str, Any]:
    """What the cached optimum belongs to: every TrialConfig field the grid did not vary, the
    space, the grid and the demo base's version (the code and data the trial learns from)."""
    from tune_sana.config import DEMO_BASE, build_config
    from tune_sana.data.checkpoints import DEMO_BASE_VERSION

    settings = build_config(fixed, "bench fixed settings").as_row()
    for name in DEMO_SPACE:
        settings.pop(name)
    return {"trial": "sana_finetune", "settings": settings, "space": DEMO_SPACE,
            "grid_lrs": grid_lrs,
            "demo_base_version": DEMO_BASE_VERSION if fixed["model"] == DEMO_BASE else None}


def run_point(fixed: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """One grid trial, in this process: its point, outcome and best val_loss."""
    from trials import sana_finetune
    from tune_sana.config import build_config

    summary = sana_finetune.run(build_config({**fixed, **point}, "bench grid point"),
                                lambda _row: None)
    return {**point, "outcome": summary.get("outcome"),
            "best_val_loss": summary.get("best_val_loss"),
            "base_val_loss": summary.get("base_val_loss")}


def grid_lrs(n: int) -> list[float]:
    lo, hi = (math.log10(x) for x in DEMO_LR_RANGE)
    return [10 ** (lo + (hi - lo) * i / (n - 1)) for i in range(n)] if n > 1 else [10 ** lo]


def dense_grid(fixed: dict[str, Any], n_lrs: int) -> list[dict[str, Any]]:
    """Every grid point's result, then 4 lrs refining the best one (between it and its grid
    neighbours, at 1/3 and 2/3 of the way in log-lr)."""
    lrs = grid_lrs(n_lrs)
    rows = []
    for values in itertools.product(*DEMO_CHOICES.values()):
        choice = dict(zip(DEMO_CHOICES, values, strict=True))
        for lr in lrs:
            started = time.perf_counter()
            rows.append(run_point(fixed, {"lr": lr, **choice}))
            c.say(f"grid {_point_text(rows[-1])}: {rows[-1]['outcome']}, best val "
                  f"{_val_text(rows[-1]['best_val_loss'])} ({time.perf_counter() - started:.1f} s)")
    best = _best(rows)
    if best is None:
        return rows
    i = min(range(len(lrs)), key=lambda j: abs(math.log(lrs[j] / best["lr"])))
    near = [lrs[j] for j in (i - 1, i + 1) if 0 <= j < len(lrs)]
    for other in near:
        for share in (1 / 3, 2 / 3):
            lr = best["lr"] * (other / best["lr"]) ** share
            point = {**{k: best[k] for k in DEMO_CHOICES}, "lr": lr}
            rows.append({**run_point(fixed, point), "refine": True})
            c.say(f"refine {_point_text(rows[-1])}: best val "
                  f"{_val_text(rows[-1]['best_val_loss'])}")
    return rows


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in rows if isinstance(r.get("best_val_loss"), float)
            and math.isfinite(r["best_val_loss"])]
    return min(done, key=lambda r: r["best_val_loss"]) if done else None


def grid_hit_probability(rows: list[dict[str, Any]], threshold: float) -> float:
    """The chance a random configuration lands within the threshold, read off the grid: each
    categorical combination equally likely, each grid lr standing for the log-lr interval
    around it (half an interval at either end)."""
    combos = list(itertools.product(*DEMO_CHOICES.values()))
    total = 0.0
    for values in combos:
        line = sorted((r for r in rows if not r.get("refine")
                       and all(r[k] == v for k, v in zip(DEMO_CHOICES, values, strict=True))),
                      key=lambda r: r["lr"])
        if len(line) < 2:
            continue
        weights = [0.5 if j in (0, len(line) - 1) else 1.0 for j in range(len(line))]
        hits = [isinstance(r["best_val_loss"], float) and r["best_val_loss"] <= threshold
                for r in line]
        total += sum(w for w, hit in zip(weights, hits, strict=True) if hit) / sum(weights)
    return total / len(combos)


def known_optimum(args: argparse.Namespace, fixed: dict[str, Any],
                  command: str) -> dict[str, Any]:
    """The cached optimum if it matches these settings and reproduces; else computed (and
    cached, unless --optimum none)."""
    key = optimum_key(fixed, args.grid_lrs)
    path = None if args.optimum == "none" else Path(args.optimum)
    if path is not None and path.is_file() and not args.recompute_optimum:
        cached: dict[str, Any] = json.loads(path.read_text())
        if cached.get("key") != key:
            differs = _differences(key, cached.get("key") or {})
            raise SystemExit(
                f"{path}: the cached optimum was computed for other settings (differs in: "
                f"{', '.join(differs)}); pass --recompute-optimum to replace it (about "
                f"{len(grid_lrs(args.grid_lrs)) * 4 * 6 / 60:.0f} min), or --optimum "
                "<another file>")
        best = cached["optimum"]
        again = run_point(fixed, best["config"])["best_val_loss"]
        if not isinstance(again, float) or abs(again / best["best_val_loss"] - 1) > REPRODUCE_RTOL:
            raise SystemExit(
                f"{path}: the cached optimum {best['config']} gave val_loss "
                f"{best['best_val_loss']:.6f}, now {_val_text(again, '.6f')}: the trial's code "
                "or data changed; pass --recompute-optimum to recompute it")
        c.say(f"known optimum from {path} (reproduced: {again:.6f})")
        return cached
    started = time.perf_counter()
    rows = dense_grid(fixed, args.grid_lrs)
    best = _best(rows)
    if best is None:
        raise SystemExit("no grid point completed: there is no optimum to search for")
    cached = {
        "what": "bench/search_efficiency.py --trial demo: the known optimum, the best of a "
                "dense grid over the space with the fixed settings below (trial seed 0)",
        "command": command, "key": key,
        "optimum": {"config": {k: best[k] for k in DEMO_SPACE},
                    "best_val_loss": best["best_val_loss"],
                    "base_val_loss": best["base_val_loss"]},
        "computed": {"date": time.strftime("%Y-%m-%d"),
                     "wall_s": round(time.perf_counter() - started, 1),
                     "machine": c.machine()},
        "grid": [{k: (c.rounded(v, 6) if k == "best_val_loss" and v is not None else v)
                  for k, v in r.items() if k != "base_val_loss"} for r in rows],
    }
    if path is not None:
        path.write_text(_cache_text(cached))
        c.say(f"known optimum cached in {path}")
    return cached


# --- demo: the searches ---------------------------------------------------------------------

class _Found(Exception):
    """Ends a random-search trial once some trial of its run has found the optimum."""


def demo_trainable(config: dict[str, Any]) -> None:
    """The demo trial under plain Ray Tune, every row reported (None values left out). Stops
    once a trial of this run has reported a val_loss at or below ``_stop_below`` (a marker file
    tells the others): nothing after that changes the run's count."""
    from ray import tune

    from trials import sana_finetune
    from tune_sana.config import build_config

    marker, below = Path(config["_found_marker"]), float(config["_stop_below"])
    if marker.exists():
        return
    cfg = build_config({k: v for k, v in config.items() if not k.startswith("_")},
                       "bench config")

    def report(row: dict[str, Any]) -> None:
        tune.report({k: v for k, v in row.items() if v is not None})
        val = row.get("val_loss")
        if is_update(row) and isinstance(val, float) and val <= below:
            marker.touch()
        if marker.exists():
            raise _Found

    try:
        sana_finetune.run(cfg, report)
    except _Found:
        pass


def until_found(marker: Path, seed: int, concurrency: int) -> Any:
    """Ray Tune's random search (BasicVariantGenerator, seeded), which starts no more trials
    once ``marker`` exists."""
    from ray.tune.search import BasicVariantGenerator

    class UntilFound(BasicVariantGenerator):  # type: ignore[misc]
        def next_trial(self) -> Any:
            if marker.exists():
                self.set_finished()
                return None
            return super().next_trial()

    return UntilFound(random_state=seed, max_concurrent=concurrency)


# --- both -----------------------------------------------------------------------------------

def is_update(row: dict[str, Any]) -> bool:
    """A row of an optimizer update (step >= 1), not a base evaluation or a row without a step."""
    step = row.get("step")
    return step is not None and int(step) >= 1


def steps_to_found(rows: list[dict[str, Any]], ts_key: str, threshold: float) -> tuple[int, bool]:
    """Trial-steps received before and including the first val_loss <= threshold."""
    ordered = sorted((r for r in rows if is_update(r)), key=lambda r: float(r[ts_key]))
    for n, row in enumerate(ordered, start=1):
        val = row.get("val_loss")
        if isinstance(val, float) and math.isfinite(val) and val <= threshold:
            return n, True
    return len(ordered), False


def compare(seeds: list[int], threshold: float, concurrency: int, workdir: str | None,
            random_run: Callable[[int, Path], c.PlainRun],
            tune_sana_spec: Callable[[int], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per seed, random search and tune-sana's search; each run's trial-steps to found."""
    runs: dict[str, list[dict[str, Any]]] = {"random": [], "tune_sana": []}
    with c.workdir(workdir, "bench-search-") as work, c.local_ray(concurrency):
        for seed in seeds:
            plain = random_run(seed, work)
            ours = c.run_tune_sana(tune_sana_spec(seed), work, f"tune_sana-{seed}")
            for side, rows, key, wall in (("random", plain.rows, "received_at", plain.wall_s),
                                          ("tune_sana", ours.history, "timestamp",
                                           ours.wall_s)):
                steps, found = steps_to_found(rows, key, threshold)
                best_seen = min((float(r["val_loss"]) for r in rows
                                 if is_update(r) and isinstance(r.get("val_loss"), float)
                                 and math.isfinite(r["val_loss"])), default=None)
                total = sum(is_update(r) for r in rows)
                runs[side].append({"seed": seed, "steps_to_found": steps if found else None,
                                   "found": found, "total_steps": total,
                                   "trials": len({str(r["trial_id"]) for r in rows}),
                                   "best_val": c.rounded(best_seen, 5),
                                   "wall_s": c.rounded(wall, 2)})
                c.say(f"seed {seed} {side:<9}: {'found after' if found else 'NOT found in'} "
                      f"{steps} trial-steps (run total {total}, best val "
                      f"{_val_text(best_seen, '.5f')}, {wall:.1f} s)")
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
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
    return summary


def finish(args: argparse.Namespace, seeds: list[int], summary: dict[str, Any],
           head: dict[str, Any], load0: tuple[float, float, float],
           started: float) -> dict[str, Any]:
    """The result: ``head``, the medians and their ratio, each side's runs; said and emitted."""
    ours_m, rand_m = (summary["tune_sana"]["median_steps_to_found"],
                      summary["random"]["median_steps_to_found"])
    ratio = ours_m / rand_m if ours_m is not None and rand_m else None
    result = {
        **head, "tune_sana_median_steps": ours_m, "random_median_steps": rand_m,
        "ratio": c.rounded(ratio), "target_met": ratio is not None and ratio <= 1 / 3,
        "tune_sana": summary["tune_sana"], "random": summary["random"],
        "wall_s": round(time.perf_counter() - started, 1), "machine": c.machine(load0),
    }
    c.say(f"median trial-steps to within {args.tolerance:.0%} of the best: tune-sana {ours_m} "
          f"({summary['tune_sana']['found']}/{len(seeds)} found) vs random {rand_m} "
          f"({summary['random']['found']}/{len(seeds)} found): ratio "
          f"{'-' if ratio is None else format(ratio, '.3f')}; target <= 0.333: "
          f"{'met' if result['target_met'] else 'MISSED'}")
    c.emit(result)
    return result


# --- the two modes --------------------------------------------------------------------------

def run_synthetic(args: argparse.Namespace, seeds: list[int],
                  load0: tuple[float, float, float], started: float) -> dict[str, Any]:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    fixed = {"steps": args.steps, "diverge_above": DIVERGE_ABOVE, "eval_every": 5}
    best = known_best(fixed)
    threshold = best * (1 + args.tolerance)
    p_hit = hit_probability(fixed, threshold)
    c.say(f"known best val_loss {best:.5f} (lr 1e-3); found = val_loss <= {threshold:.5f}; a "
          f"random lr lands there with p = {p_hit:.3f} (expect ~{args.steps / p_hit:.0f} "
          f"steps for random search)" if p_hit else "no lr reaches the threshold")

    def random_run(seed: int, work: Path) -> c.PlainRun:
        return c.run_plain_ray(
            random_trainable,
            param_space={**fixed, "lr": tune.loguniform(*LR_RANGE)}, storage=work,
            name=f"random-{seed}", metric="val_loss", mode="min",
            num_samples=args.trials, max_concurrent=args.concurrency,
            search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=args.concurrency))

    def spec(seed: int) -> dict[str, Any]:
        return tune_sana_spec(args, seed, "synthetic", fixed,
                              {"lr": {"loguniform": list(LR_RANGE)}})

    runs = compare(seeds, threshold, args.concurrency, args.workdir, random_run, spec)
    head = {"benchmark": "search_efficiency", "trial": "synthetic", "seeds": seeds,
            "tolerance": args.tolerance, "best": "known optimum (lr 1e-3)",
            "best_val_loss": c.rounded(best, 6), "threshold": c.rounded(threshold, 6),
            "random_hit_probability": c.rounded(p_hit, 4)}
    return finish(args, seeds, summarize(runs), head, load0, started)


def tune_sana_spec(args: argparse.Namespace, seed: int, trial: str, fixed: dict[str, Any],
                   space: dict[str, Any]) -> dict[str, Any]:
    """tune-sana's side of one searcher seed: Optuna + ASHA on val_loss, one CPU a trial."""
    return {
        "trial": trial, "metric": "val_loss", "mode": "min",
        "search": {"algorithm": "optuna", "num_samples": args.trials, "seed": seed,
                   "max_concurrent": args.concurrency},
        "scheduler": {"type": "asha", "grace_period": args.grace, "reduction_factor": 3},
        "resources": {"cpu": 1, "gpu": 0}, "fixed": fixed, "space": space,
    }


def run_demo(args: argparse.Namespace, seeds: list[int], load0: tuple[float, float, float],
             started: float, command: str) -> dict[str, Any]:
    import torch
    from ray import tune

    c.ensure_model(args.model)
    torch.set_num_threads(1)
    fixed = demo_fixed(args)
    cached = known_optimum(args, fixed, command)
    best = float(cached["optimum"]["best_val_loss"])
    threshold = best * (1 + args.tolerance)
    p_hit = grid_hit_probability(cached["grid"], threshold)
    c.say(f"known optimum val_loss {best:.5f} at {cached['optimum']['config']}; found = "
          f"val_loss <= {threshold:.5f}; a random configuration lands there with p ~ "
          f"{p_hit:.3f} (from the grid" + (f"; expect ~{args.steps / p_hit:.0f} steps for "
                                            "random search)" if p_hit else ")"))

    def random_run(seed: int, work: Path) -> c.PlainRun:
        marker = work / f"random-{seed}.found"
        space = {**fixed, "lr": tune.loguniform(*DEMO_LR_RANGE),
                 **{k: tune.choice(v) for k, v in DEMO_CHOICES.items()},
                 "_found_marker": str(marker), "_stop_below": threshold}
        return c.run_plain_ray(
            demo_trainable, param_space=space, storage=work, name=f"random-{seed}",
            metric="val_loss", mode="min", num_samples=args.trials,
            max_concurrent=args.concurrency,
            search_alg=until_found(marker, seed, args.concurrency))

    def spec(seed: int) -> dict[str, Any]:
        return tune_sana_spec(args, seed, "sana_finetune", fixed, DEMO_SPACE)

    runs = (compare(seeds, threshold, args.concurrency, args.workdir, random_run, spec)
            if seeds else {"random": [], "tune_sana": []})  # --seeds '': the optimum only
    head = {"benchmark": "search_efficiency", "trial": "demo", "seeds": seeds,
            "trials": args.trials, "steps": args.steps, "tolerance": args.tolerance,
            "best": {"config": cached["optimum"]["config"],
                     "source": "dense grid" if args.optimum == "none" else str(args.optimum)},
            "best_val_loss": c.rounded(best, 6), "threshold": c.rounded(threshold, 6),
            "base_val_loss": c.rounded(cached["optimum"].get("base_val_loss"), 6),
            "random_hit_probability": c.rounded(p_hit, 4)}
    return finish(args, seeds, summarize(runs), head, load0, started)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial", choices=sorted(DEFAULTS), default="synthetic",
                        help="what to search: the synthetic trial or the real demo fine-tune")
    parser.add_argument("--seeds", help="searcher seeds, one pair of runs each (synthetic "
                        "0..9, demo 0..4); demo: '' computes the optimum only")
    parser.add_argument("--trials", type=int,
                        help="trials per run, both sides (synthetic 60, demo 24)")
    parser.add_argument("--steps", type=int, help="steps per trial (synthetic 40, demo 120)")
    parser.add_argument("--grace", type=int, help="ASHA grace period (synthetic 10, demo 40)")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--workdir", help="keep the runs here (default: a temp dir, removed)")
    demo = parser.add_argument_group("demo")
    demo.add_argument("--model", default="demo-base")
    demo.add_argument("--eval-every", type=int, default=20)
    demo.add_argument("--grid-lrs", type=int, default=17,
                      help="log-spaced lrs of the optimum's grid (x 4 categorical combinations)")
    demo.add_argument("--optimum", default=str(OPTIMUM_FILE),
                      help="the optimum's cache file; 'none': compute it, cache nothing")
    demo.add_argument("--recompute-optimum", action="store_true",
                      help="run the grid again and replace the cache")
    args = parser.parse_args(argv)
    steps, grace, trials, seeds_text = DEFAULTS[args.trial]
    args.steps = args.steps or steps
    args.grace = args.grace or grace
    args.trials = args.trials or trials
    seeds = [int(s) for s in (seeds_text if args.seeds is None else args.seeds).split(",")
             if s.strip()]
    load0 = c.load_now()
    started = time.perf_counter()
    c.ship_by_value(__name__)
    if args.trial == "demo":
        given = sys.argv[1:] if argv is None else argv
        command = shlex.join([".venv/bin/python", "bench/search_efficiency.py", *given])
        return run_demo(args, seeds, load0, started, command)
    return run_synthetic(args, seeds, load0, started)


def _differences(now: dict[str, Any], then: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys whose values differ, nested ones as parent.child."""
    out = []
    for k in sorted(set(now) | set(then)):
        a, b = now.get(k), then.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _cache_text(cached: dict[str, Any]) -> str:
    """The cache as JSON: indented, one line per grid point."""
    head = json.dumps({k: v for k, v in cached.items() if k != "grid"}, indent=1)
    rows = ",\n".join(f"  {json.dumps(r)}" for r in cached["grid"])
    return f'{head[:-2]},\n "grid": [\n{rows}\n ]\n}}\n'


def _point_text(row: dict[str, Any]) -> str:
    return (f"lr {row['lr']:.3g} warmup {row['warmup_steps']} clip "
            f"{row['max_grad_norm']}")


def _val_text(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
