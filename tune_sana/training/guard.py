"""The trial-side divergence guard: turns tensors into the pure checks of health.py.

One host sync before ``optimizer.step()`` (loss and grad norm travel together) and one after it
(parameter norm and, under fp16-amp, the loss scale); healthy steps add no other work. When a
check fails, the guard works out where the problem was first seen and builds the trial's final row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from tune_sana.config import OnNonfinite, TrialConfig
from tune_sana.outcomes import Cause, Outcome, clean
from tune_sana.training import diagnose, health
from tune_sana.training.damage import CollapseWatch
from tune_sana.training.health import Finding, Verdict
from tune_sana.training.ranks import Ranks, local


def _total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all of ``tensors``, in fp32. fp16 tensors' norms are taken in fp32: one
    above 65504 would read as inf although every element is finite (torch's get_total_norm
    keeps the tensors' dtype). Every other dtype's are taken in its own dtype (the kernel
    accumulates in fp32 either way) and only the per-tensor norms are cast: bf16 has fp32's
    range, so nothing overflows, and asking for fp32 output makes torch upcast each whole
    bf16 tensor first, which measured ~1.8x the time of the norm itself on the demo (CPU)."""
    wide = [t for t in tensors if t.dtype == torch.float16]
    native = [t for t in tensors if t.dtype != torch.float16]
    parts = [torch.stack(torch._foreach_norm(wide, 2, dtype=torch.float32))] if wide else []
    if native:
        parts.append(torch.stack(torch._foreach_norm(native, 2)).float())
    if not parts:
        return torch.zeros(())
    return cast(torch.Tensor, torch.linalg.vector_norm(torch.cat(parts)))


def _norm_over(tensors: list[torch.Tensor], ranks: Ranks | None) -> torch.Tensor:
    """The L2 norm of all of ``tensors``; under FSDP, of every rank's shards together."""
    if ranks is None or not ranks.sharded:
        return _total_norm(tensors)
    squares = _total_norm([local(t) for t in tensors]).square()
    return ranks.sum_squares(squares).sqrt()


