"""How many step rows a second does the driver record, and is every one of them on disk?

    .venv/bin/python bench/ingest.py [--trials 4] [--steps 50000] [--ray-steps 1500]

Ours: a real sweep (tune_sana.engine.sweep.run, as `tune-sana sweep` runs it) of --trials
synthetic trials (trials/synthetic.py: no sleep, one row a step, the validation loss only at the
last step) reporting as fast as they can through the real path: the relay (engine/relay.py,
batches of up to 1,000 rows), tune.report, the driver's ResultsRecorder and ResultsWriter, the
Parquet history. Rows sent: --steps per trial (the synthetic trial reports steps 1..N, and its
trials.parquet row says it ran them all); rows recorded: read back from history/ afterwards,
each (trial, step) once.

Plain Ray Tune, in the same run and the same local Ray: a function trainable that reports one
row per step through ``tune.report``, no callbacks (Ray's default loggers on, as a user gets
them); its rows counted from the result grid's progress files. Fewer steps (--ray-steps): one
synchronous round trip per row makes it slow, and a rate is a rate.

Rate = rows / (end of ``fit`` - the first row's creation time in a trial): Ray's start and the
first trial's imports are left out, the driver catching up on a backlog after the last row is
counted in. Target: ours at least 5,000 rows/s. Prints a summary, then one JSON line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _common import (
    _quiet_stderr,
    emit,
    load_now,
    local_ray,
    machine,
    rounded,
    say,
    ship_by_value,
    workdir,
)

TARGET_ROWS_S = 5000.0


def _ours(storage: Path, trials: int, steps: int) -> dict[str, Any]:
    from tune_sana.engine.space import parse_spec
    from tune_sana.engine.sweep import SweepOptions, run
    from tune_sana.record.readers import read_history, read_trials

    spec = parse_spec({
        "trial": "synthetic",
        "search": {"algorithm": "random", "num_samples": trials, "seed": 0,
                   "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": steps, "eval_every": steps, "diverge_above": 10.0},
        "space": {"lr": {"loguniform": [1e-4, 1e-3]}},
    }, source="bench:ingest")
    options = SweepOptions(name="ingest", storage=str(storage), progress_every_s=1e9)
    t0 = time.perf_counter()
    with _quiet_stderr():
        run_dir = run(spec, options, spec_name="ingest")
    end = time.time()
    wall = time.perf_counter() - t0
    history = read_history(run_dir, ["trial_id", "step", "timestamp"])
    pairs = history.select(["trial_id", "step"]).group_by(["trial_id", "step"]).aggregate([])
    done = read_trials(run_dir, ["trial_id", "steps_run", "outcome"]).to_pylist()
    first = min(history["timestamp"].to_pylist()) if history.num_rows else end
    recorded = history.num_rows
    return {"sent": sum(int(r["steps_run"] or 0) for r in done), "expected": trials * steps,
            "recorded": recorded, "distinct": pairs.num_rows,
            "completed": sum(r["outcome"] == "completed" for r in done),
            "wall_s": wall, "rate": recorded / max(end - first, 1e-9)}


def _plain_trainable(config: dict[str, Any]) -> None:
    from ray import tune

    for step in range(1, int(config["steps"]) + 1):
        tune.report({"step": step, "train_loss": 1.0 / step, "row_time": time.time()})


def _plain(storage: Path, trials: int, steps: int) -> dict[str, Any]:
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(_plain_trainable, {"cpu": 1}),
        param_space={"steps": steps, "lr": tune.loguniform(1e-4, 1e-3)},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=2,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="plain", storage_path=str(storage), verbose=0))
    t0 = time.perf_counter()
    grid = tuner.fit()
    end = time.time()
    wall = time.perf_counter() - t0
    frames = [r.metrics_dataframe for r in grid if r.metrics_dataframe is not None]
    recorded = sum(len(f) for f in frames)
    first = min((float(f["row_time"].min()) for f in frames if len(f)), default=end)
    return {"sent": trials * steps, "recorded": recorded, "wall_s": wall,
            "rate": recorded / max(end - first, 1e-9)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50000, help="rows per trial (ours)")
    parser.add_argument("--ray-steps", type=int, default=1500,
                        help="rows per trial (plain Ray Tune, one tune.report each)")
    parser.add_argument("--workdir", help="where runs go (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    ship_by_value(__name__)
    started = load_now()
    with workdir(args.workdir, "bench-ingest-") as work, local_ray(num_cpus=2):
        ours = _ours(work / "ours", args.trials, args.steps)
        plain = _plain(work / "plain", args.trials, args.ray_steps)
    lost = ours["sent"] - ours["recorded"]
    whole = (ours["sent"] == ours["expected"] == ours["recorded"] == ours["distinct"]
             and plain["recorded"] == plain["sent"])
    say(f"ours:  {ours['recorded']} of {ours['sent']} rows recorded ({ours['distinct']} distinct "
        f"(trial, step)), {ours['rate']:.0f} rows/s; sweep {ours['wall_s']:.1f} s")
    say(f"Ray:   {plain['recorded']} of {plain['sent']} results recorded, {plain['rate']:.0f} "
        f"results/s (one tune.report per row, no callbacks); fit {plain['wall_s']:.1f} s")
    met = ours["rate"] >= TARGET_ROWS_S and whole
    say(f"target >= {TARGET_ROWS_S:.0f} rows/s, nothing lost: {'met' if met else 'NOT met'} "
        f"({ours['rate'] / max(plain['rate'], 1e-9):.1f}x plain Ray's result rate)")
    emit({"benchmark": "ingest", "trials": args.trials, "steps": args.steps,
          "ray_steps": args.ray_steps,
          "ours": {k: rounded(v, 2) if isinstance(v, float) else v for k, v in ours.items()},
          "plain": {k: rounded(v, 2) if isinstance(v, float) else v for k, v in plain.items()},
          "rows_lost": lost, "nothing_lost": whole, "ours_rows_s": rounded(ours["rate"], 1),
          "plain_results_s": rounded(plain["rate"], 1), "target_rows_s": TARGET_ROWS_S,
          "target_met": met, "machine": machine(started)})


if __name__ == "__main__":
    main()
