"""Thousands of trials: does the driver stay flat as the record grows?

    .venv/bin/python bench/thousand_trials.py [--trials 2000] [--steps 3] [--no-plain]
                                              [--tracemalloc]

A real sweep (tune_sana.engine.sweep.run, real Ray Tune, two trials at a time) of --trials
trivial synthetic trials (trials/synthetic.py: --steps rows each, no sleep). Measured in the
driver, where the recorder runs:
- memory: the driver's RSS sampled every 0.25 s (psutil) from just before the sweep starts to
  its end; growth = peak - start (target under 200 MB; it includes Ray Tune's own per-trial
  state), and the slope: RSS against finished trials, fitted from the tenth trial on (KB per
  trial: what each more trial costs, one-time costs such as imports left out);
- beside it, the same for plain Ray Tune (unless --no-plain): a ray.tune.Tuner over a trivial
  function trainable (--steps rows, the last with val_loss), the same trials, concurrency and
  random search, no tune-sana callbacks, run first in a child process with its own local Ray
  (so neither driver inherits the other's heap): what Ray Tune alone grows by;
- the cost of recording one trial's summary: each ResultsWriter.finish_trial call timed (the
  real method, wrapped with a clock); the median of the first 100 calls against the median of
  the last 100 (target: no growth; the ratio last/first under 1.5, a margin for this box's
  noise); beside it, what a whole rewrite of trials.parquet (the writer before issue 17) costs
  at 100 and at --trials rows, timed on the finished record;
- that history/ is compacted at the end (record/compaction.py): no part left, every file at
  least compaction.HISTORY_ROWS rows (or the one file of a shorter history), no trial part
  left, and every (trial, step) once.
--tracemalloc traces the sweep's allocations in the driver (slower, and RSS then includes the
tracer's own memory) and prints the biggest growths by line and by traceback.
Prints a summary, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import _quiet_stderr, emit, load_now, local_ray, machine, rounded, say, workdir

TARGET_GROWTH_MB = 200.0
TARGET_RATIO = 1.5


class _Sampler(threading.Thread):
    """The peak RSS of this process, sampled until stopped; each sample also notes ``done()``
    (trials finished so far), for the slope."""

    def __init__(self, done: Callable[[], int] = lambda: 0) -> None:
        super().__init__(daemon=True)
        import psutil

        self._process = psutil.Process()
        self._done_count = done
        self.start_mb = self._rss()
        self.peak_mb = self.start_mb
        self.samples: list[tuple[int, float]] = []
        self._done = threading.Event()

    def _rss(self) -> float:
        return float(self._process.memory_info().rss) / 2**20

    def _sample(self) -> None:
        rss = self._rss()
        self.peak_mb = max(self.peak_mb, rss)
        self.samples.append((self._done_count(), rss))

    def run(self) -> None:
        while not self._done.wait(0.25):
            self._sample()

    def stop(self) -> float:
        self._done.set()
        self.join()
        self._sample()
        return self.peak_mb

    def slope_kb(self, trials: int) -> float | None:
        """KB of RSS per finished trial: a least-squares line through the samples taken once
        a tenth of the trials had finished (None with too few)."""
        points = [(n, mb) for n, mb in self.samples if n >= max(1, trials // 10)]
        if len({n for n, _ in points}) < 2:
            return None
        mean_n = statistics.fmean(n for n, _ in points)
        mean_mb = statistics.fmean(mb for _, mb in points)
        spread = sum((n - mean_n) ** 2 for n, _ in points)
        return 1024 * sum((n - mean_n) * (mb - mean_mb) for n, mb in points) / spread

    def figures(self, trials: int) -> dict[str, Any]:
        return {"start_mb": rounded(self.start_mb, 1), "peak_mb": rounded(self.peak_mb, 1),
                "growth_mb": rounded(self.peak_mb - self.start_mb, 1),
                "per_trial_kb": rounded(self.slope_kb(trials), 2)}


@contextlib.contextmanager
def _traced(enabled: bool, frames: int = 12, top: int = 25) -> Iterator[None]:
    """With ``enabled``: tracemalloc over the block, then its biggest growths printed (by line,
    by file, and the largest tracebacks)."""
    if not enabled:
        yield
        return
    import gc
    import tracemalloc

    tracemalloc.start(frames)
    gc.collect()
    before = tracemalloc.take_snapshot()
    try:
        yield
    finally:
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
        before, after = before.filter_traces(keep), after.filter_traces(keep)
        for key in ("lineno", "filename"):
            stats = after.compare_to(before, key)
            total = sum(s.size_diff for s in stats)
            say(f"tracemalloc by {key}: {total / 2**20:+.1f} MB net; top {top}:")
            for stat in stats[:top]:
                say(f"  {stat.size_diff / 2**20:+8.2f} MB {stat.count_diff:+8d} blocks  "
                    f"{stat.traceback[0].filename}:{stat.traceback[0].lineno}")
        say("tracemalloc: largest growths by traceback:")
        for stat in after.compare_to(before, "traceback")[:8]:
            say(f"  {stat.size_diff / 2**20:+8.2f} MB {stat.count_diff:+8d} blocks")
            for line in stat.traceback.format(limit=frames, most_recent_first=True):
                say(f"      {line}")


def _plain_trainable(config: dict[str, Any]) -> None:
    """Plain Ray Tune's trial: ``steps`` rows reported one by one, the last with val_loss."""
    from ray import tune

    steps = int(config["steps"])
    for step in range(1, steps + 1):
        loss = 0.1 + 1.0 / (1.0 + step) + config["lr"]
        row = {"step": step, "train_loss": loss}
        if step == steps:
            row["val_loss"] = loss
        tune.report(row)


