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


def _ride_rank(rank: int, world: int, port: int, out: str, loss_value: float) -> None:
    """One rank of test_the_health_vector_rides_the_gradients_all_reduce."""
    import os

    import torch.distributed as dist

    from tune_sana.training.ranks import Ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        ranks = Ranks.current()
        model = ranks.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1)), torch.device("cpu"))
        calls = [0]
        real = dist.all_reduce

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return real(*args, **kwargs)

        dist.all_reduce = counted  # type: ignore[assignment]
        results = []
        for step in range(2):
            x = torch.full((2, 4), float(rank + step))
            loss = model(x).pow(2).mean()
            if rank == 1 and step == 1:
                loss = loss * loss_value
            ranks.send_with_gradients(loss)
            loss.backward()
            rode = ranks.ride.arrived is not None
            results.append((rode, loss.item(), ranks.agree(loss).tolist(), calls[0]))
            if step == 0:
                grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        torch.save({"results": results, "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_health_vector_rides_the_gradients_all_reduce(tmp_path: Path) -> None:
    """Under ddp the step's [mean loss, flag per rank] comes back with the gradients: one
    all-reduce per bucket and none of its own, the same sums as a separate all-reduce, the
    gradients still averaged, and a NaN on rank 1 flagged as rank 1's."""
    from torch.multiprocessing.spawn import start_processes

    from tune_sana.testing.process_group import _free_port

    start_processes(_ride_rank, args=(2, _free_port(), str(tmp_path), math.nan), nprocs=2,
                    start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    (rode0, loss0, agreed0, calls0), (rode1, loss1, agreed1, calls1) = ranks[0]["results"][0], \
        ranks[1]["results"][0]
    assert rode0 and rode1 and calls0 == calls1 == 1  # the one bucket's all-reduce, no other
    assert agreed0 == agreed1 == pytest.approx([(loss0 + loss1) / 2, 0.0, 0.0])
    for g0, g1 in zip(ranks[0]["grads"], ranks[1]["grads"], strict=True):
        assert torch.equal(g0, g1)  # averaged: replicas agree
    step1 = [r["results"][1] for r in ranks]
    assert all(rode and calls == 2 for rode, _loss, _agreed, calls in step1)
    for _rode, _loss, agreed, _calls in step1:
        assert math.isnan(agreed[0]) and agreed[1:] == [0.0, 1.0]  # rank 1's NaN, named
