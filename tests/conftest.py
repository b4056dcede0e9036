"""Shared fixtures: small trial configs on the tiny model, a run that collects its rows, and a
tiny saved checkpoint with fp16/bf16 variants. Keep this file small."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tune_sana.config import TrialConfig, build_config

# Small and fast on a shared 2-core CPU: fresh tiny Sana, small batches, a small val batch, one
# torch thread (the trial sets it process-wide; two threads on busy shared cores run slower).
# No sample grids (two per trial, ~0.1-0.3 s each here): tests/test_samples.py turns them on.
FAST: dict[str, Any] = {
    "model": "sana-tiny", "steps": 4, "batch_size": 8, "val_batch_size": 16, "eval_every": 2,
    "device": "cpu", "threads": 1, "sample_steps": 0,
}


def fast_config(**overrides: Any) -> TrialConfig:
    """A validated TrialConfig on the fresh tiny model with FAST defaults, plus overrides."""
    return build_config({**FAST, **overrides}, source="test")


def run_trial(config: TrialConfig,
              on_model: Callable[[torch.nn.Module], None] | None = None
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run trials/sana_finetune.py with a list-append report; returns (rows, summary)."""
    from trials import sana_finetune

    rows: list[dict[str, Any]] = []
    summary = sana_finetune.run(config, rows.append, on_model=on_model)
    return rows, summary


def assert_plain(rows: list[dict[str, Any]]) -> None:
    """Every value is None, a str, a bool, an int or a finite float: NaN never leaves a trial."""
    for row in rows:
        for key, value in row.items():
            assert value is None or type(value) in (str, bool, int, float), (key, type(value))
            if isinstance(value, float):
                assert math.isfinite(value), (row["step"], key, value)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny Sana saved in diffusers format: fp32 weights plus fp16 and bf16 variants."""
    from tune_sana.training.models import tiny_model

    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny_model(seed=3).save_pretrained(folder)  # type: ignore[operator]
    for variant, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model: Any = tiny_model(seed=3).to(dtype)  # each variant rounds the fp32 weights once
        model.save_pretrained(folder, variant=variant)
    return folder


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TUNE_SANA_HOME pointed at an empty folder (no demo base built there)."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUNE_SANA_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def demo_base() -> Path:
    """The tiny pretrained demo base under $TUNE_SANA_HOME, built once (~40 s) if missing."""
    from tune_sana.training.demo_base import ensure_demo_base

    return ensure_demo_base()


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory: pytest.TempPathFactory, demo_base: Path) -> Path:
    """A run dir with sample grids, recorded without Ray (tests/test_samples.py's record_run):
    the demo base, two completed trials (lr 1e-3 learns more than 1e-4 in 4 steps) and a
    diverged one (pure fp16 AdamW: its first update breaks the weights)."""
    from tests.test_samples import record_run

    run_dir = tmp_path_factory.mktemp("samples") / "run"
    record_run(run_dir, {
        "good": {"model": "demo-base", "lr": 1e-3, "steps": 4, "eval_every": 2},
        "slow": {"model": "demo-base", "lr": 1e-4, "steps": 4, "eval_every": 2},
        "bad": {"model": "demo-base", "lr": 1e-3, "steps": 2, "precision": "fp16"}})
    return run_dir


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray on 127.0.0.1 for one test module (started once, not per test)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()
