"""`tune-sana trial`: one JSON object per step (the last one carries the summary); user errors
are one line on stderr with exit status 2 and no traceback."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tune_sana.cli import main

TINY = ["--set", "model=sana-tiny", "--set", "batch_size=4", "--set", "val_batch_size=8",
        "--set", "device=cpu"]


def test_trial_prints_one_json_per_step_and_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trial", "--set", "steps=3", "--set", "eval_every=2", "--set", "lr=1e-3",
                 *TINY]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]  # step 0: the base
    assert all("outcome" not in row for row in rows[:-1])
    summary = rows[-1]
    assert summary["outcome"] == "completed" and summary["steps_run"] == 3
    assert summary["lr"] == 1e-3 and summary["ran_on"] == "cpu"
    assert [row["val_loss"] is not None for row in rows] == [True, False, True, True]
    for row in rows:
        for value in row.values():
            assert not isinstance(value, float) or math.isfinite(value)


def test_trial_reads_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "trial.yaml"
    config.write_text("steps: 5\nlr: 1e-3\nprecision: bf16\n")
    assert main(["trial", "--config", str(config), "--set", "steps=2", *TINY]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and rows[-1]["outcome"] == "completed" and rows[0]["lr"] == 1e-3


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--set", "lrr=1e-3"], "--set: unknown key 'lrr' (did you mean 'lr'?)"),
        (["--set", "precision=fp8"], "--set: key 'precision' = 'fp8'"),
        (["--set", "lr=-1"], "--set: key 'lr' = -1"),
        (["--set", "lr"], "expected key=value"),
        (["--config", "/no/such/file.yaml"], "/no/such/file.yaml: cannot read"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv: list[str], expected: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trial", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tune-sana: error: ")
    assert expected in lines[0]


def test_bad_key_in_a_config_file_names_the_file(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "trial.yaml"
    config.write_text("precison: fp32\n")
    assert main(["trial", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}: unknown key 'precison' (did you mean 'precision'?)" in err


def test_bad_key_from_the_shell_exits_2_without_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tune_sana.cli", "trial", "--set", "stepz=3"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        done.stderr.strip()] and "unknown key 'stepz' (did you mean 'steps'?)" in done.stderr
    assert "Traceback" not in done.stderr
