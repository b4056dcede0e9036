"""Ctrl-C on a sweep: the first SIGINT (or SIGTERM) ends it cleanly and says how to resume; a
second one ends it at once.

First signal: Tune's loop ends after its current step, so no trial is launched any more; Tune
saves its experiment state with the running trials still unfinished (``--resume`` restarts them
from their last checkpoint), stops their processes, and calls the recorder's
``on_experiment_end``, which writes every row the driver has received to Parquet. Rows a trial
still held back (at most ``--report-every`` seconds of steps, relay.py) are never sent; the
resumed trial runs those steps again and the record keeps each step once. tune-sana then exits
with 128 + the signal (130 for SIGINT) and the resume command as its last line, and never says
the sweep is done.

Second signal: KeyboardInterrupt at once, except while the driver is inside Ray's write of its
experiment state (a plain ``json.dump`` and a copy to storage, neither atomic): it is raised as
soon as that write ends. tune-sana's own files are written atomically and are never torn.

How Tune is stopped: ``tune.run`` catches SIGINT itself (its handler sets an event the loop
checks, then logs ``Tuner.restore(...)`` as the way to resume). ``TUNE_DISABLE_SIGINT_HANDLER=1``
keeps it off SIGINT, but tune.run always installs the same handler for SIGUSR1: calling that
handler is how this module ends Tune's loop, from the signal handler and, for a signal that came
before tune.run installed it, from the :class:`StopTune` callback on the loop's next step.
Tune's log lines about the interruption are dropped (_TUNE_NOTICES).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Protocol

from ray.tune import Callback

from tune_sana.record.schema import SPEC_FILE
from tune_sana.record.storage import Location

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Ray writes its experiment state (and copies it to storage) in these functions, not atomically.
_RAY_STATE_WRITES = frozenset({"save_to_dir", "_atomic_save", "sync_up_experiment_state"})
# Tune's lines about an interruption (its resume hint names Tuner.restore), dropped once a signal
# has come; and, always, its note on a trial without result files (one cut before its first
# result, at the interruption or at the restore after it): tune-sana reads its own record.
_TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")
_TUNE_NOTICES = ("Stop signal received", "Experiment has been interrupted",
                 "Trials did not complete")
_TUNE_NO_METRICS = "Failed to fetch metrics"

_active: list[SignalStop] = []  # the guard in force, if any (one per process)


class Interrupted(KeyboardInterrupt):
    """The sweep was stopped by a signal. ``str()`` is the line saying how to resume; ``code``
    the exit status (128 + the signal number)."""

    def __init__(self, line: str, code: int = 130) -> None:
        super().__init__(line)
        self.code = code


class RayFlags(Protocol):
    """The options a resumed sweep must repeat to find the same Ray (SweepOptions has them)."""

    @property
    def address(self) -> str | None: ...
    @property
    def num_cpus(self) -> int | None: ...
    @property
    def num_gpus(self) -> int | None: ...


def resume_command(run_dir: str | os.PathLike[str], flags: RayFlags | None = None) -> str:
    """The command that continues ``run_dir``: ``tune-sana resume`` reads the run's own
    sweep.yaml, so no space file or ``--set`` value needs repeating."""
    words = ["tune-sana", "resume", str(run_dir)]
    if flags is not None:
        for flag, value in (("--address", flags.address), ("--num-cpus", flags.num_cpus),
                            ("--num-gpus", flags.num_gpus)):
            if value is not None:
                words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


class SignalStop:
    """While in force (a ``with`` block on the main thread), SIGINT and SIGTERM stop the sweep
    as the module docstring says. On leaving the block after a signal (or with a
    KeyboardInterrupt), :class:`Interrupted` is raised with the resume line."""

    def __init__(self, run_dir: str | os.PathLike[str], flags: RayFlags | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.run_dir = run_dir
        self.flags = flags
        self.signum = 0  # the first signal received; 0 while none
        self._say = say or _say
        self._saved: dict[int, Any] = {}
        self._env: str | None = None
        self._poked: set[int] = set()
        self._log_filter = _DropTuneNotices(self)
        self._installed = False

    # --- the block -------------------------------------------------------------------------------

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is not threading.main_thread() or _active:
            return self  # signal handlers can only be set on the main thread
        self._installed = True
        _active.append(self)
        self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for name in _TUNE_LOGGERS:
            logging.getLogger(name).addFilter(self._log_filter)
        self._saved = {s: signal.getsignal(s) for s in _SIGNALS}
        self.rearm()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._installed:
            for sig, handler in self._saved.items():
                signal.signal(sig, handler)
            if self._env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env
            for name in _TUNE_LOGGERS:
                logging.getLogger(name).removeFilter(self._log_filter)
            _active.remove(self)
            self._installed = False
        if isinstance(exc, Interrupted) or not (exc is None or isinstance(exc, KeyboardInterrupt)):
            return  # already said, or another error: it goes on as it is
        if self.signum or exc is not None:
            raise self.interrupted() from None

    def rearm(self) -> None:
        """(Re)install the handlers (Tune's SIGUSR1 handler puts back the SIGINT handler it
        found when tune.run began, which may not be this one)."""
        if self._installed:
            for sig in _SIGNALS:
                signal.signal(sig, self._on_signal)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal came (call it before and after Tuner.fit)."""
        if self.signum:
            raise self.interrupted()

    def interrupted(self) -> Interrupted:
        code = 128 + (self.signum or signal.SIGINT)
        if (Location.of(self.run_dir) / SPEC_FILE).is_file():
            line = (f"interrupted; the record in {self.run_dir} is whole and readable. "
                    f"Resume with: {resume_command(self.run_dir, self.flags)}")
        else:
            line = f"interrupted before the sweep began; nothing was recorded in {self.run_dir}"
        return Interrupted(line, code)

    # --- signals ---------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.signum:
            self.signum = signum
            self._say(f"{signal.Signals(signum).name}: stopping the sweep: no new trials; "
                      "running trials stop and what they reported is saved (press Ctrl-C "
                      "again to stop at once)")
            self.stop_tune()
            return
        if _in_ray_state_write(frame):
            # Ray's experiment state is being written: stop right after it, not in the middle.
            threading.Timer(0.05, self._again, (signum,)).start()
            return
        self._say(f"{signal.Signals(signum).name} again: stopping at once")
        raise KeyboardInterrupt

    def _again(self, signum: int) -> None:
        """A held-back second signal, sent again (unless the block has ended meanwhile)."""
        if self._installed:
            os.kill(os.getpid(), signum)

    def stop_tune(self) -> None:
        """End the running Tune loop after its current step (nothing if none runs)."""
        usr1: int | None = getattr(signal, "SIGUSR1", None)  # none on Windows
        if usr1 is None:
            return
        handler = signal.getsignal(usr1)
        if not callable(handler) or getattr(handler, "__module__", "") != "ray.tune.tune":
            return
        if id(handler) not in self._poked:
            self._poked.add(id(handler))
            handler(usr1, None)  # sets the loop's "interrupted" event
            self.rearm()  # Tune's handler put back the SIGINT handler it found at its start


