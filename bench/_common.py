"""Shared plumbing for the benchmarks: machine facts, a local Ray, running a tune-sana sweep and
a plain Ray Tune run side by side, collecting raw rows, reading Optuna studies, the JSON last line.

Not a benchmark: ``python bench/<name>.py`` imports it (bench/ is on sys.path when a script in it
runs; tests import the scripts by file path and add bench/ themselves).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import pickle
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Ray's own keys in every result (not the trial's metrics).
RAY_KEYS = frozenset({"config", "trial_id", "experiment_tag", "date", "timestamp",
                      "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
                      "time_since_restore", "iterations_since_restore", "checkpoint_dir_name",
                      "done", "training_iteration"})


# --- output -----------------------------------------------------------------------------------

def say(text: str) -> None:
    """A line of the human summary (stdout, flushed, so it interleaves with stderr sensibly)."""
    print(text, flush=True)


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's figures as one JSON object: always the last line of stdout."""
    sys.stderr.flush()
    print(json.dumps(result, default=_plain), flush=True)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def rounded(value: float | None, digits: int = 4) -> float | None:
    """JSON-safe: None for None/NaN/inf, else rounded."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def nonfinite(value: Any) -> bool:
    """True for a float NaN or inf (a metric as a plain loop would report it)."""
    return isinstance(value, float) and not math.isfinite(value)


# --- the machine --------------------------------------------------------------------------------

def machine(started_load: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """Where the figures came from; 1-minute load average at the start and end of the run.

    A load average above the core count means other work shared the machine: timings are then
    upper bounds, ratios measured in one interleaved run remain comparable.
    """
    import ray
    import torch

    load = os.getloadavg()
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_avg_1m_start": round(started_load[0], 2) if started_load else None,
        "load_avg_1m_end": round(load[0], 2),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }
    try:
        import optuna

        info["optuna"] = optuna.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    return info


def load_now() -> tuple[float, float, float]:
    return os.getloadavg()


def ensure_model(model: str) -> None:
    """Build the demo base once (about a minute) if ``model`` is it and it is missing, so that
    no timing includes it."""
    from tune_sana.config import DEMO_BASE

    if model == DEMO_BASE:
        from tune_sana.training.demo_base import ensure_demo_base

        ensure_demo_base()


# --- Ray ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[float]:
    """A new local Ray bound to 127.0.0.1, unless this process already runs one (a test's); shut
    down on exit only if started here. Yields the seconds ray.init took."""
    import ray

    from tune_sana.engine.sweep import SweepOptions, init_ray

    started_here = not ray.is_initialized()
    t0 = time.perf_counter()
    if started_here:
        # address="local": always a new instance, never a cluster someone else left running on
        # this machine (ray.init() without an address would join it)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
                 log_to_driver=False)
    init_ray(SweepOptions())  # tune-sana's settings for the running Ray (sweep.run does the same)
    try:
        yield time.perf_counter() - t0
    finally:
        if started_here:
            ray.shutdown()


def ship_by_value(module_name: str) -> None:
    """Let Ray's workers unpickle trainables defined in a bench script imported as a module (by
    a test): bench/ is not on the workers' path, so send the module's code by value."""
    if module_name != "__main__":
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[module_name])


@contextlib.contextmanager
def workdir(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` if given (kept), else a temporary folder (removed)."""
    if path:
        folder = Path(path).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# --- tune-sana's side ---------------------------------------------------------------------------

@dataclass
class SweepRun:
    run_dir: Path
    wall_s: float
    trials: list[dict[str, Any]]
    history: list[dict[str, Any]]


