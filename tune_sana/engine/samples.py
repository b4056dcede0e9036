"""The driver's side of the sample grids: a trial sends its pictures in its rows (base64 PNG
text, training/sampling.py); the recorder hands each row here, and the PNG is written under
the run directory, which trials on other nodes cannot reach:

    <run dir>/samples/<trial id>.png   a completed trial's grid (from its summary row)
    <run dir>/samples/base.png         the base's grid: the first step-0 row that carries one

The keys are popped from the row, so no picture reaches the Parquet record.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path
from typing import Any

from tune_sana.outcomes import BASE_SAMPLES, BASE_SAMPLES_KEY, SAMPLES_DIR, SAMPLES_KEY
from tune_sana.record.storage import Location

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def keep(run_dir: str, trial_id: str, row: dict[str, Any]) -> None:
    """Pop the grids ``row`` carries and write them: the trial's own as <trial id>.png, the
    base's as base.png unless one is there already. Text that is not a base64 PNG is dropped
    (a picture is never worth failing the record for)."""
    own, base = row.pop(SAMPLES_KEY, None), row.pop(BASE_SAMPLES_KEY, None)
    if own is not None:
        _write(run_dir, trial_id, own, replace=True)
    if base is not None:
        _write(run_dir, BASE_SAMPLES, base, replace=False)


def path_of(run_dir: str | os.PathLike[str], name: str) -> Location:
    """Where grid ``name`` (a trial id, or BASE_SAMPLES) lives in a run directory."""
    return Location.of(run_dir) / SAMPLES_DIR / f"{name}.png"


def _write(run_dir: str, name: str, text: object, replace: bool) -> None:
    try:
        png = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        return
    if not png.startswith(PNG_MAGIC):
        return
    target = path_of(run_dir, name)
    if not replace and target.exists():
        return
    if target.is_local:  # temp file + rename: a reader never sees half a PNG
        folder = Path(target.path).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(png)
            os.replace(tmp, target.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    target.parent.create_dir()  # an object store writes a whole object or none
    with target.fs.open_output_stream(target.path) as stream:
        stream.write(png)
