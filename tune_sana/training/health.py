"""Divergence checks: pure functions over plain floats, and the small state they keep.

The guard (guard.py) stacks what one check needs into one tensor and moves it to the host once:
loss and gradient norm before the optimizer step, parameter norm and loss scale after it (one
sync per check, not one per tensor); everything here works on the floats. A non-finite
validation loss is the trial's own check (Cause.NONFINITE_METRIC), outside these.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from tune_sana.outcomes import Cause


class Verdict(str, enum.Enum):
    OK = "ok"
    SKIP = "skip"  # leave the weights alone this step, go on
    DIVERGED = "diverged"


@dataclass(frozen=True)
class Finding:
    verdict: Verdict
    cause: Cause | None = None

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.OK


OK = Finding(Verdict.OK)


def pre_step(loss: float, grad_norm: float, *, scaler_handles_grads: bool) -> Finding:
    """Check before ``optimizer.step()``.

    A NaN or inf loss is a divergence of the forward pass. A non-finite gradient norm with a
    finite loss is a divergence, except under fp16-amp (``scaler_handles_grads``), where
    GradScaler skips that step and lowers its scale: that is a SKIP, watched by ``loss_scale``.
    """
    if not math.isfinite(loss):
        return Finding(Verdict.DIVERGED, Cause.NONFINITE_LOSS)
    if not math.isfinite(grad_norm):
        if scaler_handles_grads:
            return Finding(Verdict.SKIP, Cause.NONFINITE_GRAD)
        return Finding(Verdict.DIVERGED, Cause.NONFINITE_GRAD)
    return OK


def post_step(param_norm: float) -> Finding:
    """Check after ``optimizer.step()``: the weights are still finite."""
    if not math.isfinite(param_norm):
        return Finding(Verdict.DIVERGED, Cause.NONFINITE_PARAMS)
    return OK


def loss_scale(scale: float, min_scale: float) -> Finding:
    """fp16-amp: a loss scale halved below ``min_scale`` means every step overflows."""
    if scale < min_scale:
        return Finding(Verdict.DIVERGED, Cause.LOSS_SCALE_COLLAPSE)
    return OK


@dataclass
class SpikeDetector:
    """Flags a loss far above its running level.

    The level is an exponential moving average of finite losses (``beta``); a loss above
    ``factor`` x level after ``warmup`` observations is a spike. NaN is never fed in (the
    pre-step check catches it first); ``factor=None`` disables the detector.
    """

    factor: float | None
    beta: float = 0.9
    warmup: int = 10
    level: float = 0.0
    seen: int = 0

    def update(self, loss: float) -> Finding:
        if self.factor is None:
            return OK
        if self.seen >= self.warmup and loss > self.factor * self.level:
            return Finding(Verdict.DIVERGED, Cause.LOSS_SPIKE)
        self.level = loss if self.seen == 0 else self.beta * self.level + (1 - self.beta) * loss
        self.seen += 1
        return OK


@dataclass
class SkipBudget:
    """``on_nonfinite: skip``: allow up to ``max_skips`` skipped steps, diverge on the next."""

    max_skips: int
    used: int = 0
    causes: list[Cause] = field(default_factory=list)

    def spend(self, cause: Cause) -> Finding:
        if self.used >= self.max_skips:
            return Finding(Verdict.DIVERGED, cause)
        self.used += 1
        self.causes.append(cause)
        return Finding(Verdict.SKIP, cause)
