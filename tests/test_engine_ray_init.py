"""Starting the embedded Ray: quiet about what does not concern a loopback-only instance."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine import write_space
from tune_sana.engine import sweep

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "Token authentication is enabled for this Ray cluster"


@pytest.mark.slow
def test_an_embedded_sweep_prints_no_token_authentication_notice(tmp_path: Path) -> None:
    space_file = write_space(tmp_path, "quiet", {
        "trial": "synthetic",
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1},
        "scheduler": {"type": "fifo"},
        "fixed": {"steps": 3},
        "space": {"lr": {"grid": [1e-3]}},
    })
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    result = subprocess.run(
        [sys.executable, "-m", "tune_sana.cli", "sweep", str(space_file), "--storage",
         str(tmp_path / "runs"), "--num-cpus", "1", "--progress-every", "30"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep done: 1 completed" in result.stderr
    assert NOTICE not in result.stderr, result.stderr[-3000:]


def test_only_the_notice_is_dropped_and_only_while_the_embedded_ray_starts() -> None:
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    # Other tests start Ray, which may raise the level of, or disable, loggers under "ray":
    # this test is about the filter only, so the logger is opened for the duration.
    handler = Keep()
    level, disabled = logger.level, logger.disabled
    logger.setLevel(logging.DEBUG)
    logger.disabled = False
    logger.addHandler(handler)
    try:
        with sweep._without_auth_notice():
            logger.warning(f"{NOTICE}. Set RAY_AUTH_MODE=disabled to opt out.")
            logger.warning("Token authentication is disabled for this Ray cluster.")
        logger.warning(f"{NOTICE}. After start.")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled
    assert seen == ["Token authentication is disabled for this Ray cluster.",
                    f"{NOTICE}. After start."]