def grad_norm(params: list[torch.nn.Parameter], max_norm: float | None,
              ranks: Ranks | None = None) -> torch.Tensor:
    """Total L2 norm of the gradients before clipping (fp32, 0-dim); clips if max_norm is set.

    A NaN/inf norm leaves the gradients untouched (clipping would multiply every gradient by
    NaN, and diagnose could no longer name the parameter whose gradient went bad first).
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = _norm_over(grads, ranks)
    if max_norm is not None:
        # scale = min(1, max_norm / norm); a norm of 0 in its place gives scale 1 (no sync here)
        safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
        if ranks is not None and ranks.sharded:  # each shard scaled in place, by the total
            scale = torch.clamp(max_norm / (safe + 1e-6), max=1.0)
            for g in grads:
                local(g).mul_(scale.to(g.dtype))
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, safe, foreach=True)
    return total


@torch.no_grad()  # cheaper than a .detach() per parameter, every step
def param_norm(params: list[torch.nn.Parameter], ranks: Ranks | None = None) -> torch.Tensor:
    """Total L2 norm of the parameters in fp32 (NaN/inf only if some weight is not finite)."""
    return _norm_over(list(params), ranks)


@dataclass
class Divergence:
    """What the final row of a diverged trial says."""

    step: int
    cause: Cause
    nonfinite_at: str
    nonfinite_module: str | None
    max_abs_activation: float | None
    rank: int | None = None  # the worker that saw it (multi-worker trials only)

    def row(self) -> dict[str, Any]:
        return {
            "outcome": Outcome.DIVERGED.value,
            "divergence_cause": self.cause.value,
            "diverged_step": self.step,
            "nonfinite_at": self.nonfinite_at,
            "nonfinite_module": self.nonfinite_module,
            "max_abs_activation": clean(self.max_abs_activation),
            "nonfinite_rank": self.rank,
        }


class Guard:
    """Health state of one trial: spike detector, skip budget, loss-scale floor, and the
    collapse watch over its validation losses (``collapse``: its base set at step 0).

    ``loss_scale`` is GradScaler's scale as the host last saw it (the initial or restored one,
    then each step's after ``update()``); None without loss scaling (every mode but fp16-amp).
    """

    def __init__(self, config: TrialConfig, loss_scale: float | None) -> None:
        self.loss_scale = loss_scale
        self.scaler_enabled = loss_scale is not None
        self.min_loss_scale = config.min_loss_scale
        self.spikes = health.SpikeDetector(config.loss_spike_factor)
        budget = config.max_skips if config.on_nonfinite is OnNonfinite.SKIP else 0
        self.skips = health.SkipBudget(budget)
        self.skipped_steps = 0
        self.collapse = CollapseWatch(config.collapse_factor, config.collapse_patience)
        self.flagged: list[int] = []  # ranks whose own loss was not finite at the last check

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.spikes.level, "seen": self.spikes.seen, "used": self.skips.used,
                "causes": [c.value for c in self.skips.causes],
                "skipped_steps": self.skipped_steps, "collapse": self.collapse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spikes.level, self.spikes.seen = float(state["level"]), int(state["seen"])
        self.skips.used = int(state["used"])
        self.skips.causes = [Cause(c) for c in state["causes"]]
        self.skipped_steps = int(state["skipped_steps"])
        self.collapse.load_state_dict(state.get("collapse", {}))  # none before collapse existed

    def before_step(self, loss: torch.Tensor, gnorm: torch.Tensor,
                    agreed: torch.Tensor | None = None) -> tuple[Finding, float, float]:
        """Check loss and grad norm (one sync). With several workers ``agreed`` is
        Ranks.agree's [mean loss, flag per rank], so every rank reaches the same verdict.
        Returns the finding and both as floats; ``flagged`` keeps the ranks whose own loss
        was not finite."""
        agreed = Ranks().agree(loss) if agreed is None else agreed
        loss_f, gnorm_f, *flags = torch.cat([agreed[:1], gnorm.detach().float().reshape(1),
                                             agreed[1:]]).tolist()
        self.flagged = [rank for rank, flag in enumerate(flags) if flag > 0]
        finding = health.pre_step(loss_f, gnorm_f, scaler_handles_grads=self.scaler_enabled)
        if finding.verdict is Verdict.SKIP:
            self.skipped_steps += 1  # GradScaler's own skip: watched through the loss scale
        elif finding.verdict is Verdict.DIVERGED and self.skips.max_skips:
            assert finding.cause is not None
            finding = self.skips.spend(finding.cause)
            if finding.verdict is Verdict.SKIP:
                self.skipped_steps += 1
        if finding.ok:
            finding = self.spikes.update(loss_f)
        return finding, loss_f, gnorm_f

    def after_step(self, pnorm: torch.Tensor, scale: torch.Tensor | None) -> tuple[Finding, bool]:
        """Check the weights and, under fp16-amp, the loss scale (one sync for both).

        ``scale`` is the scaler's scale tensor after ``update()`` (None without loss scaling).
        Returns the finding and whether the scale fell below last step's: GradScaler backed off
        because the gradients held inf/NaN, so the step was skipped. A NaN norm diverges.
        """
        if scale is None or self.loss_scale is None:
            return health.post_step(float(pnorm)), False
        pnorm_f, scale_f = torch.stack([pnorm.float(), scale.to(pnorm.device)]).tolist()
        backed_off = scale_f < self.loss_scale
        self.loss_scale = scale_f
        finding = health.post_step(pnorm_f)
        if finding.ok:
            finding = health.loss_scale(scale_f, self.min_loss_scale)
        return finding, backed_off

    def locate_across(self, ranks: Ranks, step: int, cause: Cause, model: nn.Module,
                      replay: Callable[[], object]) -> Divergence:
        """``locate`` on every rank (each replays its own batch), then the same answer on all:
        the lowest rank whose own loss went non-finite, else the lowest that found a module,
        else rank 0. With one worker, ``locate`` itself (no rank named)."""
        where = self.locate(step, cause, model, replay)
        if not ranks.distributed:
            return where
        found: list[Divergence] = ranks.gather(where)
        order = self.flagged + [r for r in range(ranks.world)
                                if found[r].nonfinite_module is not None]
        rank = order[0] if order else 0
        chosen = found[rank]
        chosen.rank = rank
        return chosen

    @staticmethod
    def locate(step: int, cause: Cause, model: nn.Module,
               replay: Callable[[], object]) -> Divergence:
        """Find where the divergence was first seen. Replays the forward only when it matters."""
        if cause is Cause.NONFINITE_PARAMS:
            name = diagnose.first_nonfinite_param(model)
            return Divergence(step, cause, "parameters", name, None)
        if cause in (Cause.NONFINITE_LOSS, Cause.NONFINITE_GRAD, Cause.NONFINITE_METRIC):
            found = diagnose.replay_forward(model, replay)
            if found.first_nonfinite_module is not None:
                return Divergence(step, cause, "forward", found.first_nonfinite_module,
                                  found.max_abs_activation)
            if cause is Cause.NONFINITE_GRAD:
                return Divergence(step, cause, "gradient", diagnose.first_nonfinite_grad(model),
                                  found.max_abs_activation)
            return Divergence(step, cause, "loss", None, found.max_abs_activation)
        where = "loss_scale" if cause is Cause.LOSS_SCALE_COLLAPSE else "loss"
        return Divergence(step, cause, where, None, None)
