"""The plumbing a trial needs around its loop: batches, and run statistics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from tune_sana.config import TrialConfig, UserError
from tune_sana.data.encoded import Encoded
from tune_sana.device import peak_memory
from tune_sana.outcomes import Outcome
from tune_sana.training.precision import PrecisionPolicy, pairing


class Batches:
    """Endless shuffled mini-batches of paired rows (latent i always with caption i).

    Each epoch is a fresh permutation from a generator seeded by the trial seed.
    """

    def __init__(self, data: Encoded, batch_size: int, seed: int) -> None:
        if len(data) == 0:
            raise UserError("the training set is empty")
        self.data = data
        self.batch_size = min(batch_size, len(data))
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(data), generator=self.gen)
        self.pos = 0

    def next(self) -> Encoded:
        if self.pos + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.data), generator=self.gen)
            self.pos = 0
        index = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.data.take(index)

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.pos = state["order"], int(state["pos"])


class RunStats:
    """Accumulates what the summary row reports: the base, best/final val loss, retain loss,
    timing, skips. Steps count optimizer updates; the base (step 0) never counts as best."""

    def __init__(self, config: TrialConfig, policy: PrecisionPolicy, device: torch.device,
                 n_params: int, workers: int = 1) -> None:
        self.started = time.perf_counter()
        self.best_val: float | None = None
        self.final_val: float | None = None
        self.base_val: float | None = None
        self.base_retain: float | None = None
        self.final_retain: float | None = None
        # the load check (training/damage.py): damaged_at_load, native_base_val_loss
        self.load_check: dict[str, Any] = {"damaged_at_load": None, "native_base_val_loss": None}
        self.skipped = 0
        self.steps_done = 0
        self.fixed = {
            "ran_on": str(device),
            "pairing": pairing(policy.mode, config.variant),
            "n_params": n_params,
            "workers": workers,
        }
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": time.perf_counter() - self.started, "best_val": self.best_val,
                "final_val": self.final_val, "skipped": self.skipped,
                "steps_done": self.steps_done, "base_val": self.base_val,
                "base_retain": self.base_retain, "final_retain": self.final_retain,
                "load_check": self.load_check}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started = time.perf_counter() - float(state["elapsed"])
        self.best_val, self.final_val = state["best_val"], state["final_val"]
        self.skipped, self.steps_done = int(state["skipped"]), int(state["steps_done"])
        # .get: a checkpoint written before the base was recorded has none
        self.base_val, self.base_retain = state.get("base_val"), state.get("base_retain")
        self.final_retain = state.get("final_retain")
        self.load_check = state.get("load_check", self.load_check)

    def record_base(self, row: dict[str, Any]) -> None:
        """Step 0: the losses of the untouched base."""
        self.base_val, self.base_retain = row.get("val_loss"), row.get("retain_loss")

    def record(self, row: dict[str, Any], skipped: bool) -> None:
        self.steps_done = row["step"]
        self.skipped += int(skipped)
        val = row.get("val_loss")
        if val is not None:
            self.final_val = val
            self.best_val = val if self.best_val is None else min(self.best_val, val)
        if row.get("retain_loss") is not None:
            self.final_retain = row["retain_loss"]

    def finish(self, report: Callable[[dict[str, Any]], None], step: int, outcome: Outcome,
               extra: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        """Report the trial's last row (its step's metrics plus the summary) and return it.

        A completed trial's last row was already recorded by the loop; a diverged step was not
        (its step counts as run, its metrics do not enter best/final val loss or the skips).
        """
        if outcome is not Outcome.COMPLETED:
            self.steps_done = step
        wall = time.perf_counter() - self.started
        peak_mb, peak_kind = peak_memory(self.device)
        summary = {
            **row,
            "outcome": outcome.value,
            "divergence_cause": None,
            "diverged_step": None,
            "nonfinite_at": None,
            "nonfinite_module": None,
            "max_abs_activation": None,
            "nonfinite_rank": None,
            **extra,
            "steps_run": self.steps_done,
            "skipped_steps": self.skipped,
            "best_val_loss": self.best_val,
            "final_val_loss": self.final_val,
            "base_val_loss": self.base_val,
            "improvement": improvement(self.best_val, self.base_val),
            "base_retain_loss": self.base_retain,
            "final_retain_loss": self.final_retain,
            **self.load_check,
            "wall_time_s": wall,
            "steps_per_s": self.steps_done / wall if wall > 0 else None,
            "peak_memory_mb": peak_mb,
            "peak_memory_kind": peak_kind,
            **self.fixed,
        }
        report(summary)
        return summary


def improvement(best: float | None, base: float | None) -> float | None:
    """1 - best / base: the share of the base's validation loss the fine-tune removed (negative
    when it made the model worse); None when either is unknown."""
    if best is None or base is None or base <= 0:
        return None
    return 1.0 - best / base