def _plain(trials: int, steps: int, concurrency: int, work: str | None) -> dict[str, Any]:
    """Plain Ray Tune's driver growth over the same trials: a Tuner over _plain_trainable with
    Ray's random search, no tune-sana callbacks, searcher or stopper (run in a child)."""
    from ray import tune

    class Count(tune.Callback):
        done = 0

        def on_trial_complete(self, *args: Any, **kwargs: Any) -> None:
            Count.done += 1

        def on_trial_error(self, *args: Any, **kwargs: Any) -> None:
            Count.done += 1

    with workdir(work, "bench-thousand-plain-") as folder, local_ray(num_cpus=2):
        tuner = tune.Tuner(
            _plain_trainable,
            param_space={"lr": tune.loguniform(1e-4, 1e-3), "steps": steps},
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=trials,
                                        max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(name="plain", storage_path=str(folder), verbose=0,
                                      callbacks=[Count()]),
        )
        sampler = _Sampler(lambda: Count.done)
        sampler.start()
        t0 = time.perf_counter()
        with _quiet_stderr():
            grid = tuner.fit()
        wall = time.perf_counter() - t0
        sampler.stop()
        finished = len(grid)
    return {**sampler.figures(trials), "trials": finished, "sweep_s": rounded(wall, 1)}


