"""Multi-worker trials without Ray: two gloo processes run trials/sana_finetune.py together
(tune_sana/testing/process_group.py). What Ray Train adds on top is tested in
tests/test_workers_ray.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import FAST
from tune_sana.testing.process_group import run_ranks

pytestmark = pytest.mark.slow  # each case starts two processes that import torch and diffusers

# The demo: its pretrained base on the built-in data (FAST's sizes otherwise).
BASE: dict[str, Any] = {**FAST, "model": "demo-base", "data": "builtin:shapes", "steps": 4,
                        "batch_size": 4, "eval_every": 2}
NAN_STEP = 3


def nan_on_rank_1(model: nn.Module, rank: int) -> None:
    """From training step NAN_STEP on, rank 1's first linear attention returns NaN."""
    if rank != 1:
        return
    forwards = [0]

    def count(module: nn.Module, _args: object) -> None:
        forwards[0] += int(module.training)

    def poison(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        return output * math.nan if forwards[0] >= NAN_STEP else output

    model.register_forward_pre_hook(count)
    model.get_submodule("transformer_blocks.0.attn1").register_forward_hook(poison)


def crash_at_step_3(model: nn.Module, rank: int) -> None:
    """Every rank dies in step 3's forward (after step 2's checkpoint)."""
    forwards = [0]

    def count(module: nn.Module, _args: object) -> None:
        forwards[0] += int(module.training)
        if forwards[0] == 3:
            raise RuntimeError(f"killed on rank {rank}")

    model.register_forward_pre_hook(count)


def _by_step(rows: list[dict[str, Any]], key: str) -> dict[int, Any]:
    return {row["step"]: row[key] for row in rows if row.get(key) is not None}


@pytest.fixture(scope="module")
def ddp() -> list[list[dict[str, Any]]]:
    return run_ranks({**BASE, "checkpoint_every": 2}, world=2, parallel="ddp")


@pytest.fixture(scope="module")
def fsdp() -> list[list[dict[str, Any]]]:
    return run_ranks({**BASE, "checkpoint_every": 2}, world=2, parallel="fsdp")


def test_two_ddp_workers_equal_one_worker_accumulating_their_batches(
        ddp: list[list[dict[str, Any]]]) -> None:
    """2 workers x batch 4 see the samples, noise and timesteps of 1 worker x 2 micro-batches of
    4: the same losses, up to the order of float sums; validation is the one-worker number."""
    one = run_ranks({**BASE, "grad_accum_steps": 2}, world=1)[0]
    for key in ("train_loss", "val_loss"):
        ours, theirs = _by_step(ddp[0], key), _by_step(one, key)
        assert ours.keys() == theirs.keys() and ours
        for step in ours:
            assert ours[step] == pytest.approx(theirs[step], rel=1e-5), (key, step)
    assert _by_step(ddp[0], "val_loss")[0] == _by_step(one, "val_loss")[0]  # the base: exact
    assert _by_step(ddp[0], "val_loss") == _by_step(ddp[1], "val_loss")  # every rank agrees
    assert ddp[0][-1]["outcome"] == "completed" and ddp[0][-1]["workers"] == 2
    assert one[-1]["workers"] == 1 and one[-1]["nonfinite_rank"] is None


def test_a_nan_on_one_rank_stops_both_at_that_step_and_names_the_rank() -> None:
    ranks = run_ranks(BASE, world=2, fault="tests.test_workers:nan_on_rank_1")
    for rows in ranks:
        last = rows[-1]
        assert (last["outcome"], last["diverged_step"], last["divergence_cause"]) == \
            ("diverged", NAN_STEP, "nonfinite_loss")
        assert last["nonfinite_rank"] == 1
        assert last["nonfinite_module"] == "transformer_blocks.0.attn1"
        assert [r["step"] for r in rows] == list(range(NAN_STEP + 1))


def test_fsdp_trains_like_ddp(fsdp: list[list[dict[str, Any]]],
                              ddp: list[list[dict[str, Any]]]) -> None:
    assert fsdp[0][-1]["outcome"] == "completed"
    ours, theirs = _by_step(fsdp[0], "val_loss"), _by_step(ddp[0], "val_loss")
    assert ours[0] == theirs[0]
    assert ours[BASE["steps"]] == pytest.approx(theirs[BASE["steps"]], rel=1e-4)
    assert ours == _by_step(fsdp[1], "val_loss")
    assert fsdp[0][-1]["n_params"] == ddp[0][-1]["n_params"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_crashed_multi_worker_trial_resumes_to_the_same_loss(
        parallel: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    whole = request.getfixturevalue(parallel)[0]
    resumed = run_ranks({**BASE, "checkpoint_every": 2}, world=2, parallel=parallel,
                        fault="tests.test_workers:crash_at_step_3",
                        checkpoint_dir=str(tmp_path / "ckpt"), retry=True)[0]
    assert resumed[0]["step"] == 3  # went on after step 2's checkpoint, on both ranks
    assert resumed[-1]["final_val_loss"] == whole[-1]["final_val_loss"]
