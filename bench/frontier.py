"""Stability frontier: the frontier search against a dense log grid over the same lrs and seeds.

    .venv/bin/python bench/frontier.py [--trial synthetic] [--spread 0.3] [--steps 40]
    TUNE_SANA_HOME=/tmp/tshome .venv/bin/python bench/frontier.py --trial demo \\
        [--space search_spaces/frontier.yaml] [--set key=value ...] [--grid-workers 2]

The question (issue 13): for each combination of the categorical settings of a space (a
*combo*: precision x attention_fp32 x ...), the largest learning rate at which a trial stays
finite for its whole step budget in every one of R seeds. Two ways to answer it, in one run,
on the same space, lr range and trial seeds:

  grid:      every combo x every lr of a log grid over the space's lr bounds (both included;
             neighbouring lrs a factor --grid-ratio apart, default the search's tolerance, so the
             grid resolves the boundary as finely as the search must) x every seed, each a real
             run of the trial program in this process (--grid-workers processes for the demo).
             A grid trial stops at its first non-finite number as the engine would stop it
             (the demo's trial stops itself; the synthetic one is stopped at its first NaN row),
             so a diverged grid trial costs the steps up to and including the diverged one.
  frontier:  tune_sana.engine.sweep.run with search.algorithm frontier (scheduler fifo,
             search.frontier.tolerance and .seeds), through one local Ray at --concurrency;
             its answer is read from frontier.parquet (record/readers.read_frontier).

The grid's boundary, per combo. An lr of the grid is *finite* when the trial completed without a
non-finite number in every seed (a trial that ended otherwise, diverged, collapsed or raised,
makes its lr not finite, as such a probe counts against an lr in the search). The grid's
boundary is the last grid lr of the unbroken run of finite lrs that starts at the lower bound:
g = l[k-1], where l[k] is the lowest grid lr that is not finite (it failed in at least one
seed). k = 0: the grid is unstable at the lower bound (no g); no such k: stable to the upper
bound (g = the upper bound). Finite lrs above l[k] are counted (``grid.finite_above``:
divergence that is not monotone in lr) but do not move g: the search follows the same rule
(its stable end is the highest stable lr below the lowest diverged one).

Agreement, per combo. Place both answers on the grid's index scale (pos(lr) = log(lr / low) /
log(grid ratio); an open end is one grid step outside the range: unstable_at_lower has its
stable end at -1, stable_to_upper its diverged end at n + 1). The grid's boundary index
gi = k - 1 (-1 when unstable at the lower bound, n when stable to the upper bound). It is
*inside* the search's bracket when stable_lr <= g < diverged_lr (pos(stable_lr) <= gi <
pos(diverged_lr)), and *adjacent* when it is the grid point just outside that range at either
end (the grid point just below stable_lr, or the first one at or above diverged_lr); anything
else disagrees. For a trial whose divergence is monotone in lr
and the same in every run, the grid's g lies below the true boundary B and within one grid step
of it, and the search's bracket holds B, so g is inside or (when the bracket and g straddle a
grid point) adjacent.

Trial-steps: optimizer updates, as in the other benchmarks (a step-0 row, the base evaluated
before any update, is not a step). Grid: the sum of every grid trial's steps run (a diverged
trial's up to and including its diverged step). Search: trials.parquet's steps_run over the run's
frontier trials (cross-checked against frontier.parquet's trial_steps and the history rows with
step >= 1; all three are reported).

Targets (``target_met`` is all three):
  bracketed: every combo settled (bracketed, stable_to_upper or unstable_at_lower), and every
             bracketed combo within the tolerance (diverged_lr / stable_lr <= tolerance);
  agree:     every combo's grid boundary inside or adjacent to the search's bracket;
  cost:      the search's trial-steps at most 1/4 of the grid's.

Two trials (--trial):

synthetic (the default): trials/synthetic.py. It reports NaN from step 5 when lr is above its
boundary diverge_above * 10**(spread * u), u in [-1, 1) drawn from the trial seed
(``diverge_spread``), so the boundary differs between seeds. The space is lr loguniform
[1e-5, 1] and a choice of diverge_above (--diverge-above, default 1e-7,1e-4,3e-3,1e-1,10: one
combo unstable at the lower bound, three bracketed, one stable to the upper bound), 40 steps,
2 seeds, tolerance 1.25. The grid is 53 lrs x 2 seeds x 5 combos, run in process in about a
second; the search takes a minute or two on 2 cores (Ray's per-trial overhead).

demo: the real trial (trials/sana_finetune.py) on the space of search_spaces/frontier.yaml (the
demo base on the built-in fine-tune, on the CPU), cut by default (DEMO_SET) to precision {fp32,
fp16-amp} x attention_fp32 {false, true} and lr [1e-3, 1] so that the grid (32 lrs x 2 seeds x 4
combos) fits in minutes rather than hours; --set key=value replaces the cut (the syntax of
``tune-sana sweep --set``, dotted keys included), --full-space runs the file as it is. The grid
runs in --grid-workers processes (default 2), one torch thread per trial; the search as the
space file says. See bench/README.md for the figures and the time it takes.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import math
import multiprocessing
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common as c

FRONTIER_SPACE = c.ROOT / "search_spaces" / "frontier.yaml"
# The demo's default cut of the space file, so that the grid fits in about 10 minutes on 2
# cores: fp32 and fp16-amp (with and without attention_fp32), lr from 1e-3 (fp16-amp without
# attention_fp32 diverges at step 0 at every lr; below 1e-3 every other combo is stable).
DEMO_SET = ["space.precision={choice: [fp32, fp16-amp]}",
            "space.lr={loguniform: [1.0e-3, 1.0]}"]
SYNTHETIC_LR_RANGE = (1e-5, 1.0)
SYNTHETIC_DIVERGE_ABOVE = "1e-7,1e-4,3e-3,1e-1,10"
COST_TARGET = 0.25  # the search's trial-steps over the grid's, at most
SETTLED = ("bracketed", "stable_to_upper", "unstable_at_lower")
_EPS = 1e-9  # float slack on the grid's index scale


# --- the space --------------------------------------------------------------------------------

def synthetic_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The synthetic space: lr x diverge_above (a boundary per combo, spread over seeds)."""
    diverge_above = [float(x) for x in args.diverge_above.split(",") if x.strip()]
    return {
        "trial": "synthetic", "metric": "val_loss", "mode": "min",
        "search": {"algorithm": "frontier", "num_samples": args.num_samples,
                   "max_concurrent": args.concurrency,
                   "frontier": {"tolerance": args.tolerance, "seeds": args.seeds}},
        "scheduler": {"type": "fifo"}, "resources": {"cpu": 1, "gpu": 0},
        "fixed": {"steps": args.steps, "step_seconds": 0.0, "eval_every": 5,
                  "diverge_spread": args.spread},
        "space": {"lr": {"loguniform": [args.lr_low, args.lr_high]},
                  "diverge_above": {"choice": diverge_above}},
    }


