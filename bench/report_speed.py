"""How fast is `tune-sana report` against loading the same sweep through Ray's own files?

    .venv/bin/python bench/report_speed.py [--trials 1000] [--steps 1430]

One run generates one random sweep (tune_sana/testing/sweeps.py: --trials trials of up to
--steps steps, one history row per step, val loss every --eval-every steps; about half the
trials diverge
and some are pruned, so they stop early: the defaults give ~1.0M history rows, the issue's
1,000 trials x 1,000 steps) and writes it twice from the same arrays:
  ours: <work>/ours/ (trials.parquet + history/ part files of --flush-rows rows, the
        ResultsWriter's flush size, through the results module's table builders);
  Ray:  <work>/ray_exp/ as Ray Tune 2.x writes an experiment: experiment_state-*.json
        (Trial.get_json_state of real Trial objects) and per trial params.json, result.json
        (one JSON line per reported result, with Ray's auto-filled keys) and progress.csv.
Then it times
  ours:   tune_sana.analysis.report.report([run dir]) in-process (first call, and the median of
          --repeat calls), tune_sana.analysis.best.best_trial, and `tune-sana report` as a
          subprocess;
  Ray:    ray.tune.ExperimentAnalysis(path) (it parses every trial's result.json into a
          DataFrame) + the same best-trial answer from those DataFrames (lowest val_loss among
          trials whose last result says completed): in-process without Ray's import time
          (against our in-process report), and as a subprocess with Python start and imports
          (against our CLI subprocess).
Both read files the generator just wrote (warm page cache). Prints a summary, then one JSON
line (last line) with times, speedup and row counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tune_sana.testing.sweeps import LargeSweep, large_sweep, write_large_parquet  # noqa: E402

RAY_KEYS_HOST = {"pid": 12345, "hostname": "bench-host", "node_ip": "10.0.0.1"}


def write_ray_experiment(exp_dir: Path, sweep: LargeSweep) -> None:
    """Ray Tune's experiment folder for ``sweep`` (what ExperimentAnalysis/ResultGrid read)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial
    from ray.tune.utils.serialization import TuneFunctionEncoder

    exp_dir.mkdir(parents=True, exist_ok=True)
    hist = sweep.history
    ids = hist["trial_id"].to_numpy(zero_copy_only=False)
    ends = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    bounds = zip(np.concatenate([[0], ends]), np.concatenate([ends, [len(ids)]]), strict=True)
    cols = {name: hist[name].to_numpy(zero_copy_only=False)
            for name in ("step", "train_loss", "val_loss", "grad_norm", "lr", "step_time_s",
                         "timestamp")}
    trial_data = []
    for i, (start_, stop_) in enumerate(bounds):
        start, stop = int(start_), int(stop_)
        tid, config, summary = sweep.trial_ids[i], sweep.configs[i], sweep.summaries[i]
        dirname = f"_trainable_{tid}_{i + 1}"
        storage = StorageContext(storage_path=str(exp_dir.parent),
                                 experiment_dir_name=exp_dir.name, trial_dir_name=dirname)
        trial = Trial("_trainable", config=config, trial_id=tid, storage=storage, stub=True,
                      placement_group_factory={"CPU": 1}, evaluated_params=config,
                      experiment_tag=f"{i + 1}_lr={config['lr']:.4g}")
        trial.create_placement_group_factory()  # as TuneController does before running it
        trial.relative_logdir = dirname
        trial.status = Trial.TERMINATED
        trial_dir = exp_dir / dirname
        trial_dir.mkdir(exist_ok=True)
        (trial_dir / "params.json").write_text(json.dumps(config, sort_keys=True, indent=2))
        lines, first, last = [], None, {}
        t0 = float(cols["timestamp"][start])
        for j in range(start, stop):  # generator only: the benchmark times reading
            k = j - start
            result: dict[str, Any] = {"step": int(cols["step"][j])}
            for name in ("train_loss", "grad_norm"):
                value = cols[name][j]
                result[name] = None if np.isnan(value) else float(value)
            if not np.isnan(cols["val_loss"][j]):
                result["val_loss"] = float(cols["val_loss"][j])
            result.update(lr=float(cols["lr"][j]), loss_scale=None, skipped=False,
                          step_time_s=float(cols["step_time_s"][j]))
            if j == stop - 1:
                result.update(summary)
            ts = float(cols["timestamp"][j])
            result.update(timestamp=int(ts), checkpoint_dir_name=None, done=j == stop - 1,
                          training_iteration=k + 1, trial_id=tid,
                          date="2026-01-01_00-00-00", time_this_iter_s=0.05,
                          time_total_s=ts - t0 + 0.05, **RAY_KEYS_HOST, config=config,
                          time_since_restore=ts - t0 + 0.05, iterations_since_restore=k + 1)
            lines.append(json.dumps(result))
            if first is None:
                first = result
            last = result
            if j == stop - 1 or "val_loss" in result:
                trial.update_last_result(dict(result))
        (trial_dir / "result.json").write_text("\n".join(lines) + "\n")
        assert first is not None
        flat = {k: v for k, v in first.items() if k != "config"}
        flat.update({f"config/{k}": v for k, v in config.items()})
        with (trial_dir / "progress.csv").open("w", newline="") as f:
            # Ray's CSV logger freezes its header on the first result
            writer = csv.DictWriter(f, fieldnames=list(flat), extrasaction="ignore")
            writer.writeheader()
            for line in lines:
                row = json.loads(line)
                row.update({f"config/{k}": v for k, v in row.pop("config").items()})
                writer.writerow(row)
        trial.run_metadata.last_result = last
        trial_data.append(trial.get_json_state())
    state = {"trial_data": trial_data, "runner_data": {},
             "stats": {"start_time": time.time()}}
    (exp_dir / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps(state, cls=TuneFunctionEncoder))