def _plain_in_child(trials: int, steps: int, concurrency: int) -> dict[str, Any]:
    """_plain in a fresh interpreter (this script with --plain-only): its last line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--plain-only",
               "--trials", str(trials), "--steps", str(steps), "--concurrency", str(concurrency)]
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own local Ray, never this process's
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"plain Ray Tune baseline failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout)[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@contextlib.contextmanager
def _timed_finishes() -> Iterator[list[float]]:
    """ResultsWriter.finish_trial (the class the driver's recorder uses) wrapped with a clock
    while the block runs; yields the list of its calls' seconds."""
    from tune_sana.record.writer import ResultsWriter

    original = ResultsWriter.finish_trial
    times: list[float] = []

    def finish_trial(self: ResultsWriter, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        original(self, *args, **kwargs)
        times.append(time.perf_counter() - t)

    ResultsWriter.finish_trial = finish_trial  # type: ignore[method-assign]
    try:
        yield times
    finally:
        ResultsWriter.finish_trial = original  # type: ignore[method-assign]


def _rewrite_cost(run_dir: Path, rows: int, repeat: int = 5) -> float:
    """Median seconds to rewrite a trials.parquet of ``rows`` rows whole (the old writer's
    cost per finished trial), into a scratch file."""
    from tune_sana.record.readers import read_trials
    from tune_sana.record.writer import write_atomic

    table = read_trials(run_dir).slice(0, rows)
    target = run_dir / "scratch" / "trials.parquet"
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        write_atomic(table, target)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _compaction(run_dir: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from tune_sana.record.compaction import HISTORY_ROWS
    from tune_sana.record.readers import read_history
    from tune_sana.record.schema import COMPACT_PREFIX, HISTORY_DIR, TRIALS_PARTS_DIR

    files = sorted((run_dir / HISTORY_DIR).glob("*.parquet"))
    rows = [pq.read_metadata(f).num_rows for f in files]
    history = read_history(run_dir, ["trial_id", "step"])
    distinct = history.group_by(["trial_id", "step"]).aggregate([]).num_rows
    parts_left = sorted((run_dir / TRIALS_PARTS_DIR).glob("*.parquet"))
    compacted = (all(f.name.startswith(COMPACT_PREFIX) for f in files) and not parts_left
                 and (all(r >= HISTORY_ROWS for r in rows) or len(files) == 1)
                 and distinct == history.num_rows)
    return {"history_files": len(files), "history_rows": history.num_rows,
            "distinct_steps": distinct, "min_file_rows": min(rows, default=0),
            "trial_parts_left": len(parts_left), "min_rows": HISTORY_ROWS,
            "compacted": compacted}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=3, help="rows per trial")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--workdir", help="where the run goes (default: a temp dir, removed)")
    parser.add_argument("--no-plain", dest="plain", action="store_false",
                        help="skip the plain Ray Tune baseline")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="trace the driver's allocations over the sweep; print the top ones")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_only:  # the baseline's child process (_plain_in_child)
        emit(_plain(args.trials, args.steps, args.concurrency, args.workdir))
        return
    plain = _plain_in_child(args.trials, args.steps, args.concurrency) if args.plain else None

    from tune_sana.engine.space import parse_spec
    from tune_sana.engine.sweep import SweepOptions, run
    from tune_sana.record.readers import read_trials

    spec = parse_spec({
        "trial": "synthetic",
        "search": {"algorithm": "random", "num_samples": args.trials, "seed": 0,
                   "max_concurrent": args.concurrency},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": args.steps, "eval_every": args.steps, "diverge_above": 10.0},
        "space": {"lr": {"loguniform": [1e-4, 1e-3]}},
    }, source="bench:thousand_trials")
    started = load_now()
    with workdir(args.workdir, "bench-thousand-") as work, local_ray(num_cpus=2), \
            _timed_finishes() as times:
        options = SweepOptions(name="thousand", storage=str(work), progress_every_s=1e9)
        sampler = _Sampler(lambda: len(times))
        sampler.start()
        t0 = time.perf_counter()
        with _quiet_stderr(), _traced(args.tracemalloc):
            run_dir = Path(run(spec, options, spec_name="thousand"))
        wall = time.perf_counter() - t0
        peak = sampler.stop()
        ours = sampler.figures(args.trials)
        recorded = read_trials(run_dir, ["trial_id"]).num_rows
        state = _compaction(run_dir)
        n = min(100, len(times))
        first, last = statistics.median(times[:n]), statistics.median(times[-n:])
        rewrite_small = _rewrite_cost(run_dir, n)
        rewrite_all = _rewrite_cost(run_dir, recorded)
    growth = peak - sampler.start_mb
    ratio = last / first if first > 0 else float("inf")
    say(f"{recorded} of {args.trials} trials recorded in {wall:.0f} s "
        f"({args.trials / wall:.1f} trials/s)")
    say(f"driver memory: {sampler.start_mb:.0f} MB at the start, peak {peak:.0f} MB: growth "
        f"{growth:.0f} MB (target < {TARGET_GROWTH_MB:.0f} MB), {ours['per_trial_kb']} KB "
        "per trial")
    if plain is not None:
        say(f"plain Ray Tune, same trials: {plain['start_mb']:.0f} MB at the start, peak "
            f"{plain['peak_mb']:.0f} MB: growth {plain['growth_mb']:.0f} MB, "
            f"{plain['per_trial_kb']} KB per trial ({plain['trials']} trials in "
            f"{plain['sweep_s']:.0f} s)")
    say(f"recording a trial's summary: median {1e3 * first:.2f} ms over the first {n}, "
        f"{1e3 * last:.2f} ms over the last {n} (ratio {ratio:.2f}); a whole rewrite of "
        f"trials.parquet (before): {1e3 * rewrite_small:.2f} ms at {n} rows, "
        f"{1e3 * rewrite_all:.2f} ms at {recorded}")
    say(f"history/: {state['history_files']} file(s), {state['history_rows']} rows, smallest "
        f"{state['min_file_rows']}; trial parts left {state['trial_parts_left']}: "
        f"{'compacted' if state['compacted'] else 'NOT compacted'}")
    met = (growth < TARGET_GROWTH_MB and ratio < TARGET_RATIO and state["compacted"]
           and recorded == args.trials)
    say(f"targets: {'met' if met else 'NOT met'}")
    emit({"benchmark": "thousand_trials", "trials": args.trials, "steps": args.steps,
          "recorded": recorded, "sweep_s": rounded(wall, 1),
          "driver_start_mb": rounded(sampler.start_mb, 1), "driver_peak_mb": rounded(peak, 1),
          "memory_growth_mb": rounded(growth, 1),
          "memory_per_trial_kb": ours["per_trial_kb"],
          "plain_memory_growth_mb": None if plain is None else plain["growth_mb"],
          "plain_memory_per_trial_kb": None if plain is None else plain["per_trial_kb"],
          "plain": plain, "finish_first_ms": rounded(1e3 * first, 3),
          "finish_last_ms": rounded(1e3 * last, 3), "finish_ratio": rounded(ratio, 3),
          "rewrite_before_first_ms": rounded(1e3 * rewrite_small, 3),
          "rewrite_before_last_ms": rounded(1e3 * rewrite_all, 3), **state,
          "target_growth_mb": TARGET_GROWTH_MB, "target_ratio": TARGET_RATIO,
          "target_met": met, "machine": machine(started)})


if __name__ == "__main__":
    main()
