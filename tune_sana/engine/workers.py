"""Multi-worker trials: a Ray Train TorchTrainer started from inside the Tune trial.

With ``resources.workers`` N > 1 the Tune trial (a function trainable, as Ray recommends for
Train v2) builds a TorchTrainer of N workers, each with ``resources.cpu``/``gpu``/``custom``,
and waits for it. Ray Train starts the processes and their process group (gloo on CPUs, NCCL
on GPUs); each worker runs the same trial program with its ``Ranks`` (training/ranks.py), so
the program itself never imports Ray.

Reporting. ``ray.train.report`` is a barrier: every worker must call it the same number of
times. Every rank therefore keeps the same relay (engine/relay.py) and flushes at the same rows:
counted in rows (``REPORT_EVERY_ROWS``), not in seconds, and at once for a metric row, a final
row or a checkpoint, all of which every rank reaches at the same step. Only rank 0's rows travel
(the other ranks report an empty result); Ray Train's TuneReportCallback hands them to the Tune
trial, so the driver's recorder sees the same results as from a one-worker trial.

Checkpoints and retries. Rank 0 writes each checkpoint (engine sees one folder); Ray Train keeps
them under the Tune trial's own storage (``<run>/<stage>/<trial>/train``). A worker process that
dies restarts the worker group from the latest checkpoint (Ray Train's FailureConfig, with the
space's ``max_retries``); a Tune retry of the whole trial starts a trainer with the same name
and storage, which Ray Train resumes from the same snapshot. Steps repeated after a restart
were recorded by the first report; the writer keeps the first (record/writer.py).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from tune_sana.engine import relay

REPORT_EVERY_ROWS = 10  # plain step rows per report when nothing urgent comes sooner
# Ray Train checks its workers every 2 s by default, and a report waits for the next check
# (about 1.8 s per report on a 2-core box); 0.2 s cuts that to ~0.16 s.
HEALTH_CHECK_INTERVAL_S = "0.2"


def train_storage() -> tuple[str, Any]:
    """(path, filesystem) of the current Tune trial's storage, where its trainer keeps its runs."""
    from ray import tune

    storage = tune.get_context().get_storage()
    return storage.trial_fs_path, storage.storage_filesystem


def run_workers(values: dict[str, Any], *, trial: str, workers: int, parallel: str,
                cpu: float, gpu: float, custom: dict[str, float], metric: str,
                max_retries: int, shipped: dict[str, Any] | None = None) -> None:
    """Run one trial on ``workers`` Ray Train workers; returns when its trainer ends.
    ``shipped``: driver folders in the object store (engine/shipping.py), which each worker
    copies to its own node."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    path, filesystem = train_storage()
    trainer = TorchTrainer(
        _worker_main,
        train_loop_config={"values": values, "trial": trial, "parallel": parallel,
                           "metric": metric, "shipped": shipped, "cpu": cpu},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu > 0,
                                     resources_per_worker={"CPU": cpu, **({"GPU": gpu} if gpu
                                                                          else {}), **custom}),
        torch_config=TorchConfig(backend="nccl" if gpu > 0 else "gloo"),
        run_config=RunConfig(name="train", storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=max_retries),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=[cast(Any, TuneReportCallback())]),
    )
    trainer.fit()


def _worker_main(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: this rank's run of the trial program, its rows relayed."""
    import ray
    import ray.train
    import torch

    from tune_sana.config import build_config
    from tune_sana.engine.trialrun import load_trial, run_relayed
    from tune_sana.training.ranks import Ranks

    torch.set_num_threads(max(1, int(loop_config["cpu"])))  # this worker's share of the node
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = None
    if torch.cuda.is_available() and loop_config["values"].get("device") != "cpu":
        from ray.train.torch import get_device

        device = str(get_device())
    ranks = Ranks.current(loop_config["parallel"], device=device)
    checkpointer = TrainCheckpointer(rank)
    values = loop_config["values"]
    if loop_config["shipped"]:
        from tune_sana.engine.shipping import localize

        values = localize(values, loop_config["shipped"])  # copies on this worker's node
    extra = {"node": ray.get_runtime_context().get_node_id()}  # rank 0's: trials.parquet's

    def send(result: dict[str, Any], checkpoint: Any) -> None:
        if rank == 0:
            ray.train.report({**result, **extra}, checkpoint=checkpoint)
        else:
            ray.train.report({}, checkpoint=None)

    rows = [0]  # the relay's clock: rows reported, the same count on every rank

    def count() -> None:
        rows[0] += 1

    outbox = relay.RowRelay(send, loop_config["metric"], every_s=REPORT_EVERY_ROWS,
                            clock=lambda: float(rows[0]))
    run = load_trial(loop_config["trial"])
    run_relayed(lambda report: run(build_config(values, "trial config"), report,
                                   checkpoint=checkpointer, ranks=ranks),
                outbox, checkpointer, on_row=count)


class TrainCheckpointer:
    """A trial's checkpoints as Ray Train checkpoints. Every rank joins the write (FSDP gathers
    its shards); rank 0's folder is the checkpoint, the others' are dropped. Every rank
    restores from the latest one."""

    PENDING = object()  # what the other ranks hold where rank 0 holds a checkpoint

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._pending: Any = None

    def restore(self) -> Path | None:
        import ray.train

        found = ray.train.get_checkpoint()
        return Path(found.to_directory()) if found is not None else None

    def save(self, write: Callable[[Path], None]) -> None:
        from ray.train import Checkpoint

        folder = Path(tempfile.mkdtemp(prefix="tune-sana-ckpt-"))
        write(folder)
        self._pending = Checkpoint.from_directory(str(folder)) if self.rank == 0 \
            else self.PENDING

    def take(self) -> Any:
        """The checkpoint to send with the next report (rank 0), or a marker that makes the
        other ranks' relays flush at the same row; None when there is none."""
        pending, self._pending = self._pending, None
        return pending