def demo_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The space file with --set overrides applied, as a plain mapping (validated later)."""
    from tune_sana.engine.space import apply_overrides, read_space_file

    overrides = {}
    given = args.set if args.set is not None else [] if args.full_space else DEMO_SET
    args.set = given
    for item in given:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item}: give key=value")
        overrides[key.strip()] = _yaml_value(text)
    return apply_overrides(read_space_file(args.space), overrides)


def _yaml_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


class Space:
    """What both sides share, read off a validated spec: the lr key and bounds, the combos,
    the trial seeds, the tolerance, the fixed settings."""

    def __init__(self, raw: dict[str, Any]) -> None:
        from tune_sana.engine.space import parse_spec

        spec = parse_spec(raw, source="bench:frontier")
        if spec.search.algorithm != "frontier":
            raise SystemExit(f"the space's search.algorithm is {spec.search.algorithm}; this "
                             "benchmark needs frontier")
        self.raw, self.spec = raw, spec
        self.trial = spec.trial
        self.lr_key = next(k for k, d in spec.space.items() if d.kind == "loguniform")
        low, high = spec.space[self.lr_key].loguniform or (0.0, 0.0)
        self.low, self.high = float(low), float(high)
        keys = [k for k, d in spec.space.items() if d.kind in ("choice", "grid")]
        self.combos = [dict(zip(keys, values, strict=True))
                       for values in itertools.product(*(spec.space[k].values() for k in keys))]
        settings = spec.search.frontier
        self.tolerance = float(settings.tolerance) if settings else 1.25
        first = int(spec.fixed.get("seed", 0))  # the trial's default seed is 0 (both trials)
        self.seeds = list(range(first, first + (settings.seeds if settings else 2)))
        self.fixed = dict(spec.fixed)


def label(combo: dict[str, Any]) -> str:
    """"precision fp16-amp, attention_fp32 true", as frontier.parquet's label."""
    def text(v: Any) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return ", ".join(f"{k} {text(v)}" for k, v in combo.items())


