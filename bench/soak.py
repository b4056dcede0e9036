"""Soak: a long mixed sweep whose trial workers are SIGKILLed every few minutes ends with the same
record as the same sweep without faults.

    python bench/soak.py                 # 30 minutes of faulted sweep, its reference alongside
    python bench/soak.py --minutes 2 --kill-every 20

The sweep: the synthetic trial (trials/synthetic.py), random search with a fixed seed over lr and
the trial's seed, ASHA, one trial at a time, so every outcome is decided by the configurations
alone: completed, diverged (lr above the trial's threshold: NaN from step 5, stopped by the
engine) and pruned (ASHA). One at a time is what makes ASHA's decisions repeatable: with two
trials running, which one reaches a rung first decides who is pruned.

It runs ``tune-sana sweep`` as a subprocess (its own embedded Ray). Every ``--kill-every``
seconds (jittered, seeded) it SIGKILLs the worker process of a running trial, found among the
descendants of that subprocess only (other sessions' Ray processes on the machine are never
touched). Ray retries the trial (``max_retries``); the synthetic trial has no checkpoint, so it
starts over and reports its steps again, and the record keeps each step once.

The reference runs alongside, in its own subprocess and Ray: the same space with ``step_seconds``
0 (the trial's values do not depend on its sleep), no faults. Then the records are compared trial
by trial, keyed by configuration: the same trials with the same outcomes and summaries, and the
same step rows, leaving out columns of time and place (wall time, timestamps, node, retries, the
config hash, which covers step_seconds). The JSON last line: faults injected and survived
(retries Ray recorded), rows lost, doubled and differing, and the duration.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from _common import emit, load_now, machine, say, workdir

# Columns of time and place, not of what the trial computed.
TRIAL_COLUMNS_SKIPPED = frozenset({"trial_id", "wall_time_s", "steps_per_s", "peak_memory_mb",
                                   "peak_memory_kind", "ran_on", "node", "retries", "ended_at",
                                   "config_id", "config_json"})
HISTORY_COLUMNS_SKIPPED = frozenset({"trial_id", "step_time_s", "timestamp"})
KEY_ONLY_IN_FAULTED = "step_seconds"  # the reference runs without the sleep
EST_TRIAL_S = 4.0  # a trial of this space on 2 shared cores, Ray's overhead and kills included
WORKER_TITLES = ("ray::ImplicitFunc", "ray::_trainable")


def space(samples: int, step_seconds: float, seed: int) -> dict[str, Any]:
    return {
        "trial": "synthetic", "metric": "val_loss", "mode": "min", "max_retries": 1000,
        "search": {"algorithm": "random", "num_samples": samples, "seed": seed,
                   "max_concurrent": 1},
        "scheduler": {"type": "asha", "grace_period": 10, "reduction_factor": 3},
        "resources": {"cpu": 1, "gpu": 0},
        "fixed": {"steps": 60, "eval_every": 5, "diverge_above": 1.0e-2,
                  "diverge_spread": 0.5, "step_seconds": step_seconds},
        "space": {"lr": {"loguniform": [1.0e-4, 1.0e-1]}, "seed": {"choice": [0, 1, 2, 3]}},
    }


def _sweep(folder: Path, name: str, spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    space_file = folder / f"{name}.yaml"
    space_file.write_text(yaml.safe_dump(spec))
    log = open(folder / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "tune_sana.cli", "sweep", str(space_file), "--storage",
         str(folder), "--name", name, "--num-cpus", "2", "--progress-every", "60"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _workers(driver: subprocess.Popen[bytes]) -> list[Any]:
    """Trial worker processes among the driver's own descendants, busiest first (a worker's
    title says the method it runs, e.g. ray::ImplicitFunc.train)."""
    import psutil

    try:
        children = psutil.Process(driver.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in children:
        try:
            title = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith(WORKER_TITLES):
            found.append((".train" not in title, proc))
    busy = [p for idle, p in found if not idle]
    return busy or [p for _, p in found]


def run_faulted(folder: Path, spec: dict[str, Any], kill_every_s: float, rng: random.Random,
                max_kills: int | None = None) -> tuple[int, list[dict[str, Any]], float]:
    """The sweep with its workers killed (at most ``max_kills``); returns (exit status, kills,
    seconds)."""
    t0 = time.monotonic()
    driver = _sweep(folder, "faulted", spec)
    kills: list[dict[str, Any]] = []
    next_kill = t0 + kill_every_s * rng.uniform(0.5, 1.5)
    while driver.poll() is None:
        time.sleep(0.5)
        if time.monotonic() < next_kill or len(kills) == max_kills:
            continue
        victims = _workers(driver)
        if not victims:
            continue  # between trials: try again shortly
        victim = rng.choice(victims)
        try:
            title = " ".join(victim.cmdline()).strip()
            victim.send_signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - it ended by itself meanwhile: try another
            continue
        kills.append({"at_s": round(time.monotonic() - t0, 1), "pid": victim.pid,
                      "title": title})
        say(f"soak: SIGKILL {victim.pid} ({title}) at {kills[-1]['at_s']:.0f}s")
        next_kill = time.monotonic() + kill_every_s * rng.uniform(0.5, 1.5)
    return driver.returncode, kills, time.monotonic() - t0


def _record(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from tune_sana.record.readers import read_history, read_trials

    return read_trials(run_dir).to_pylist(), read_history(run_dir).to_pylist()


def _config_key(row: dict[str, Any]) -> str:
    """A trial's identity across the two runs: its configuration, less the faulted run's
    step_seconds (json, floats exact)."""
    config = json.loads(row.get("config_json") or "{}")
    config.pop(KEY_ONLY_IN_FAULTED, None)
    plain = {k: v for k, v in row.items() if k not in TRIAL_COLUMNS_SKIPPED}
    return json.dumps({"lr": plain.get("lr"), "seed": plain.get("seed"), **config},
                      sort_keys=True)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def compare(faulted: tuple[list[dict[str, Any]], list[dict[str, Any]]],
            reference: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> dict[str, Any]:
    """Trial rows and step rows of the faulted record against the reference's."""
    def by_key(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {_config_key(row): row for row in trials}

    f_trials, r_trials = by_key(faulted[0]), by_key(reference[0])
    f_ids = {row["trial_id"]: key for key, row in f_trials.items()}
    r_ids = {row["trial_id"]: key for key, row in r_trials.items()}

    def steps(history: list[dict[str, Any]], ids: dict[str, str]) -> Counter[tuple[str, int]]:
        return Counter((ids.get(row["trial_id"], "?" + row["trial_id"]), row["step"])
                       for row in history)

    f_steps, r_steps = steps(faulted[1], f_ids), steps(reference[1], r_ids)
    f_rows = {(f_ids.get(r["trial_id"], ""), r["step"]): r for r in faulted[1]}
    differing_rows = 0
    for row in reference[1]:
        key = (r_ids[row["trial_id"]], row["step"])
        other = f_rows.get(key)
        if other is not None and not all(_same(row[c], other[c]) for c in row
                                         if c not in HISTORY_COLUMNS_SKIPPED):
            differing_rows += 1
    differing_trials = sorted(
        key for key in set(f_trials) & set(r_trials)
        if not all(_same(r_trials[key][c], f_trials[key][c]) for c in r_trials[key]
                   if c not in TRIAL_COLUMNS_SKIPPED))
    return {
        "trials": len(f_trials),
        "reference_trials": len(r_trials),
        "trials_missing": len(set(r_trials) - set(f_trials)),
        "trials_extra": len(faulted[0]) - len(set(f_trials) & set(r_trials)),
        "trials_differing": len(differing_trials),
        "rows": sum(f_steps.values()),
        "reference_rows": sum(r_steps.values()),
        "rows_lost": sum(1 for key in r_steps if key not in f_steps),
        "rows_doubled": sum(n - 1 for n in f_steps.values() if n > 1),
        "rows_extra": sum(1 for key in f_steps if key not in r_steps),
        "rows_differing": differing_rows,
        "outcomes": dict(sorted(Counter(str(r["outcome"]) for r in faulted[0]).items())),
        "retries": sum(int(r.get("retries") or 0) for r in faulted[0]),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="length of the faulted sweep (default 30)")
    parser.add_argument("--kill-every", type=float, default=150.0, metavar="SECONDS",
                        help="mean seconds between kills, jittered by +-50%% (default 150)")
    parser.add_argument("--step-seconds", type=float, default=0.2,
                        help="sleep per step of the faulted sweep (default 0.2)")
    parser.add_argument("--samples", type=int,
                        help="trials (default: as many as --minutes holds, ~4 s each)")
    parser.add_argument("--max-kills", type=int, help="stop killing after this many (default: "
                        "no limit; a kill interval shorter than a trial would never let it end)")
    parser.add_argument("--seed", type=int, default=0, help="search and kill seed")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    samples = args.samples or max(4, round(args.minutes * 60 / EST_TRIAL_S))
    started_load = load_now()
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    with workdir(args.workdir, "tune-sana-soak-") as folder:
        say(f"soak: {samples} trials, a worker SIGKILLed every ~{args.kill_every:g}s; "
            f"work in {folder}")
        reference = _sweep(folder, "reference", space(samples, 0.0, args.seed))
        reference_end: list[float] = []

        def wait_for_reference() -> None:
            reference.wait()
            reference_end.append(time.monotonic())

        waiter = threading.Thread(target=wait_for_reference)
        waiter.start()
        code, kills, faulted_s = run_faulted(
            folder, space(samples, args.step_seconds, args.seed), args.kill_every, rng,
            args.max_kills)
        say(f"soak: faulted sweep exited {code} after {faulted_s:.0f}s, {len(kills)} kills")
        waiter.join()
        ref_code = reference.returncode
        reference_s = reference_end[0] - t0
        say(f"soak: reference sweep exited {ref_code} after {reference_s:.0f}s")
        result: dict[str, Any] = {"benchmark": "soak", "samples": samples,
                                  "sweep_exit": code, "reference_exit": ref_code}
        if code == 0 and ref_code == 0:
            result.update(compare(_record(folder / "faulted"), _record(folder / "reference")))
        else:
            for name in ("faulted", "reference"):
                log = (folder / f"{name}.log").read_text(errors="replace")
                say(f"--- {name}.log (tail)\n" + log[-3000:])
        survived = min(len(kills), int(result.get("retries", 0)))
        identical = (code == 0 and ref_code == 0 and result.get("trials_missing") == 0
                     and result.get("trials_extra") == 0 and result.get("trials_differing") == 0
                     and result.get("rows_lost") == 0 and result.get("rows_doubled") == 0
                     and result.get("rows_extra") == 0 and result.get("rows_differing") == 0)
        result.update({
            "faults_injected": len(kills), "faults_survived": survived,
            "identical": identical, "faulted_sweep_s": round(faulted_s, 1),
            "reference_sweep_s": round(reference_s, 1),
            "duration_s": round(time.monotonic() - t0, 1),
            "kills": kills, "machine": machine(started_load),
            "target_met": identical and survived == len(kills) > 0,
        })
    emit(result)


if __name__ == "__main__":
    main()
