"""Whole files only: every record file is written to a dot-named temp file in its folder and
renamed into place, so a reader never sees a torn file (the writer and the compaction share it).
"""

from __future__ import annotations

import os
import signal

import pyarrow as pa

from tune_sana.record.storage import Location

__all__ = ["FAULT_ENV", "write_atomic"]

# Fault injection for the crash tests: SIGKILL this process inside the Nth atomic write, after the
# temp file is written and before it is renamed into place. Unset in normal use.
FAULT_ENV = "TUNE_SANA_FAULT_KILL_IN_WRITE"
_writes = [0]


def _maybe_die_mid_write() -> None:
    target = os.environ.get(FAULT_ENV)
    if target:
        _writes[0] += 1
        if _writes[0] == int(target):
            os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(table: pa.Table, path: str | os.PathLike[str] | Location) -> None:
    """Write ``table`` to ``path`` (a local path, a URI or a Location) via a temp file in the
    same folder, then an atomic rename (``fs.move`` on a URI).

    The temp file's name starts with a dot, so pyarrow datasets and globs for ``*.parquet``
    never see it; a crash leaves at most such a file, removed on resume.
    """
    Location.of(path).write_table_atomic(table, before_commit=_maybe_die_mid_write)
