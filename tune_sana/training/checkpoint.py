"""Trial checkpoints, so a trial whose process dies resumes where it was instead of at step 0.

A trial program stays free of Ray: it is handed a ``Checkpointer`` (or None) and calls
``restore()`` once at setup and ``save(write)`` every ``checkpoint_every`` steps. The engine's
checkpointer hands the folder to Ray Tune; any other one may keep it on a local disk.

With several workers (training/ranks.py) rank 0 writes the folder and every rank reads it back:
replicas (ddp) hold the same weights and optimizer state; shards (fsdp) are gathered into full
state dicts first (a collective every rank joins) and each rank takes its shard on load.
Samplers, generators and counters are the same on every rank.

Weights are written as safetensors; the rest (optimizer, scheduler, scaler, generator states and
small counters) with ``torch.save`` and read back with ``weights_only=True``: no pickle runs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from tune_sana.training.ranks import Ranks

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


class Checkpointer(Protocol):
    """Where a trial's checkpoints go and come from."""

    def restore(self) -> Path | None:
        """The folder of the latest checkpoint of this trial, or None for a fresh start."""
        ...

    def save(self, write: Callable[[Path], None]) -> None:
        """Call ``write(folder)`` to fill a new checkpoint folder, then keep it."""
        ...


class LocalCheckpointer:
    """Keeps the latest checkpoint in one folder (for runs outside Ray, and for tests)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def restore(self) -> Path | None:
        return self.folder if (self.folder / STATE_FILE).is_file() else None

    def save(self, write: Callable[[Path], None]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=self.folder.parent))
        write(tmp)
        for item in tmp.iterdir():  # files are renamed one by one; STATE_FILE last marks it done
            if item.name != STATE_FILE:
                item.replace(self.folder / item.name)
        (tmp / STATE_FILE).replace(self.folder / STATE_FILE)
        tmp.rmdir()


@dataclass
class TrainState:
    """Everything a trial needs to continue exactly: same weights, same batches, same noise."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    batches: Any
    noise_gen: torch.Generator
    guard: Any
    stats: Any
    ranks: Ranks = Ranks()

    def write(self, folder: Path, next_step: int) -> None:
        """Fill ``folder`` (rank 0; the other ranks only join the gathering of shards)."""
        optimizer = self._write_weights(folder)
        if self.ranks.rank != 0:
            return
        torch.save(
            {
                "next_step": next_step,
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "batches": self.batches.state_dict(),
                "noise_gen": self.noise_gen.get_state(),
                "guard": self.guard.state_dict(),
                "stats": self.stats.state_dict(),
            },
            folder / STATE_FILE,
        )

    def read(self, folder: Path) -> int:
        """Load a checkpoint folder into this state; returns the step to continue from."""
        saved = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
        self._read_weights(folder, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.batches.load_state_dict(saved["batches"])
        self.noise_gen.set_state(saved["noise_gen"])
        self.guard.load_state_dict(saved["guard"])
        self.stats.load_state_dict(saved["stats"])
        return int(saved["next_step"])

    def _write_weights(self, folder: Path) -> Any:
        """Write the weights (rank 0); return the optimizer's state dict to save with them."""
        if not self.ranks.sharded:
            if self.ranks.rank == 0:
                save_model(self.model, str(folder / MODEL_FILE))
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights: dict[str, Any] = get_model_state_dict(self.model, options=full)  # on rank 0
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=full)
        if self.ranks.rank == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / MODEL_FILE))
        return optimizer

    def _read_weights(self, folder: Path, optimizer: Any) -> None:
        if not self.ranks.sharded:
            load_model(self.model, str(folder / MODEL_FILE))
            self.optimizer.load_state_dict(optimizer)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True)  # every rank read the whole file
        weights: Any = load_file(str(folder / MODEL_FILE))
        set_model_state_dict(self.model, weights, options=full)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=full)
