"""Every step row to the trackers users already read: TensorBoard, MLflow, Weights & Biases.

``tune-sana sweep --track tensorboard --track mlflow --track wandb`` adds Ray Tune's own logger
callback for each. A Ray result may carry many step rows (relay.py), so each logger is wrapped in
:class:`StepRows`, which unpacks a result and hands the logger one row at a time, with the row's
``step`` as Ray's ``training_iteration`` (the step every Ray logger plots against); a row's
numbers are its metrics (None and text are left out). Each trial's searched configuration
becomes the tracker's parameters (Ray's loggers do that themselves). A resumed run keeps the
trackers it began with: they are part of the run config Ray pickles and restores.

Where they write, by default (the run directory must be local: ``--storage`` a folder):

- tensorboard: ``<run dir>/tensorboard/<trial>/events.out.tfevents.*``;
- mlflow: the SQLite store ``<run dir>/mlflow.db``, experiment named after the run
  ($MLFLOW_TRACKING_URI, when set, wins). MLflow 3 refuses its plain-folder store unless told
  to; SQLite is the store it recommends, and a trial's rows go in one batch per Ray result
  (one ``log_metric`` per value costs ~20 ms each on SQLite);
- wandb: ``<run dir>/wandb/``, offline unless a key is configured ($WANDB_API_KEY or
  ``wandb login``) or $WANDB_MODE says otherwise; ``wandb sync`` uploads an offline run later.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback

from tune_sana.config import UserError
from tune_sana.engine.recorder import step_rows
from tune_sana.record.storage import is_uri

TRACKERS = ("tensorboard", "mlflow", "wandb")
TENSORBOARD_FOLDER = "tensorboard"
MLFLOW_DB = "mlflow.db"
WANDB_FOLDER = "wandb"
# (module imported, what pip installs) per tracker
_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"),
             "mlflow": ("mlflow", "mlflow-skinny"),
             "wandb": ("wandb", "wandb")}
_MLFLOW_BATCH = 1000  # metrics per log_batch call: MLflow's own limit


def check(names: Sequence[str], *, resume: bool = False,
          storage: str | None = None) -> tuple[str, ...]:
    """The trackers named by ``--track`` (each once, in order), each checked to be known and
    installed, on a new run in a local ``storage`` folder; a one-line UserError otherwise."""
    chosen = tuple(dict.fromkeys(names))
    if chosen and resume:
        raise UserError("--track with --resume: a resumed run keeps the trackers it began "
                        "with; drop --track")
    if chosen and storage is not None and is_uri(storage):
        raise UserError(f"--track {chosen[0]}: trackers write local files but --storage is "
                        f"{storage}; use a local --storage folder")
    for name in chosen:
        if name not in _PACKAGES:
            raise UserError(f"--track {name}: unknown tracker; choose from "
                            f"{', '.join(TRACKERS)}")
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--track {name}: the {package} package is not installed; "
                            f"pip install {package} (or pip install 'tune-sana[track]')")
    return chosen


def callbacks(names: Sequence[str], run_dir: str | os.PathLike[str],
              run_name: str) -> list[Callback]:
    """One :class:`StepRows` per tracker in ``names`` (check() them first), writing under the
    local ``run_dir``."""
    return [StepRows(name, str(run_dir), run_name) for name in names]


class StepRows(Callback):
    """Ray's logger callback for one tracker, fed one step row at a time (MLflow: a result's
    rows in one batch, into the run Ray's logger made).

    The inner logger is built in ``setup`` (the Tune loop's start), so this object pickles
    with the run config as three strings, and a restored run builds its logger again.
    """

    def __init__(self, tracker: str, run_dir: str, run_name: str) -> None:
        self.tracker = tracker
        self.run_dir = run_dir
        self.run_name = run_name
        self._inner: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracker": self.tracker, "run_dir": self.run_dir, "run_name": self.run_name,
                "_inner": None}

    def setup(self, *args: Any, **info: Any) -> None:
        self._inner = _logger(self.tracker, Path(self.run_dir), self.run_name)
        with _wandb_env(self.tracker):
            self._inner.setup(*args, **info)

    # --- Tune hooks, passed on ---------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._inner.on_trial_start(iteration=iteration, trials=trials, trial=trial, **info)

    def on_trial_restore(self, iteration: int, trials: list[Any], trial: Any,
                         **info: Any) -> None:
        self._inner.on_trial_restore(iteration=iteration, trials=trials, trial=trial, **info)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        rows = [row for row in step_rows(result) if isinstance(row.get("step"), int)]
        if self.tracker == "mlflow":
            _mlflow_batch(self._inner, trial, rows)
            return
        for row in rows:
            self._inner.on_trial_result(iteration=iteration, trials=trials, trial=trial,
                                        result={**_values(row), "training_iteration": row["step"]},
                                        **info)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        self._inner.on_trial_complete(iteration=iteration, trials=trials, trial=trial, **info)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._inner.on_trial_error(iteration=iteration, trials=trials, trial=trial, **info)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self._inner.on_experiment_end(trials=trials, **info)


def _values(row: dict[str, Any]) -> dict[str, float | int]:
    """What a tracker plots of a row: its numbers (None and text left out), without the step
    (the x axis) and the time it was made."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float))
            and not isinstance(v, bool) and k not in ("step", "timestamp")}