# --- the grid -----------------------------------------------------------------------------------

def grid_lrs(low: float, high: float, ratio: float) -> list[float]:
    """Log-spaced lrs from low to high, both included, neighbours at most ``ratio`` apart."""
    n = max(1, math.ceil(math.log(high / low) / math.log(ratio) - _EPS))
    return [low * (high / low) ** (i / n) for i in range(n + 1)]


class _Stop(Exception):
    """Ends a synthetic grid trial at its first non-finite number (what the engine's stopper
    does to a trial that never checks itself)."""


def run_point(trial: str, config: dict[str, Any]) -> dict[str, Any]:
    """One grid trial in this process: outcome, steps run (updates), and where it diverged."""
    started = time.perf_counter()
    try:
        out = (_synthetic_point(config) if trial == "synthetic"
               else _trial_config_point(trial, config))
    except Exception as err:  # as the engine does: the trial ends as error, the grid goes on
        out = {"outcome": "error", "steps": 0, "cause": f"{type(err).__name__}: {err}"[:200],
               "step": None, "module": None}
    return {**out, "wall_s": round(time.perf_counter() - started, 3)}


def _synthetic_point(config: dict[str, Any]) -> dict[str, Any]:
    from trials import synthetic

    last: dict[str, Any] = {}

    def report(row: dict[str, Any]) -> None:
        last.clear()
        last.update(row)
        if any(c.nonfinite(v) for v in row.values()):
            raise _Stop

    try:
        synthetic.run(config, report)
    except _Stop:
        step = int(last.get("step", 0))
        return {"outcome": "diverged", "steps": step, "cause": "nonfinite_metric",
                "step": step, "module": None}
    return {"outcome": "completed", "steps": int(last.get("step", 0)), "cause": None,
            "step": None, "module": None}


def _trial_config_point(trial: str, config: dict[str, Any]) -> dict[str, Any]:
    import torch

    from tune_sana.config import build_config
    from tune_sana.engine.sweep import load_trial

    torch.set_num_threads(int(config.get("threads") or 1))
    summary = load_trial(trial)(build_config(config, "bench grid point"), lambda _row: None)
    # diverged, or collapsed (finite but wrecked) where the trial program says so: both count
    # as unstable, as they do for the search
    diverged = summary.get("outcome") not in ("completed", "error")
    return {"outcome": str(summary.get("outcome")), "steps": int(summary.get("steps_run") or 0),
            "cause": summary.get("divergence_cause") if diverged else None,
            "step": summary.get("diverged_step") if diverged else None,
            "module": summary.get("nonfinite_module") if diverged else None}


