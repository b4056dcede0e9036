"""The Tune callback that writes the Parquet record on the driver, and prints live progress.

Every reported row goes to history/; every finished trial becomes one trials.parquet row with
its outcome: ``completed``, ``diverged`` or ``collapsed`` as the trial said, ``pruned`` when the
scheduler stopped a finite trial early, ``error`` when it raised (with the message). The row says
the trial's ``stage`` (``search``, ``confirm`` for the confirm stage's replicas, ``frontier``
for a frontier search's probes), its ``config_id`` (engine/confirm.py) and, for a probe, the
``combo_id`` of the combination it maps (engine/frontier.py).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from ray.tune import Callback

from tune_sana.config import Precision, TrialConfig
from tune_sana.engine.confirm import STAGE_SEARCH, config_id
from tune_sana.engine.diskfull import stops_on_write_error
from tune_sana.engine.frontier import combo_id
from tune_sana.engine.progress import Progress, Snapshot, eta_s
from tune_sana.engine.relay import unpack
from tune_sana.engine.samples import keep as keep_samples
from tune_sana.engine.space import TRIAL_CONFIG_TRIALS, SweepSpec
from tune_sana.outcomes import FINITE, TRIAL_VERDICTS, Outcome
from tune_sana.record.writer import ResultsWriter

# Keys Ray adds to every result; they are not the trial's metrics.
_RAY_KEYS = {"config", "trial_id", "experiment_tag", "date", "timestamp", "time_this_iter_s",
             "time_total_s", "pid", "hostname", "node_ip", "time_since_restore",
             "iterations_since_restore", "checkpoint_dir_name", "done", "training_iteration"}


@dataclass
class _Track:
    """What the driver knows of one trial, for the row of a trial that never sent a summary."""

    started: float = field(default_factory=time.time)
    steps: int = 0
    best_val: float | None = None
    final_val: float | None = None
    last: dict[str, Any] = field(default_factory=dict)

    def update(self, result: dict[str, Any]) -> None:
        self.last = result
        if "step" in result:
            self.steps = int(result["step"])  # a step counts the optimizer updates done
        val = result.get("val_loss")
        if isinstance(val, (int, float)) and result.get("step") != 0:  # step 0: the base
            self.final_val = float(val)
            self.best_val = val if self.best_val is None else min(self.best_val, float(val))


class ResultsRecorder(Callback):
    """Writes history rows as they arrive and a trials row when a trial ends.

    Picklable: Ray stores the run config (with its callbacks) in tuner.pkl; after
    ``Tuner.restore`` the writer is re-opened in resume mode, so finished trials stay as written.
    """

    def __init__(self, run_dir: str, spec_yaml: str, *, progress_every_s: float,
                 stream: TextIO | None = None, resume: bool = False,
                 fixed: dict[str, Any] | None = None, stage: str = STAGE_SEARCH,
                 combo_keys: tuple[str, ...] = ()) -> None:
        self.run_dir = run_dir
        self.spec_yaml = spec_yaml
        self.fixed = dict(fixed or {})
        self.stage = stage
        self.combo_keys = tuple(combo_keys)
        self.progress_every_s = progress_every_s
        self._stream = stream
        self._resume = resume
        self._setup_state()

    def _setup_state(self) -> None:
        self._writer: ResultsWriter | None = None
        self._tracks: dict[str, _Track] = {}
        self._counts: Counter[str] = Counter()
        self._best: tuple[float, str] | None = None
        self._started = time.time()
        self._total: int | None = None  # trials the sweep runs in all (Ray's setup says)
        self._finished_before: int | None = None  # finished when this driver began
        self._view = Progress(self.progress_every_s, self._stream)  # engine/progress.py
        # Trials that take a TrialConfig have a precision / checkpoint-variant pairing.
        self._paired = _trial_of(self.spec_yaml) in TRIAL_CONFIG_TRIALS

    def __getstate__(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "spec_yaml": self.spec_yaml,
                "progress_every_s": self.progress_every_s, "fixed": self.fixed,
                "stage": self.stage, "combo_keys": self.combo_keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.stage = STAGE_SEARCH  # pickled before stages existed
        self.combo_keys = ()
        self.__dict__.update(state)
        self._stream = None
        self._resume = True
        self._setup_state()

    @property
    def writer(self) -> ResultsWriter:
        if self._writer is None:
            self._writer = ResultsWriter(self.run_dir, self.spec_yaml, resume=self._resume)
            self._counts.update(self._finished_outcomes())
        return self._writer

    def _finished_outcomes(self) -> list[str]:
        from tune_sana.record.readers import read_trials
        from tune_sana.record.schema import TRIALS_FILE
        from tune_sana.record.storage import Location

        if not (Location.of(self.run_dir) / TRIALS_FILE).is_file():
            return []
        return [str(o) for o in read_trials(self.run_dir, ["outcome"]).column(0).to_pylist()]

    # --- Tune hooks --------------------------------------------------------------------------

    @stops_on_write_error  # a failed write ends the sweep (engine/diskfull.py); so below
    def setup(self, *args: Any, **info: Any) -> None:
        _ = self.writer
        self._total = info.get("total_num_samples")

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._tracks[trial.trial_id] = _Track()
        self._progress(trials)

    @stops_on_write_error
    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        if trial.trial_id in self.writer.resumed:
            return
        track = self._tracks.setdefault(trial.trial_id, _Track())
        for row in _rows(result):
            if row.get("outcome") == Outcome.ERROR:
                continue  # the error row is a verdict, not a step: on_trial_complete records it
            keep_samples(self.run_dir, trial.trial_id, row)  # pictures: samples/, not Parquet
            track.update(row)
            self.writer.add_step(trial.trial_id, row)
        if result.get("should_checkpoint"):  # on disk before Ray records the checkpoint: a
            self.writer.flush()  # resume from it must find every row before it (diskfull.py)
        self._progress(trials)

    @stops_on_write_error
    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        track = self._tracks.pop(trial.trial_id, _Track())
        last = _rows(trial.last_result or {})[-1]
        if last:
            track.update(last)
        outcome = track.last.get("outcome")
        summary = dict(track.last)
        if outcome not in TRIAL_VERDICTS:
            summary["outcome"] = Outcome.PRUNED.value  # stopped by the scheduler while finite
        self._finish(trial, track, summary)
        self._progress(trials, force=True)

    @stops_on_write_error
    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        track = self._tracks.pop(trial.trial_id, _Track())
        summary = dict(track.last)
        summary.update(outcome=Outcome.ERROR.value, error=_error_text(trial))
        self._finish(trial, track, summary)
        self._progress(trials, force=True)

    @stops_on_write_error
    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.writer.compact()  # the sweep's small files folded into few (record/compaction.py)
        self._progress(trials, force=True)
        self._view.close()

    @stops_on_write_error  # raises once a write failed: Ray then saves no experiment state
    def get_state(self) -> dict[str, Any] | None:
        return None

    # --- helpers ---------------------------------------------------------------------------------

    def _finish(self, trial: Any, track: _Track, summary: dict[str, Any]) -> None:
        if trial.trial_id in self.writer.resumed:
            return
        summary.setdefault("steps_run", track.steps)
        summary.setdefault("best_val_loss", track.best_val)
        summary.setdefault("final_val_loss", track.final_val)
        summary.setdefault("wall_time_s", time.time() - track.started)
        summary["retries"] = int(getattr(trial, "num_failures", 0) or 0)
        # The row holds the whole configuration: fixed settings plus the searched ones.
        config = {**self.fixed, **trial.config}
        if summary.get("pairing") is None and self._paired:
            summary["pairing"] = _pairing(config)  # the trial's summary never came
        summary["stage"] = self.stage
        summary["config_id"] = config_id(config)
        if self.combo_keys:  # a frontier probe: the combination of categorical values it maps
            summary["combo_id"] = combo_id({k: config.get(k) for k in self.combo_keys})
        self.writer.finish_trial(trial.trial_id, config, summary)
        outcome = str(summary["outcome"])
        self._counts[outcome] += 1
        best = summary.get("best_val_loss")
        if outcome in FINITE and isinstance(best, (int, float)):
            if self._best is None or best < self._best[0]:
                self._best = (float(best), trial.trial_id)

    def _progress(self, trials: list[Any], force: bool = False) -> None:
        """The progress table or line (engine/progress.py)."""
        running = [t.trial_id for t in trials if t.status == "RUNNING"]
        finished = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR"))
        if self._finished_before is None:
            self._finished_before = finished  # a resumed run's earlier trials: not this rate
        elapsed = time.time() - self._started
        self._view.show(Snapshot(
            elapsed_s=elapsed, running=len(running),
            pending=sum(1 for t in trials if t.status == "PENDING"), counts=dict(self._counts),
            best=None if self.combo_keys else self._best,  # a frontier ranks nothing
            finished=finished, total=self._total,
            eta_s=eta_s(self._total, finished, self._finished_before, elapsed),
            steps=tuple((i, self._tracks[i].steps if i in self._tracks else None)
                        for i in running)), force=force)


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The trial's rows in one Ray result (several when the relay batched them)."""
    return unpack({k: v for k, v in result.items() if k not in _RAY_KEYS})


