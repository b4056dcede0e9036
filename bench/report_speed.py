"""How fast is `tune-sana report` against loading the same sweep through Ray's own files?

    .venv/bin/python bench/report_speed.py [--trials 1000] [--steps 1430]
    .venv/bin/python bench/report_speed.py --size 10m     # 10,000 trials, ~10 M history rows

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

Every size also compacts history/ as the end of a sweep does (record/compaction.py: files of
at least 100,000 rows) and times the CLI report again on that layout, measuring the peak RSS
of the CLI process (its VmHWM). ``--size 10m`` (issue 17: 10,000 trials x 1,000 steps,
target under 5 s and under 2 GB peak for the CLI on the compacted record) skips Ray's side:
writing 10 M JSON result lines from Python is the slow part of the generator, and the target
is absolute.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
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


SIZES = {"1m": 1000, "10m": 10000}  # trials; --steps 1430 gives ~1,000 history rows a trial
TARGET_10M_S, TARGET_10M_MB = 5.0, 2048.0


# The CLI run in a fresh process that then prints its own VmHWM (the peak resident set of its
# own address space, which exec started anew; ru_maxrss of a child would also count the
# pages of the benchmark's process it was forked from).
_CLI = ("import sys\nfrom tune_sana.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
        "finally:\n    peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
        "    print(peak[0].split()[1], file=sys.stderr)\nsys.exit(code)")


def cli_report(run_dir: Path, env: dict[str, str]) -> tuple[str, float, float]:
    """`tune-sana report run_dir` as a subprocess: (its stdout, wall seconds, peak RSS of that
    process in MB)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CLI, "report", str(run_dir)],
                          capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - t
    return proc.stdout, wall, int(proc.stderr.strip().splitlines()[-1]) / 1024  # kB


