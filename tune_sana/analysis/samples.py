"""The sample grids of a run, read for the report: <run dir>/samples/<trial id>.png for each
completed trial and samples/base.png for the base (written by the driver, engine/samples.py;
drawn by training/sampling.py). A run written before grids existed, or with sample_steps 0,
has none: the report then shows no picture for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tune_sana.analysis.runs import Run
from tune_sana.analysis.tables import ranking
from tune_sana.outcomes import BASE_SAMPLES, SAMPLES_DIR, Outcome
from tune_sana.record.storage import Location

# What the report says each grid is.
ABOUT = ("Each grid: the same prompts (the first validation captions), the same noise and the "
         "trial's sample_steps Euler steps of the flow, decoded by the data's decoder; the "
         "base is the checkpoint before any update.")


@dataclass(frozen=True)
class GalleryRow:
    """One trial's grid, its loss curve (PNG, drawn by plots.py; None before it is) and a
    caption."""

    trial_id: str
    caption: str
    grid: bytes
    curve: bytes | None = None


@dataclass(frozen=True)
class Gallery:
    """One run's pictures: the base's grid (None if it has none) and its top trials' rows."""

    label: str
    base: bytes | None
    rows: list[GalleryRow] = field(default_factory=list)


def read_grid(run_dir: str | os.PathLike[str], name: str) -> bytes | None:
    """The PNG bytes of grid ``name`` (a trial id, or BASE_SAMPLES), None when there is none."""
    target = Location.of(run_dir) / SAMPLES_DIR / f"{name}.png"
    if not target.is_file():
        return None
    if target.is_local:
        with open(target.path, "rb") as file:
            return file.read()
    with target.fs.open_input_stream(target.path) as stream:
        data: bytes = stream.read()
    return data


def gallery(run: Run, top: int) -> Gallery | None:
    """The base's grid and the grids of the run's ``top`` ranked completed trials that have
    one, best first (captions: trial id, precision, lr, best val loss); None when the run has
    no grid at all."""
    best = ranking([run], ["precision", "lr"], top).to_pylist()
    rows = []
    for row in best:
        if row["outcome"] != Outcome.COMPLETED.value:
            continue
        grid = read_grid(run.path, row["trial_id"])
        if grid is not None:
            caption = (f"{row['trial_id']} {row['precision']} lr={row['lr']:.1e} "
                       f"best val {row['best_val_loss']:.4g}")
            rows.append(GalleryRow(row["trial_id"], caption, grid))
    base = read_grid(run.path, BASE_SAMPLES)
    if base is None and not rows:
        return None
    return Gallery(run.label, base, rows)
