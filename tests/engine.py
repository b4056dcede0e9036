"""Helpers for tests that run real sweeps: write a space file, run the CLI, read the record."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from tune_sana.cli import main
from tune_sana.record.readers import read_history, read_trials


def write_space(folder: Path, name: str, spec: dict[str, Any]) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"# tune-sana sweep {path}\n" + yaml.safe_dump(spec))
    return path


def start_sweep(space_file: Path, storage: Path, *extra: str,
                env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``tune-sana sweep`` of run "k" under ``storage`` in its own process and session, so a
    test can SIGKILL the whole driver (os.killpg) and then resume it; stderr is piped."""
    cmd = [sys.executable, "-m", "tune_sana.cli", "sweep", str(space_file), "--storage",
           str(storage), "--name", "k", "--num-cpus", "2", "--progress-every", "30", *extra]
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def run_cli(*args: str) -> int:
    return main(["sweep", *args, "--progress-every", "30"])


def no_nonfinite(table: pa.Table) -> bool:
    """True if no float column of ``table`` holds NaN or inf (nulls are fine)."""
    for column in table.columns:
        if pa.types.is_floating(column.type):
            values = [v for v in column.to_pylist() if v is not None]
            if any(not math.isfinite(v) for v in values):
                return False
    return True


def last_steps(run_dir: Path) -> dict[str, int]:
    hist = read_history(run_dir, ["trial_id", "step"]).group_by("trial_id").aggregate(
        [("step", "max")])
    return dict(zip(hist["trial_id"].to_pylist(), hist["step_max"].to_pylist(), strict=True))


def trials_by_id(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {row["trial_id"]: row for row in read_trials(run_dir).to_pylist()}