def run_tune_sana(spec: dict[str, Any], storage: Path, name: str,
                  warm_start: Sequence[str] = ()) -> SweepRun:
    """Run ``spec`` (a space file's mapping) through tune_sana.engine.sweep.run, exactly as
    ``tune-sana sweep`` does (``warm_start``: its --warm-start runs), and read its Parquet
    record back."""
    from tune_sana.engine.space import parse_spec
    from tune_sana.engine.sweep import SweepOptions, run
    from tune_sana.record.readers import read_history, read_trials

    parsed = parse_spec(spec, source=f"bench:{name}")
    options = SweepOptions(name=name, storage=str(storage), progress_every_s=1e9,
                           warm_start=tuple(warm_start))
    t0 = time.perf_counter()
    with _quiet_stderr():
        run_dir = run(parsed, options, spec_name=name)
    wall = time.perf_counter() - t0
    return SweepRun(run_dir, wall, read_trials(run_dir).to_pylist(),
                    read_history(run_dir).to_pylist())


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the recorder's per-trial progress lines (stderr) unless BENCH_VERBOSE is set."""
    if os.environ.get("BENCH_VERBOSE"):
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def optuna_study(experiment_dir: Path) -> Any:
    """The Optuna study an OptunaSearch (stock or tune-sana's) saved in its experiment folder."""
    files = sorted(glob.glob(str(experiment_dir / "searcher-state-*.pkl")))
    if not files:
        raise FileNotFoundError(f"no searcher state in {experiment_dir}")
    with open(files[-1], "rb") as fh:
        state = pickle.load(fh)
    return state["_ot_study"] if isinstance(state, dict) else state[2]


def optuna_states(study: Any) -> dict[str, int]:
    """Counts of RUNNING / COMPLETE / FAIL / PRUNED / WAITING among the study's trials."""
    counts = {"RUNNING": 0, "COMPLETE": 0, "FAIL": 0, "PRUNED": 0, "WAITING": 0}
    for trial in study.trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


# --- the plain Ray Tune side --------------------------------------------------------------------

_ROWS: dict[str, list[dict[str, Any]]] = {}


def _collector(key: str) -> Any:
    """A driver-side Tune callback that keeps every result as reported (NaN included)."""
    from ray.tune import Callback

    class _Collect(Callback):
        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                            result: dict[str, Any], **info: Any) -> None:
            row = {k: v for k, v in result.items() if k not in RAY_KEYS}
            row["trial_id"] = trial.trial_id
            row["config"] = dict(trial.config)
            row["received_at"] = time.time()
            _ROWS.setdefault(key, []).append(row)

    return _Collect()


@dataclass
class PlainRun:
    experiment_dir: Path
    wall_s: float
    rows: list[dict[str, Any]]
    configs: dict[str, dict[str, Any]]


def run_plain_ray(trainable: Callable[[dict[str, Any]], None], *, param_space: dict[str, Any],
                  storage: Path, name: str, metric: str, mode: str, num_samples: int,
                  max_concurrent: int, cpus_per_trial: float = 1.0, search_alg: Any = None,
                  scheduler: Any = None) -> PlainRun:
    """What a user writes with Ray Tune alone: Tuner(trainable, searcher, scheduler), no stopper.

    Every reported row is kept as reported (NaN included) by a driver-side callback.
    """
    from ray import tune

    key = f"{name}-{time.monotonic_ns()}"
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cpus_per_trial}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                  callbacks=[_collector(key)]),
    )
    t0 = time.perf_counter()
    with _quiet_stderr():
        grid = tuner.fit()
    wall = time.perf_counter() - t0
    rows = _ROWS.pop(key, [])
    configs = {r.metrics["trial_id"]: dict(r.config or {}) for r in grid
               if r.metrics and "trial_id" in r.metrics}
    for row in rows:
        configs.setdefault(row["trial_id"], row["config"])
    return PlainRun(storage / name, wall, rows, configs)


def by_trial(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped per trial, in the order they arrived."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(str(row["trial_id"]), []).append(row)
    return out


def config_key(config: dict[str, Any], keys: Sequence[str]) -> tuple[Any, ...]:
    """A hashable identity of a configuration over ``keys`` (floats rounded to 12 digits)."""
    return tuple(round(config[k], 12) if isinstance(config.get(k), float) else config.get(k)
                 for k in keys)