def ray_best(exp_dir: Path) -> tuple[str, float, float]:
    """(best trial id, seconds for ExperimentAnalysis, seconds for the whole answer)."""
    from ray.tune import ExperimentAnalysis

    t0 = time.perf_counter()
    analysis = ExperimentAnalysis(str(exp_dir), default_metric="val_loss", default_mode="min")
    loaded = time.perf_counter() - t0
    best_id, best_val = "", float("inf")
    for trial_id, df in analysis.trial_dataframes.items():
        if df.empty or df["outcome"].iloc[-1] != "completed":
            continue
        val = float(df.loc[df["step"] > 0, "val_loss"].min())  # step 0 is the base
        if val < best_val or (val == best_val and trial_id < best_id):
            best_id, best_val = trial_id, val
    return best_id, loaded, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1430,
                        help="configured steps per trial (diverged/pruned trials stop early)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--flush-rows", type=int, default=2000,
                        help="history rows per part file (ResultsWriter's default flush)")
    parser.add_argument("--repeat", type=int, default=5, help="in-process report calls")
    parser.add_argument("--workdir", help="where to write (default: a temp dir, removed)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="report-speed-"))
    gen: dict[str, float] = {}
    t = time.perf_counter()
    sweep = large_sweep(args.trials, args.steps, args.eval_every)
    gen["arrays_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ours = work / "ours"
    parts = write_large_parquet(ours, sweep, args.flush_rows)
    gen["parquet_s"] = time.perf_counter() - t
    t = time.perf_counter()
    exp_dir = work / "ray_exp"
    write_ray_experiment(exp_dir, sweep)
    gen["ray_files_s"] = time.perf_counter() - t
    rows = sweep.history.num_rows
    print(f"generated {args.trials} trials, {rows} history rows: arrays {gen['arrays_s']:.1f} s,"
          f" our Parquet {gen['parquet_s']:.1f} s ({parts} history parts), Ray's files "
          f"{gen['ray_files_s']:.1f} s", flush=True)

    from tune_sana.analysis.best import best_trial
    from tune_sana.analysis.report import report

    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        text = report([ours])
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    our_best, _, _ = best_trial(ours)
    best_s = time.perf_counter() - t
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "tune_sana.cli", "report", str(ours)],
                         capture_output=True, text=True, env=env, check=True)
    cli_s = time.perf_counter() - t
    assert cli.stdout == text, "CLI and in-process reports differ"

    ray_id, ray_load_s, ray_total_s = ray_best(exp_dir)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from report_speed import ray_best; "
            "print(ray_best(__import__('pathlib').Path(sys.argv[2]))[0])")
    t = time.perf_counter()
    sub = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), str(exp_dir)],
                         capture_output=True, text=True, env=env, check=True)
    ray_sub_s = time.perf_counter() - t
    assert sub.stdout.strip().splitlines()[-1] == ray_id
    first, median = times[0], statistics.median(times)
    speedup = ray_total_s / median
    print(f"ours:  report in-process first {first:.3f} s, median {median:.3f} s of "
          f"{args.repeat}; best_trial {best_s:.3f} s; CLI subprocess {cli_s:.2f} s")
    print(f"Ray:   ExperimentAnalysis {ray_load_s:.2f} s, + best trial {ray_total_s:.2f} s; "
          f"as a subprocess (Python start + import ray) {ray_sub_s:.2f} s")
    same = "same" if our_best == ray_id else "DIFFERENT"
    print(f"best trial: ours {our_best}, Ray {ray_id} ({same})")
    print(f"speedup, in-process (Ray load+best / our whole report, median): {speedup:.0f}x; "
          f"subprocess vs subprocess: {ray_sub_s / cli_s:.0f}x; target >= 20x and < 2 s: "
          f"{'met' if speedup >= 20 and median < 2 else 'NOT met'}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "trials": args.trials, "steps": args.steps, "history_rows": rows,
        "history_parts": parts, "ours_report_first_s": round(first, 4),
        "ours_report_median_s": round(median, 4), "ours_best_s": round(best_s, 4),
        "ours_cli_s": round(cli_s, 3), "ray_experiment_analysis_s": round(ray_load_s, 3),
        "ray_best_total_s": round(ray_total_s, 3), "ray_subprocess_s": round(ray_sub_s, 3),
        "speedup": round(speedup, 1), "speedup_subprocess": round(ray_sub_s / cli_s, 1),
        "same_best": our_best == ray_id,
        "target_met": speedup >= 20 and median < 2,
        "generate_s": {k: round(v, 1) for k, v in gen.items()},
    }))


if __name__ == "__main__":
    main()
