"""Damage a NaN check cannot see: at load, and during training.

At load: Sana's FP16 checkpoints were trained with diffusers' attention processor clipping its
output to +-65504 under fp16, and depend on that clip; run in fp32 or bf16 they give other
outputs without any NaN (diffusers #10336). So a trial whose compute dtype is not its
checkpoint's native one evaluates its step-0 validation loss twice, in its own precision and
in the native one (``native_policy``; the trial runs it with the linear attention in fp32 and
the fp16 clip kept, as Sana's fp16 training did with ``fp32_attention``), and is flagged
``damaged_at_load`` when its own is worse by more than ``damage_tolerance``. A flag, not an
outcome: the trial trains on.

During training: a validation loss that stays finite but above ``collapse_factor`` x the base's
for ``collapse_patience`` evaluations in a row ends the trial as ``collapsed`` (a too-high lr
that wrecks the model without overflowing). The rules are pure functions of plain floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tune_sana.config import Precision
from tune_sana.training.precision import POLICIES, PrecisionPolicy

# The precision a checkpoint variant was trained in: its weights under autocast of their own
# dtype (an fp32 checkpoint, variant None, in plain fp32).
_NATIVE: dict[str | None, PrecisionPolicy] = {
    "fp16": PrecisionPolicy(Precision.FP16, torch.float16, torch.float16, False),
    "bf16": PrecisionPolicy(Precision.BF16, torch.bfloat16, torch.bfloat16, False),
    None: POLICIES[Precision.FP32],
}


def native_policy(variant: str | None) -> PrecisionPolicy:
    """How the checkpoint of ``variant`` (fp16, bf16, None = fp32) runs natively."""
    return _NATIVE[variant]


def needs_native_check(policy: PrecisionPolicy, variant: str | None) -> bool:
    """True when the trial computes in another dtype than its checkpoint's native one (fp16
    weights run in fp32 or bf16, bf16 weights in fp16, fp32 weights under autocast): only then
    do the two step-0 evaluations differ. Native pairs pay nothing."""
    return policy.compute_dtype != native_policy(variant).compute_dtype


def damaged(base: float, native: float | None, tolerance: float) -> bool:
    """The trial's own step-0 val loss ``base`` is worse than the ``native`` one by more than
    ``tolerance`` (a share: 0.05 = 5%). False when the native loss is unknown or not finite
    (the checkpoint fails in its own precision: nothing to compare with); a NaN ``base`` never
    gets here (the trial diverges at step 0)."""
    if native is None or not math.isfinite(native) or native <= 0:
        return False
    return base > native * (1.0 + tolerance)


def above_collapse(val_loss: float, base: float | None, factor: float | None) -> bool:
    """One evaluation counts towards a collapse: finite and above ``factor`` x ``base``.
    False when the check is off (``factor`` None) or the base is unknown."""
    if factor is None or base is None or not math.isfinite(val_loss):
        return False
    return val_loss > factor * base


@dataclass
class CollapseWatch:
    """Counts evaluations in a row above ``factor`` x ``base``; ``update`` says True on the
    ``patience``-th. A finite loss back at or below the line resets the count. NaN never gets
    here (a non-finite val loss is a divergence, checked first); it would reset the count."""

    factor: float | None
    patience: int
    base: float | None = None
    run: int = 0

    def update(self, val_loss: float) -> bool:
        self.run = self.run + 1 if above_collapse(val_loss, self.base, self.factor) else 0
        return self.run >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "run": self.run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base, self.run = state.get("base"), int(state.get("run", 0))