step_rows = _rows  # the same, for the trackers (engine/trackers.py)


def _trial_of(spec_yaml: str) -> str:
    """The trial program a sweep's spec names (SweepSpec's default where it names none)."""
    raw = yaml.safe_load(spec_yaml) if spec_yaml else None
    default = str(SweepSpec.model_fields["trial"].default)
    return str(raw.get("trial", default)) if isinstance(raw, dict) else default


def _pairing(config: dict[str, Any]) -> str | None:
    """native / crossed / n/a for a trial that never sent its summary (pruned, error), from its
    whole configuration: searched, else fixed, else TrialConfig's default precision and
    variant; None for a value that is not a precision mode."""
    from tune_sana.training.precision import pairing  # torch: only when a row needs it

    fields = TrialConfig.model_fields
    try:
        mode = Precision(config.get("precision", fields["precision"].default))
    except ValueError:
        return None
    return pairing(mode, config.get("variant", fields["variant"].default))


def _error_text(trial: Any) -> str:
    """The last line of the trial's error (its exception type and message)."""
    for attr in ("error_msg", "error_message"):
        text = getattr(trial, attr, None)
        if text:
            break
    else:
        path = getattr(trial, "error_file", None) or ""
        try:
            text = Path(path).read_text() if path else ""
        except OSError:
            text = ""
    lines = [line for line in str(text or "").strip().splitlines() if line.strip()]
    return lines[-1][:2000] if lines else "trial failed"
