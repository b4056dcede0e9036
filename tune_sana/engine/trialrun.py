"""What every runtime of a trial program shares: finding the program by its name, relaying its
rows, and the final row of a trial that raised. Used by the one-worker Tune trial (sweep.py) and
by each worker of a multi-worker trial (workers.py)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from tune_sana.engine.relay import RowRelay
from tune_sana.engine.space import TRIALS
from tune_sana.outcomes import Outcome


def load_trial(name: str) -> Callable[..., Any]:
    """The trial program's ``run(config, report[, checkpoint=])``, by the name a space gives."""
    module_name, _, func = TRIALS[name].partition(":")
    run: Callable[..., Any] = getattr(importlib.import_module(module_name), func)
    return run


def error_row(err: BaseException, step: int | None) -> dict[str, Any]:
    """The final row of a trial that raised: outcome error, the message in one line."""
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    message = text[0] if text else type(err).__name__
    if isinstance(err, MemoryError) or "out of memory" in message.lower() or \
            "can't allocate memory" in message:
        message = f"out of memory: {message}"
    row: dict[str, Any] = {"outcome": Outcome.ERROR.value, "error": message[:2000]}
    if step is not None:
        row["step"] = step
        row["steps_run"] = step
    return row


def run_relayed(call: Callable[[Callable[[dict[str, Any]], None]], object], outbox: RowRelay,
                checkpointer: Any, on_row: Callable[[], None] | None = None) -> None:
    """``call(report)`` runs the trial program; each row it reports is sanitized (NaN never
    reaches Ray) and queued in ``outbox`` with the checkpoint ``checkpointer`` has waiting.

    An exception (a bug, a bad setting, out of memory) ends the trial as ``error`` with its
    message, and the sweep goes on. It is not retried: it would fail again. Only a trial whose
    process dies is retried by Ray (FailureConfig). ``on_row`` is called before each row.
    """
    from tune_sana.engine.stopping import sanitize

    last_step: list[int] = []

    def report(row: dict[str, Any]) -> None:
        if on_row is not None:
            on_row()
        if "step" in row:
            last_step[:] = [int(row["step"])]
        outbox.add(sanitize(row), checkpoint=checkpointer.take())

    try:
        call(report)
    except Exception as err:  # any failure becomes the outcome
        outbox.add(error_row(err, last_step[0] if last_step else None))
    outbox.flush()  # a trial program that ended without a final row
