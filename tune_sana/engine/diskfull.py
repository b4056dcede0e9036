"""A full disk (or any other OSError) while the driver writes the record: the sweep stops, says so
in one line, and exits with ``EXIT_STATUS`` (4); ``tune-sana resume`` finishes it once the
problem is fixed, with nothing lost and nothing doubled.

How: the recorder's Tune hooks run under :func:`stops_on_write_error`. An OSError in one of them
(a history part, trials.parquet, any write of the record) becomes :class:`RecordWriteFailed`.
From then on the recorder writes nothing, and every one of its hooks raises that failure again,
its ``get_state`` included, which Ray calls each time it saves its experiment state: so Ray never
again saves that state. Tune lets the exception out of most hooks (``on_trial_result``: the next
result of any trial), ends its loop at once, stops the running trials (``runner.cleanup``) and
raises it out of ``Tuner.fit``; the hooks whose errors Tune swallows (``on_trial_complete`` is
called under a catch-all that logs "Error stopping trial") only delay that to the next hook, the
next attempted save, or ``on_experiment_end``. Ray's log lines about this exception are dropped.
:func:`stops` (around the sweep) turns it into :class:`DiskFull`, whose text is the line: the
file, the error, and the resume command.

Why nothing is lost: Ray's experiment state on disk is the one saved before the failed write,
so every trial whose rows or trials.parquet row did not reach the disk is still unfinished
there. The resumed sweep runs those trials again: from the start, or from a checkpoint whose
rows were written before Ray recorded it (the recorder flushes the rows that come with a
checkpoint at once). Rows written before the failure stay (atomic writes: no file is torn), and
the writer drops a re-run's steps that are already on disk (record/writer.py), so none is
written twice.

Ray's own writes (its experiment state, its result files) to a full disk raise OSError out of
``Tuner.fit`` too; :func:`stops` gives the same line for those (ENOSPC or EDQUOT anywhere in the
exception's chain), and Ray's warning about it is dropped.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tune_sana.engine.interrupt import Interrupted, RayFlags, resume_command
from tune_sana.record.storage import one_line

EXIT_STATUS = 4  # tune-sana sweep / resume's exit status when a record write failed
_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_FAILED_ATTR = "_record_write_failed"  # on a recorder whose write failed (never pickled)
# Ray logs these when its experiment state cannot be saved (then it raises, or tune-sana's hook
# raises next) and when a hook's error is caught in its trial-stopping code.
_RAY_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.tune")
_RAY_NOTICES = ("Trial controller checkpointing failed", "Experiment state snapshotting failed")

Hook = TypeVar("Hook", bound=Callable[..., Any])


class RecordWriteFailed(Exception):
    """Raised out of a recorder hook when the record could not be written; ends Tune's loop.
    ``error`` is the OSError (``filename``: the file, where the write named it)."""

    def __init__(self, error: OSError, where: str) -> None:
        super().__init__(f"{where}: {one_line(error)}")
        self.error = error
        self.where = where


class DiskFull(Interrupted):
    """The sweep stopped because the record could not be written. ``str()`` is the one line
    (what, why, how to resume); ``code`` is EXIT_STATUS."""


def stops_on_write_error(hook: Hook) -> Hook:
    """For a recorder's Tune hook (``self.run_dir`` names the run): an OSError in it becomes
    :class:`RecordWriteFailed`; after one, every such hook of the recorder raises it again
    without running (module docstring)."""
    @functools.wraps(hook)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        failed: RecordWriteFailed | None = getattr(self, _FAILED_ATTR, None)
        if failed is not None:
            raise RecordWriteFailed(failed.error, failed.where)
        try:
            return hook(self, *args, **kwargs)
        except OSError as err:
            failed = RecordWriteFailed(err, str(err.filename or self.run_dir))
            setattr(self, _FAILED_ATTR, failed)
            raise failed from err

    return guarded  # type: ignore[return-value]


@contextlib.contextmanager
def stops(run_dir: str | os.PathLike[str], flags: RayFlags | None = None) -> Iterator[None]:
    """Around a sweep: a failed record write, or an OSError of a full disk raised by Ray, leaves
    the block as :class:`DiskFull` with its line. Other errors go on as they are."""
    for name in _RAY_LOGGERS:
        logging.getLogger(name).addFilter(_drop_ray_notices)
    try:
        yield
    except RecordWriteFailed as err:
        raise DiskFull(_line(err.where, err.error, run_dir, flags), EXIT_STATUS) from None
    except Exception as err:
        full = _full_disk_error(err)
        if full is None:
            raise
        where = str(full.filename or run_dir)
        raise DiskFull(_line(where, full, run_dir, flags), EXIT_STATUS) from None
    finally:
        for name in _RAY_LOGGERS:
            logging.getLogger(name).removeFilter(_drop_ray_notices)


def _line(where: str, error: OSError, run_dir: str | os.PathLike[str],
          flags: RayFlags | None) -> str:
    full = error.errno in _FULL
    reason = error.strerror or one_line(error)
    fix = "free space" if full else "fix that (space, permissions, the mount)"
    return (f"{'disk full' if full else 'cannot write the record'}: writing {where} failed "
            f"({reason}); the sweep stopped and the record in {run_dir} is whole and "
            f"readable. To finish it, {fix}, then run: {resume_command(run_dir, flags)}")


def _full_disk_error(err: BaseException) -> OSError | None:
    """The OSError of a full disk in ``err``'s chain (its causes and contexts), if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return current
        current = current.__cause__ or current.__context__
    return None


def _drop_ray_notices(record: logging.LogRecord) -> bool:
    """False (drop) for Ray's lines about a failed record write or a failed state save."""
    if record.exc_info and isinstance(record.exc_info[1], RecordWriteFailed):
        return False
    return not record.getMessage().startswith(_RAY_NOTICES)