def compact(run_dir: Path) -> tuple[int, int, float]:
    """history/ compacted as a sweep's end leaves it: (files before, after, seconds)."""
    from tune_sana.record.compaction import compact_history
    from tune_sana.record.schema import HISTORY_DIR

    before = len(list((run_dir / HISTORY_DIR).glob("*.parquet")))
    t = time.perf_counter()
    compact_history(run_dir)
    return before, len(list((run_dir / HISTORY_DIR).glob("*.parquet"))), time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES),
                        help="1m: 1,000 trials (default); 10m: 10,000 trials, Ray skipped")
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1430,
                        help="configured steps per trial (diverged/pruned trials stop early)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--flush-rows", type=int, default=2000,
                        help="history rows per part file (ResultsWriter's default flush)")
    parser.add_argument("--repeat", type=int, default=5, help="in-process report calls")
    parser.add_argument("--workdir", help="where to write (default: a temp dir, removed)")
    parser.add_argument("--skip-ray", action="store_true", help="time our side only")
    args = parser.parse_args(argv)
    if args.size:
        args.trials = SIZES[args.size]
    if args.size == "10m":
        args.skip_ray = True

    work = Path(args.workdir or tempfile.mkdtemp(prefix="report-speed-"))
    gen: dict[str, float] = {}
    t = time.perf_counter()
    sweep = large_sweep(args.trials, args.steps, args.eval_every)
    gen["arrays_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ours = work / "ours"
    parts = write_large_parquet(ours, sweep, args.flush_rows)
    gen["parquet_s"] = time.perf_counter() - t
    exp_dir = work / "ray_exp"
    if not args.skip_ray:
        t = time.perf_counter()
        write_ray_experiment(exp_dir, sweep)
        gen["ray_files_s"] = time.perf_counter() - t
    rows = sweep.history.num_rows
    del sweep  # the generator's arrays: not part of what is measured
    ray_files = f", Ray's files {gen['ray_files_s']:.1f} s" if "ray_files_s" in gen else ""
    print(f"generated {args.trials} trials, {rows} history rows: arrays {gen['arrays_s']:.1f} s,"
          f" our Parquet {gen['parquet_s']:.1f} s ({parts} history parts){ray_files}",
          flush=True)

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
    cli_text, cli_s, cli_mb = cli_report(ours, env)
    assert cli_text == text, "CLI and in-process reports differ"
    files_before, files_after, compact_s = compact(ours)
    compacted_text, compacted_s, compacted_mb = cli_report(ours, env)
    assert compacted_text == text, "the compacted record reports differently"
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    first, median = times[0], statistics.median(times)
    print(f"ours:  report in-process first {first:.3f} s, median {median:.3f} s of "
          f"{args.repeat}; best_trial {best_s:.3f} s")
    print(f"CLI subprocess on {files_before} parts as flushed: {cli_s:.2f} s, peak "
          f"{cli_mb:.0f} MB; compacted into {files_after} files in {compact_s:.1f} s; CLI on "
          f"them {compacted_s:.2f} s, peak {compacted_mb:.0f} MB (children's CPU so far "
          f"{cpu.ru_utime + cpu.ru_stime:.1f} s)")
    result: dict[str, Any] = {
        "benchmark": "report_speed", "size": args.size, "trials": args.trials,
        "steps": args.steps, "history_rows": rows, "history_parts": parts,
        "ours_report_first_s": round(first, 4), "ours_report_median_s": round(median, 4),
        "ours_best_s": round(best_s, 4), "ours_cli_s": round(cli_s, 3),
        "ours_cli_peak_mb": round(cli_mb, 1), "compact_s": round(compact_s, 2),
        "compacted_files": files_after, "ours_cli_compacted_s": round(compacted_s, 3),
        "ours_cli_compacted_peak_mb": round(compacted_mb, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "generate_s": {k: round(v, 1) for k, v in gen.items()},
    }
    if args.size == "10m":
        met = compacted_s < TARGET_10M_S and compacted_mb < TARGET_10M_MB
        print(f"10 M rows: CLI {compacted_s:.2f} s (target < {TARGET_10M_S:g} s), peak "
              f"{compacted_mb:.0f} MB (target < {TARGET_10M_MB:.0f} MB): "
              f"{'met' if met else 'NOT met'}")
        result.update(target_s=TARGET_10M_S, target_mb=TARGET_10M_MB, target_met=met)
    if not args.skip_ray:
        ray_id, ray_load_s, ray_total_s = ray_best(exp_dir)
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from report_speed import "
                "ray_best; print(ray_best(__import__('pathlib').Path(sys.argv[2]))[0])")
        t = time.perf_counter()
        sub = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench"), str(exp_dir)],
                             capture_output=True, text=True, env=env, check=True)
        ray_sub_s = time.perf_counter() - t
        assert sub.stdout.strip().splitlines()[-1] == ray_id
        speedup = ray_total_s / median
        print(f"Ray:   ExperimentAnalysis {ray_load_s:.2f} s, + best trial {ray_total_s:.2f} "
              f"s; as a subprocess (Python start + import ray) {ray_sub_s:.2f} s")
        same = "same" if our_best == ray_id else "DIFFERENT"
        print(f"best trial: ours {our_best}, Ray {ray_id} ({same})")
        print(f"speedup, in-process (Ray load+best / our whole report, median): {speedup:.0f}x;"
              f" subprocess vs subprocess: {ray_sub_s / cli_s:.0f}x; target >= 20x and < 2 s: "
              f"{'met' if speedup >= 20 and median < 2 else 'NOT met'}")
        result.update(ray_experiment_analysis_s=round(ray_load_s, 3),
                      ray_best_total_s=round(ray_total_s, 3),
                      ray_subprocess_s=round(ray_sub_s, 3), speedup=round(speedup, 1),
                      speedup_subprocess=round(ray_sub_s / cli_s, 1),
                      same_best=our_best == ray_id)
        if args.size != "10m":
            result["target_met"] = speedup >= 20 and median < 2
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))

if __name__ == "__main__":
    main()
