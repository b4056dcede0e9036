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


def run_in_terminal(args: list[str], timeout_s: float = 300.0,
                    env: dict[str, str | None] | None = None) -> tuple[int, str]:
    """``tune-sana <args>`` with a pseudo-terminal as its stdin, stdout and stderr (as in a
    user's shell), in this environment changed by ``env`` (None: the variable removed);
    returns its exit status and everything it wrote."""
    import fcntl
    import pty
    import struct
    import termios
    import time

    changed = {**os.environ, "TERM": "xterm-256color", **(env or {})}

    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # 100x40
    os.set_blocking(main_fd, False)
    proc = subprocess.Popen([sys.executable, "-m", "tune_sana.cli", *args], stdin=child_fd,
                            stdout=child_fd, stderr=child_fd, close_fds=True,
                            env={k: v for k, v in changed.items() if v is not None})
    os.close(child_fd)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main_fd, 65536)
        except BlockingIOError:  # nothing to read yet
            if proc.poll() is not None:
                break
            time.sleep(0.05)
            continue
        except OSError:  # EIO: every writer of the terminal has closed it
            break
        if not chunk:
            break
        out += chunk
    os.close(main_fd)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return code, out.decode(errors="replace")
