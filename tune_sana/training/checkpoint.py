"""Trial checkpoints, so a trial whose process dies resumes where it was instead of at step 0.

A trial program stays free of Ray: it is handed a ``Checkpointer`` (or None) and calls
``restore()`` once at setup and ``save(write)`` every ``checkpoint_every`` steps. The engine's
checkpointer hands the folder to Ray Tune; any other one may keep it on a local disk.

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
from safetensors.torch import load_model, save_model

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

    def write(self, folder: Path, next_step: int) -> None:
        save_model(self.model, str(folder / MODEL_FILE))
        torch.save(
            {
                "next_step": next_step,
                "optimizer": self.optimizer.state_dict(),
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
        load_model(self.model, str(folder / MODEL_FILE))
        saved = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.batches.load_state_dict(saved["batches"])
        self.noise_gen.set_state(saved["noise_gen"])
        self.guard.load_state_dict(saved["guard"])
        self.stats.load_state_dict(saved["stats"])
        return int(saved["next_step"])
