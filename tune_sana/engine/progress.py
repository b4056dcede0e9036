"""The sweep's progress on the driver: a live table in a terminal, plain lines anywhere else.

The recorder (engine/recorder.py) hands a :class:`Snapshot` to :class:`Progress` on every Tune
event. On a terminal the table is redrawn in place (at most every ``LIVE_EVERY_S``): trials
running and pending, the count of each outcome, the best validation loss so far, and the ETA.
Elsewhere (CI, logs, ``ray job submit``) one line is printed every ``every_s`` seconds, as
before, with the ETA at its end.

The ETA is the trials still to finish times the mean time per trial finished in this session
(elapsed / finished): trials run side by side, so this is the sweep's throughput, not one
trial's length. Unknown (``?``) until a trial finishes here, or when the sweep has no set
number of trials.

The table is drawn with rich but redrawn by this module: the cursor moves up over the last
table and the screen is cleared below it, then the new table is written, ending with a
newline. No thread, no hidden cursor, no alternate screen, so nothing is left to restore when
the sweep ends or is killed. A line written by anyone else below the table would be overwritten
by the next redraw, so the old table is left where it is and the next one drawn below it after
a write to ``sys.stderr`` (while the table is live, sys.stderr is a pass-through that notes
writes: the failure budget's line, a warning) or after a signal (engine/interrupt.py writes its
Ctrl-C notice straight to the file descriptor).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from tune_sana.outcomes import FINISHED, Outcome

LIVE_EVERY_S = 0.25  # shortest time between two redraws of the live table
_RUNNING_SHOWN = 8  # running trials listed in the table, at most


@dataclass(frozen=True)
class Snapshot:
    """What the sweep looks like now. ``counts``: trials of each outcome in the run's record;
    ``best``: (validation loss, trial id), None while no finite trial finished (or for a
    frontier search, which ranks nothing); ``finished`` of ``total``: this stage's trials that
    ended, of all it runs (None: unknown); ``steps``: (trial id, steps done) of running
    trials."""

    elapsed_s: float
    running: int
    pending: int
    counts: Mapping[str, int]
    best: tuple[float, str] | None = None
    finished: int = 0
    total: int | None = None
    eta_s: float | None = None
    steps: tuple[tuple[str, int | None], ...] = ()


def eta_s(total: int | None, finished: int, finished_before: int, elapsed_s: float) -> float | None:
    """Seconds until ``total`` trials have finished, at the rate trials finished in this session
    (``finished - finished_before`` in ``elapsed_s``); 0 once all have; None when unknown (no
    total, or none finished here yet)."""
    if total is None or total <= 0:
        return None
    left = total - finished
    if left <= 0:
        return 0.0
    done_here = finished - finished_before
    if done_here <= 0 or elapsed_s <= 0:
        return None
    return left * elapsed_s / done_here


def duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` for None."""
    if seconds is None:
        return "?"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole // 60 % 60:02d}m"


def line(snap: Snapshot) -> str:
    """The plain progress line: ``[  12s] running 2 | pending 0 | completed 1 | ... | best
    val_loss 0.1488 (abc_00001) | eta 40s``."""
    parts = [f"running {snap.running}", f"pending {snap.pending}"] + [
        f"{name} {snap.counts.get(name, 0)}" for name in FINISHED
    ]
    best = f" | best val_loss {snap.best[0]:.4g} ({snap.best[1]})" if snap.best else ""
    eta = f" | eta {duration(snap.eta_s)}" if snap.total else ""
    return f"[{snap.elapsed_s:6.0f}s] " + " | ".join(parts) + best + eta