def _point_job(job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return run_point(*job)


def run_grid(space: Space, lrs: Sequence[float], workers: int) -> list[dict[str, Any]]:
    """Every combo x grid lr x seed, each a real trial; rows in that order."""
    points = [(i, lr, seed) for i in range(len(space.combos)) for lr in lrs
              for seed in space.seeds]
    jobs = [(space.trial, {**space.fixed, **space.combos[i], space.lr_key: lr, "seed": seed})
            for i, lr, seed in points]
    rows: list[dict[str, Any]] = []
    said = time.perf_counter()

    def keep(point: tuple[int, float, int], out: dict[str, Any]) -> None:
        nonlocal said
        i, lr, seed = point
        rows.append({"combo": i, "lr": lr, "seed": seed, **out})
        if space.trial != "synthetic" and (time.perf_counter() - said > 30
                                           or len(rows) == len(points)):
            said = time.perf_counter()
            c.say(f"grid: {len(rows)}/{len(points)} trials ({label(space.combos[i])}, lr "
                  f"{lr:.3g}, seed {seed}: {out['outcome']} after {out['steps']} steps, "
                  f"{out['wall_s']:.1f} s)")

    if workers <= 1:
        for point, job in zip(points, jobs, strict=True):
            keep(point, run_point(*job))
        return rows
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no Ray, no torch state
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for point, out in zip(points, pool.map(_point_job, jobs), strict=True):
            keep(point, out)
    return rows


def grid_boundary(rows: Sequence[dict[str, Any]], lrs: Sequence[float],
                  seeds: Sequence[int]) -> dict[str, Any]:
    """One combo's grid answer (the rule in the module docstring), its cost and what it saw
    at its first diverged lr."""
    finite = []
    for lr in lrs:
        at = [r for r in rows if r["lr"] == lr]
        assert sorted(r["seed"] for r in at) == sorted(seeds), "every seed runs at every lr"
        finite.append(all(r["outcome"] == "completed" for r in at))
    k = next((i for i, ok in enumerate(finite) if not ok), len(lrs))
    first_bad = None
    if k < len(lrs):
        at = sorted((r for r in rows if r["lr"] == lrs[k]), key=lambda r: r["seed"])
        first_bad = next(r for r in at if r["outcome"] != "completed")
    verdict = ("unstable_at_lower" if k == 0 else "stable_to_upper" if k == len(lrs)
               else "bracketed")
    return {
        "verdict": verdict, "index": k - 1,
        "stable_lr": lrs[k - 1] if k > 0 else None,
        "diverged_lr": lrs[k] if k < len(lrs) else None,
        "diverged_count": (sum(r["outcome"] != "completed" for r in rows if r["lr"] == lrs[k])
                           if k < len(lrs) else None),
        "cause": first_bad["cause"] if first_bad else None,
        "module": first_bad["module"] if first_bad else None,
        "finite_above": sum(finite[k + 1:]),
        "trials": len(rows), "trial_steps": sum(int(r["steps"]) for r in rows),
        "errors": sum(r["outcome"] == "error" for r in rows),
    }


# --- the comparison -----------------------------------------------------------------------------

def agreement(grid: dict[str, Any], front: dict[str, Any], low: float, ratio: float,
              n: int) -> str:
    """inside | adjacent | disagree | unsettled: where the grid's boundary index lies against
    the search's bracket on the grid's index scale (module docstring)."""
    verdict = front.get("verdict")
    if verdict not in SETTLED:
        return "unsettled"

    def pos(lr: float) -> float:
        return math.log(lr / low) / math.log(ratio)

    stable, diverged = front.get("stable_lr"), front.get("diverged_lr")
    lo = -1.0 if stable is None else pos(float(stable))
    hi = n + 1.0 if diverged is None else pos(float(diverged))
    # inside: stable_lr <= g < diverged_lr (g == diverged_lr would be the same lr finite in the
    # grid and diverged in the search: one grid point off, so adjacent)
    first, last = math.ceil(lo - _EPS), math.ceil(hi - _EPS) - 1
    gi = int(grid["index"])
    if first <= gi <= last:
        return "inside"
    if gi in (first - 1, last + 1):
        return "adjacent"
    return "disagree"


def frontier_rows(run_dir: Path) -> list[dict[str, Any]]:
    from tune_sana.record.readers import read_frontier

    table = read_frontier(run_dir)
    if table is None:
        raise SystemExit(f"{run_dir}: no frontier.parquet: did the search run as frontier?")
    return list(table.to_pylist())


def match(combo: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The frontier.parquet row of a combo (by its combo_json)."""
    return next((r for r in rows if json.loads(r["combo_json"]) == combo), None)


def frontier_steps(run: c.SweepRun) -> dict[str, Any]:
    """The search's trial-steps three ways: trials.parquet steps_run (the figure), history rows
    with step >= 1, and per combo (by combo_id) for the table."""
    probes = [t for t in run.trials if t.get("stage") in (None, "frontier")]
    ids = {str(t["trial_id"]) for t in probes}
    history = sum(1 for r in run.history if str(r["trial_id"]) in ids
                  and r.get("step") is not None and int(r["step"]) >= 1)
    per_combo: dict[str, dict[str, int]] = {}
    for t in probes:
        entry = per_combo.setdefault(str(t.get("combo_id")), {"trials": 0, "trial_steps": 0})
        entry["trials"] += 1
        entry["trial_steps"] += int(t.get("steps_run") or 0)
    return {"trials": len(probes), "trial_steps": sum(int(t.get("steps_run") or 0)
                                                      for t in probes),
            "history_steps": history, "per_combo": per_combo}


def compare(space: Space, lrs: Sequence[float], ratio: float, grid_rows: Sequence[dict[str, Any]],
            front_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per combo: the search's answer, the grid's, where they agree, the costs."""
    out = []
    n = len(lrs) - 1
    for i, combo in enumerate(space.combos):
        grid = grid_boundary([r for r in grid_rows if r["combo"] == i], lrs, space.seeds)
        front = match(combo, front_rows) or {"verdict": "missing"}
        ratio_ = front.get("ratio")
        out.append({
            "combo": combo, "label": label(combo), "combo_id": front.get("combo_id"),
            "verdict": front.get("verdict"), "stable_lr": _r(front.get("stable_lr")),
            "diverged_lr": _r(front.get("diverged_lr")), "ratio": _r(ratio_),
            "within_tolerance": (front.get("verdict") in SETTLED and (
                front.get("verdict") != "bracketed"
                or (ratio_ is not None and ratio_ <= space.tolerance * (1 + _EPS)))),
            "diverged_count": front.get("diverged_count"),
            "diverged_seeds": front.get("diverged_seeds"),
            "cause": front.get("divergence_cause"), "module": front.get("nonfinite_module"),
            "trials": front.get("trials"), "trial_steps": front.get("trial_steps"),
            "grid": {k: (_r(v) if k in ("stable_lr", "diverged_lr") else v)
                     for k, v in grid.items()},
            "agreement": agreement(grid, front, space.low, ratio, n),
        })
    return out


def _r(value: Any, digits: int = 6) -> float | None:
    """An lr or ratio for the JSON: 6 significant digits."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(f"{float(value):.{digits}g}")


def summarize(space: Space, combos: list[dict[str, Any]], grid_steps: int, grid_trials: int,
              steps: dict[str, Any]) -> dict[str, Any]:
    """The three targets and the totals."""
    bracketed = all(e["within_tolerance"] for e in combos)
    agree = all(e["agreement"] in ("inside", "adjacent") for e in combos)
    ours = int(steps["trial_steps"])
    cost = ours / grid_steps if grid_steps else None
    return {
        "targets": {"bracketed": bracketed, "agree": agree,
                    "cost": cost is not None and cost <= COST_TARGET},
        "target_met": bracketed and agree and cost is not None and cost <= COST_TARGET,
        "frontier_trial_steps": ours, "grid_trial_steps": grid_steps,
        "cost_ratio": c.rounded(cost), "cost_target": COST_TARGET,
        "frontier_trials": steps["trials"], "grid_trials": grid_trials,
        "frontier_history_steps": steps["history_steps"],
        "frontier_parquet_steps": sum(int(e["trial_steps"] or 0) for e in combos),
        "verdicts": {v: sum(e["verdict"] == v for e in combos)
                     for v in sorted({str(e["verdict"]) for e in combos})},
        "agreements": {v: sum(e["agreement"] == v for e in combos)
                       for v in sorted({e["agreement"] for e in combos})},
    }


def say_table(combos: list[dict[str, Any]], seeds: int) -> None:
    c.say(f"{'combo':<44} {'search verdict':<18} {'stable':>9} {'diverged':>9} {'ratio':>6} "
          f"{'steps':>6} | {'grid stable':>11} {'grid div':>9} {'steps':>6}  agreement")
    for e in combos:
        g = e["grid"]
        c.say(f"{e['label'][:44]:<44} {str(e['verdict']):<18} {_lr(e['stable_lr']):>9} "
              f"{_lr(e['diverged_lr']):>9} {_num(e['ratio'], '.3f'):>6} "
              f"{_num(e['trial_steps'], 'd'):>6} | {_lr(g['stable_lr']):>11} "
              f"{_lr(g['diverged_lr']):>9} {g['trial_steps']:>6}  {e['agreement']}"
              + (f" (grid: {g['finite_above']} finite lrs above its first diverged one)"
                 if g["finite_above"] else ""))
        if e["cause"] or g["cause"]:
            c.say(f"{'':<44}   diverges: search {e['cause']} {e['module'] or ''} "
                  f"({e['diverged_count']}/{e['diverged_seeds']} seeds); grid {g['cause']} "
                  f"{g['module'] or ''} ({g['diverged_count']}/{seeds} seeds)")


def _lr(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# --- the run ------------------------------------------------------------------------------------

def run(args: argparse.Namespace, raw: dict[str, Any], load0: tuple[float, float, float],
        started: float) -> dict[str, Any]:
    space = Space(raw)
    ratio = args.grid_ratio or space.tolerance
    lrs = grid_lrs(space.low, space.high, ratio)
    ratio = (space.high / space.low) ** (1 / (len(lrs) - 1))  # the grid's actual spacing
    c.say(f"space: {space.trial}, {space.lr_key} [{space.low:g}, {space.high:g}], "
          f"{len(space.combos)} combos, seeds {space.seeds}, tolerance {space.tolerance}; "
          f"grid: {len(lrs)} lrs (ratio {ratio:.4f}) x {len(space.seeds)} seeds x "
          f"{len(space.combos)} combos = {len(lrs) * len(space.seeds) * len(space.combos)} "
          "trials")
    if space.trial != "synthetic":
        c.ensure_model(str(space.fixed.get("model", "")))

    t0 = time.perf_counter()
    grid_rows = run_grid(space, lrs, args.grid_workers)
    grid_wall = time.perf_counter() - t0
    grid_steps = sum(int(r["steps"]) for r in grid_rows)
    c.say(f"grid: {len(grid_rows)} trials, {grid_steps} trial-steps, {grid_wall:.1f} s")

    c.ship_by_value(__name__)
    with c.workdir(args.workdir, "bench-frontier-") as work, c.local_ray(args.concurrency):
        front = c.run_tune_sana(raw, work, "frontier")
        front_rows = frontier_rows(Path(front.run_dir))
    c.say(f"frontier search: {len(front.trials)} trials, {front.wall_s:.1f} s")

    combos = compare(space, lrs, ratio, grid_rows, front_rows)
    say_table(combos, len(space.seeds))
    steps = frontier_steps(front)
    summary = summarize(space, combos, grid_steps, len(grid_rows), steps)
    c.say(f"trial-steps: frontier {summary['frontier_trial_steps']} (frontier.parquet "
          f"{summary['frontier_parquet_steps']}, history {summary['frontier_history_steps']}) "
          f"vs grid {grid_steps}: ratio {_num(summary['cost_ratio'], '.3f')} (target <= "
          f"{COST_TARGET}); bracketed within {space.tolerance}: "
          f"{summary['targets']['bracketed']}; grid inside or adjacent: "
          f"{summary['targets']['agree']}; targets {'met' if summary['target_met'] else 'MISSED'}")
    result = {
        "benchmark": "frontier", "trial": args.trial, "space": args.space_name,
        "set": args.set if args.trial == "demo" else None,
        "lr_key": space.lr_key, "lr_range": [space.low, space.high], "seeds": space.seeds,
        "tolerance": space.tolerance, "grid_lrs": len(lrs), "grid_ratio": c.rounded(ratio, 5),
        "combos": combos, **summary,
        "grid_wall_s": round(grid_wall, 1), "frontier_wall_s": round(front.wall_s, 1),
        "wall_s": round(time.perf_counter() - started, 1), "machine": c.machine(load0),
    }
    c.emit(result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial", choices=("synthetic", "demo"), default="synthetic")
    parser.add_argument("--grid-ratio", type=float,
                        help="neighbouring grid lrs at most this factor apart (default: the "
                        "search's tolerance)")
    parser.add_argument("--grid-workers", type=int,
                        help="processes running the grid; 1 = in this process (the default "
                        "for synthetic; demo: 2)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="synthetic: the search's max_concurrent and Ray's CPUs; demo: "
                        "Ray's CPUs (the space file sets max_concurrent)")
    parser.add_argument("--workdir", help="keep the search's run here (default: a temp dir)")
    syn = parser.add_argument_group("synthetic")
    syn.add_argument("--diverge-above", default=SYNTHETIC_DIVERGE_ABOVE,
                     help="the combos: a choice of the synthetic trial's boundary")
    syn.add_argument("--spread", type=float, default=0.3,
                     help="diverge_spread: each seed's boundary is diverge_above * "
                     "10**(spread * u), u in [-1, 1) from the seed")
    syn.add_argument("--steps", type=int, default=40)
    syn.add_argument("--lr-low", type=float, default=SYNTHETIC_LR_RANGE[0])
    syn.add_argument("--lr-high", type=float, default=SYNTHETIC_LR_RANGE[1])
    syn.add_argument("--tolerance", type=float, default=1.25)
    syn.add_argument("--seeds", type=int, default=2, help="search.frontier.seeds")
    syn.add_argument("--num-samples", type=int, default=1000,
                     help="the search's cap on trials (it ends by itself before)")
    demo = parser.add_argument_group("demo")
    demo.add_argument("--space", default=str(FRONTIER_SPACE))
    demo.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="override the space file, as tune-sana sweep --set (given: replaces "
                      f"the default cut {DEMO_SET})")
    demo.add_argument("--full-space", action="store_true",
                      help="the space file as it is (10 combos x 53 lrs x 2 seeds: hours here)")
    args = parser.parse_args(argv)
    load0 = c.load_now()
    started = time.perf_counter()
    if args.grid_workers is None:
        args.grid_workers = 2 if args.trial == "demo" else 1
    if args.trial == "demo":
        raw = demo_spec(args)
        args.space_name = str(Path(args.space).resolve().relative_to(c.ROOT)
                              if Path(args.space).resolve().is_relative_to(c.ROOT)
                              else args.space)
    else:
        raw = synthetic_spec(args)
        args.space_name = "synthetic (built in)"
    return run(args, raw, load0, started)


if __name__ == "__main__":
    main()
