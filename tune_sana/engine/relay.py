"""How a trial's step rows travel to the driver: in batches, with the rows that matter at once.

``ray.tune.report`` is a synchronous round trip: the training thread waits until the driver has
taken the result (about 6 ms on a CPU box). Reporting every step of a short step would spend a
quarter of the trial waiting, so the trial side buffers its rows and sends them as one result
when one of them matters to the driver, or when ``every_s`` has passed:

- a row carrying the sweep's metric (the scheduler and the searcher act on it),
- a row with an ``outcome`` (completed, diverged, error: the stopper acts on it),
- a row that comes with a checkpoint (a retry must find every row before it recorded),
- ``max_rows`` rows waiting.

The result Ray sees is the newest row, flat (so the metric, ``step`` and ``outcome`` are where
schedulers, stoppers and searchers look), with the rows before it under ``ROWS_KEY`` (one JSON
string: Ray's loggers pass strings by, where a list would be tried as a TensorBoard histogram)
and the schedulers' clock, steps done, under ``STEPS_KEY``. A row's ``ROW_TIME_KEY`` is when the
trial made it (Ray stamps results with their own time). ``unpack`` turns a result back into rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

ROWS_KEY = "rows_before"  # the batch's earlier rows, oldest first, as a JSON list
STEPS_KEY = "steps_done"  # the newest row's step (updates done): ASHA's time attribute
ROW_TIME_KEY = "row_time"  # wall-clock time the trial made the row
TRANSPORT_KEYS = frozenset({ROWS_KEY, STEPS_KEY})
EVERY_S = 1.0  # default longest wait of a plain step row (sweep option --report-every)

Send = Callable[[dict[str, Any], Any], None]


class RowRelay:
    """Buffers a trial's rows and hands them to ``send(result, checkpoint)`` in batches.

    ``every_s=0`` sends every row on its own (the per-step behaviour of a plain Ray trial).
    """

    def __init__(self, send: Send, metric: str, every_s: float = EVERY_S, max_rows: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._send = send
        self._metric = metric
        self._every_s = every_s
        self._max_rows = max_rows
        self._clock = clock
        self._rows: list[dict[str, Any]] = []
        self._last_sent = clock()

    def add(self, row: Mapping[str, Any], checkpoint: Any = None) -> None:
        """Queue ``row`` (already sanitized); send the batch now if it is due."""
        self._rows.append({**row, ROW_TIME_KEY: time.time()})
        urgent = (checkpoint is not None or "outcome" in row
                  or row.get(self._metric) is not None)
        if (urgent or len(self._rows) >= self._max_rows
                or self._clock() - self._last_sent >= self._every_s):
            self.flush(checkpoint)

    def flush(self, checkpoint: Any = None) -> None:
        """Send whatever is waiting (nothing to send: no call)."""
        if not self._rows:
            return
        *before, newest = self._rows
        self._rows = []
        result = dict(newest)
        if before:
            result[ROWS_KEY] = json.dumps(before)
        if isinstance(newest.get("step"), int):
            result[STEPS_KEY] = newest["step"]
        self._send(result, checkpoint)
        self._last_sent = self._clock()

    @property
    def waiting(self) -> int:
        return len(self._rows)


def unpack(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows one result carries, oldest first, without the transport keys; each row's
    ``row_time`` becomes its ``timestamp``. A result from a plain Ray trial is one row."""
    newest = {k: v for k, v in result.items() if k not in TRANSPORT_KEYS}
    rows = [*json.loads(result.get(ROWS_KEY) or "[]"), newest]
    for row in rows:
        if ROW_TIME_KEY in row:
            row["timestamp"] = row.pop(ROW_TIME_KEY)
    return rows