class StopTune(Callback):  # type: ignore[misc]
    """A Tune callback: stops the loop on its next step once a signal has come (covers a signal
    that came before tune.run installed its handler). Stateless, so it pickles with the run."""

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if _active and _active[0].signum:
            _active[0].stop_tune()


def _in_ray_state_write(frame: FrameType | None) -> bool:
    while frame is not None:
        code = frame.f_code
        if code.co_name in _RAY_STATE_WRITES and f"{os.sep}ray{os.sep}" in code.co_filename:
            return True
        frame = frame.f_back
    return False


class _DropTuneNotices(logging.Filter):
    """Tune's own lines about an interruption (_TUNE_NOTICES) once a signal has come, and its
    note on trials without result files."""

    def __init__(self, guard: SignalStop) -> None:
        super().__init__()
        self._guard = guard

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_TUNE_NO_METRICS):
            return False
        return not (self._guard.signum and message.startswith(_TUNE_NOTICES))


def _say(line: str) -> None:
    """One line on stderr, also from a signal handler: written to the file descriptor, since a
    print there could re-enter a write to sys.stderr that the main thread was in the middle of
    (Python's buffered streams raise on that)."""
    text = f"tune-sana: {line}\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a test's)
        print(text, end="", file=sys.stderr, flush=True)
        return
    os.write(fd, text.encode())