def table(snap: Snapshot) -> Any:
    """The live table (a rich renderable): a line with the trials finished, elapsed time and
    ETA; the count of trials in each state; the best so far; the running trials' steps. About
    75 columns wide, so it fits an 80-column terminal."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    done = f"{snap.finished} of {snap.total}" if snap.total else str(snap.finished)
    head = Text(f"tune-sana sweep: {done} trials finished | elapsed {duration(snap.elapsed_s)}"
                f" | eta {duration(snap.eta_s)}", style="bold")
    counts = Table()
    for name in (Outcome.RUNNING.value, "pending", *FINISHED):
        counts.add_column(name, justify="right")
    counts.add_row(str(snap.running), str(snap.pending),
                   *[str(snap.counts.get(name, 0)) for name in FINISHED])
    best = Text("best val_loss " + (f"{snap.best[0]:.4g} ({snap.best[1]})" if snap.best else "-"))
    parts: list[Any] = [head, counts, best]
    if snap.steps:
        running = Table(box=None, padding=(0, 2))
        running.add_column("running trial")
        running.add_column("step", justify="right")
        for trial_id, step in snap.steps[:_RUNNING_SHOWN]:
            running.add_row(trial_id, "-" if step is None else str(step))
        more = len(snap.steps) - _RUNNING_SHOWN
        if more > 0:
            running.add_row(f"... {more} more", "")
        parts.append(running)
    return Group(*parts)


def is_live_terminal(stream: TextIO) -> bool:
    """True when ``stream`` is a terminal that can redraw in place (not TERM=dumb)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        return False
    return bool(tty) and os.environ.get("TERM", "") != "dumb"


class Progress:
    """Shows snapshots on ``stream`` (default: sys.stderr at each call): the live table when
    ``live`` (default: the stream is a terminal), else a plain line every ``every_s``."""

    def __init__(self, every_s: float, stream: TextIO | None = None,
                 live: bool | None = None) -> None:
        self.every_s = every_s
        self._stream = stream
        self._live = live
        self._last = 0.0
        self._height = 0  # lines of the table drawn last (0: none to redraw over)
        self._signal_seen = False
        self._watch: _Watched | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @property
    def live(self) -> bool:
        return is_live_terminal(self.stream) if self._live is None else self._live

    def show(self, snap: Snapshot, force: bool = False) -> None:
        now = time.monotonic()
        every = LIVE_EVERY_S if self.live else self.every_s
        if not force and now - self._last < every:
            return
        self._last = now
        if not self.live:
            print(line(snap), file=self.stream, flush=True)
            return
        stream = self.stream
        if isinstance(stream, _Watched):
            stream = stream.inner
        if not self._signal_seen and _signalled():
            self._signal_seen = True
            self._height = 0  # the Ctrl-C notice sits below the last table: keep both
        if self._watch is not None and self._watch.written:
            self._height = 0  # so does what someone printed to sys.stderr
        text = render(table(snap), width=_width(stream))
        up = f"\x1b[{self._height}F\x1b[J" if self._height else ""  # up N lines, clear below
        stream.write(up + text)
        stream.flush()
        self._height = text.count("\n")
        self._watch_stderr(stream)

    def close(self) -> None:
        """End the live region: the last table stays on screen, later output goes below, and
        sys.stderr is itself again."""
        self._height = 0
        if self._watch is not None and sys.stderr is self._watch:
            sys.stderr = self._watch.inner
        self._watch = None

    def _watch_stderr(self, stream: TextIO) -> None:
        """Note writes to sys.stderr from now on (when the table is drawn there)."""
        if self._watch is None and sys.stderr is stream:
            self._watch = _Watched(stream)
            sys.stderr = self._watch
        if self._watch is not None:
            self._watch.written = False


class _Watched(io.TextIOBase):
    """A text stream passed through to ``inner`` that notes whether anything was written."""

    def __init__(self, inner: TextIO) -> None:
        super().__init__()
        self.inner = inner
        self.written = False

    def write(self, text: str) -> int:
        self.written = self.written or bool(text)
        return self.inner.write(text)

    def flush(self) -> None:
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return self.inner.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.inner.encoding


def render(renderable: Any, width: int = 100) -> str:
    """``renderable`` as terminal text (colours and box drawing), ending with a newline."""
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, force_terminal=True, width=width, highlight=False).print(renderable)
    return buffer.getvalue()


def _width(stream: TextIO) -> int:
    """The terminal's width less one column (a full line would wrap on some terminals); a
    terminal that tells none (0 columns): $COLUMNS, else 80."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return max(40, (columns or shutil.get_terminal_size().columns) - 1)


def _signalled() -> bool:
    """A Ctrl-C (or SIGTERM) has come to the running sweep (engine/interrupt.py)."""
    from tune_sana.engine import interrupt

    return bool(interrupt._active and interrupt._active[0].signum)
