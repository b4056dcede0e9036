"""What every runtime of a trial program shares: finding the program by its name, and the final
row of a trial that raised. Used by the one-worker Tune trial (sweep.py) and by each worker of
a multi-worker trial (workers.py)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

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