def _logger(tracker: str, run_dir: Path, run_name: str) -> Any:
    """Ray's logger callback for ``tracker``, set to write under ``run_dir``."""
    if tracker == "tensorboard":
        return _tensorboard_logger(run_dir / TENSORBOARD_FOLDER)
    if tracker == "mlflow":
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri = None if os.environ.get("MLFLOW_TRACKING_URI") else f"sqlite:///{run_dir / MLFLOW_DB}"
        for name in ("mlflow", "alembic"):  # their INFO lines as the store is made
            logging.getLogger(name).setLevel(logging.WARNING)
        return MLflowLoggerCallback(uri, experiment_name=run_name)
    from ray.air.integrations.wandb import WandbLoggerCallback

    (run_dir / WANDB_FOLDER).mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {"dir": str(run_dir)}
    mode = _wandb_mode()
    if mode:
        settings["mode"] = mode
    return WandbLoggerCallback(project=run_name, **settings)


def _tensorboard_logger(folder: Path) -> Any:
    """Ray's TensorBoard logger writing each trial's events to ``folder/<trial>``, not into the
    trial's own folder, where Ray's default logger writes one point per Ray result: so
    ``tensorboard --logdir folder`` shows only the step-true curves."""
    from ray.tune.logger import TBXLoggerCallback

    class TensorBoardRows(TBXLoggerCallback):  # type: ignore[misc]
        def log_trial_start(self, trial: Any) -> None:
            if trial in self._trial_writer:
                self._trial_writer[trial].close()
            self._trial_writer[trial] = self._summary_writer_cls(str(folder / str(trial)),
                                                                 flush_secs=30)
            self._trial_result[trial] = {}

    return TensorBoardRows()


class NoRayTensorBoard(TBXLoggerCallback):  # type: ignore[misc]
    """Stands in for the TensorBoard logger Ray Tune adds to a run that has none, so Ray adds
    none (its CSV and JSON loggers stay: result.json and progress.csv in each trial's folder, as
    before). Ray's default one imports tensorboardX, which imports torch into the driver (about
    180 MB of RSS in a driver that never trains), to write one point per Ray result, not per
    step; TensorBoard is ``--track tensorboard``, which writes every step row. Writes nothing;
    picklable (Ray keeps it in tuner.pkl)."""

    def __init__(self) -> None:  # no super().__init__(): it imports tensorboardX
        pass

    def log_trial_start(self, trial: Any) -> None:
        pass

    def log_trial_result(self, iteration: int, trial: Any, result: dict[str, Any]) -> None:
        pass

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        pass


def _mlflow_batch(logger: Any, trial: Any, rows: list[dict[str, Any]]) -> None:
    """A result's rows into the trial's MLflow run (Ray's logger made it) as one
    ``log_batch``: Ray's logger calls ``log_metric`` once per value, ~20 ms each on SQLite."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    if trial not in logger._trial_runs:
        logger.log_trial_start(trial)
    metrics = [Metric(key, float(value), int(1000 * float(row.get("timestamp") or time.time())),
                      row["step"])
               for row in rows for key, value in _values(row).items()]
    client = MlflowClient(logger.tracking_uri)
    for start in range(0, len(metrics), _MLFLOW_BATCH):
        client.log_batch(logger._trial_runs[trial], metrics=metrics[start:start + _MLFLOW_BATCH])


def _wandb_mode() -> str | None:
    """``offline`` unless W&B can log in (a key in $WANDB_API_KEY or from ``wandb login``);
    None when $WANDB_MODE chooses."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return None
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts  # where wandb login writes
    except (OSError, netrc.NetrcParseError):
        hosts = {}
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    return None if base.split("/")[0] in hosts else "offline"


@contextmanager
def _wandb_env(tracker: str) -> Iterator[None]:
    """$WANDB_MODE=offline while Ray's W&B logger sets up offline (it asks for a key unless
    the variable says offline); nothing for other trackers."""
    if tracker != "wandb" or _wandb_mode() is None:
        yield
        return
    os.environ["WANDB_MODE"] = "offline"
    try:
        yield
    finally:
        os.environ.pop("WANDB_MODE", None)
