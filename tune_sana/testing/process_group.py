"""Run one trial on N local processes joined by a gloo process group, without Ray.

Tests and bench/rank_agreement.py use it to check what multi-worker trials promise (the same
steps, verdicts and validation on every rank) apart from Ray Train's own start-up and
reporting. Each rank runs ``trials.sana_finetune.run`` with ``Ranks.current()``; its rows come
back per rank. ``fault`` names a function ``module:name`` called as ``fault(model, rank)`` on
every rank's ready model (a seam to inject a NaN on one rank, or a crash). ``checkpoint_dir``:
rank 0 keeps the trial's checkpoints there and every rank resumes from it, as under Ray Train;
with ``fault`` and ``retry``, a trial the fault made raise is run again in the same processes
(a restart without the process start-up: the rows are those of the second run).
"""

from __future__ import annotations

import importlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import start_processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RankCheckpointer:
    """Rank 0 saves into ``folder``; the other ranks join the write (FSDP gathers shards) into
    a scratch folder that is dropped. Every rank restores from ``folder``."""

    def __init__(self, folder: str, rank: int) -> None:
        from tune_sana.training.checkpoint import LocalCheckpointer

        self.rank, self.local = rank, LocalCheckpointer(folder)

    def restore(self) -> Path | None:
        return self.local.restore()

    def save(self, write: Any) -> None:
        if self.rank == 0:
            self.local.save(write)
            return
        with tempfile.TemporaryDirectory() as scratch:
            write(Path(scratch))


def _rank_main(rank: int, world: int, port: int, values: dict[str, Any], parallel: str,
               fault: str | None, out: str, agree: bool | list[bool],
               checkpoint_dir: str | None, retry: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from trials import sana_finetune
        from tune_sana.config import build_config
        from tune_sana.training.ranks import Ranks

        rows: list[dict[str, Any]] = []
        on_model = None
        if fault:
            module, _, name = fault.partition(":")
            inject = getattr(importlib.import_module(module), name)

            def on_model(model: torch.nn.Module) -> None:
                inject(model, rank)
        config = build_config(values, "test")
        if isinstance(agree, list):  # a series of runs in these same processes (the benchmark)
            series = []
            for each in agree:
                rows = []
                each_ranks = Ranks.current(parallel)
                sana_finetune.run(config, rows.append,
                                  ranks=each_ranks if each else _without_agreement(each_ranks))
                series.append(rows)
            torch.save(series, Path(out) / f"rank{rank}.pt")
            return
        ranks = Ranks.current(parallel)
        if not agree:
            ranks = _without_agreement(ranks)
        checkpoint = RankCheckpointer(checkpoint_dir, rank) if checkpoint_dir else None
        try:
            sana_finetune.run(config, rows.append, on_model=on_model, checkpoint=checkpoint,
                              ranks=ranks)
        except Exception:
            if not retry:
                raise
            rows.clear()
            sana_finetune.run(config, rows.append, checkpoint=checkpoint, ranks=ranks)
        torch.save(rows, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _without_agreement(ranks: Any) -> Any:
    """The benchmark's baseline: each rank checks its own loss (no all-reduce); verdicts may
    then differ between ranks, which is why the real trial never runs this way."""
    from tune_sana.training.ranks import Ranks

    class Unagreed(Ranks):
        def _attach_ride(self, ddp: torch.nn.Module) -> None:
            pass  # DDP's own C++ all-reduce, no hook

        def send_with_gradients(self, loss: torch.Tensor) -> None:
            pass

        def agree(self, loss: torch.Tensor) -> torch.Tensor:
            return Ranks().agree(loss)

    return Unagreed(ranks.rank, ranks.world, ranks.parallel, ranks.device)


def run_ranks(values: dict[str, Any], world: int = 2, parallel: str = "ddp",
              fault: str | None = None, agree: bool | list[bool] = True,
              checkpoint_dir: str | None = None, retry: bool = False
              ) -> list[list[dict[str, Any]]]:
    """Each rank's reported rows, in rank order (the trial's values as a trial config). A
    rank that raises raises here (torch.multiprocessing.ProcessRaisedException). ``agree`` a
    list: the trial runs once per entry in the same processes, with or without agreement, and
    each rank's entry is the list of those runs' rows."""
    with tempfile.TemporaryDirectory(prefix="tune-sana-ranks-") as out:
        start_processes(_rank_main, args=(world, _free_port(), values, parallel, fault, out,
                                             agree, checkpoint_dir, retry),
                           nprocs=world, join=True, start_method="spawn")
        files = [Path(out) / f"rank{r}.pt" for r in range(world)]
        return [torch.load(path, weights_only=True) for path in files]
