"""Host syncs in the trial's loop: the guard's two per step, and nothing else per step.

On a GPU every read of a device tensor's value on the host waits for the queued kernels: a sync.
Those reads are ``.item()``, ``.tolist()``, ``float(t)`` and GradScaler's ``get_scale()`` (an
``.item()`` of its scale tensor). tune_sana/training/guard.py promises one before
``optimizer.step()`` (loss and grad norm) and one after it (parameter norm and loss scale). The
calls are the same on the CPU, so counting them here checks the promise without a GPU.

Not counted: AdamW's ``.item()`` of its per-parameter ``step`` counters (torch keeps them on the
host unless the optimizer is capturable or fused, so reading them waits for nothing), and the
setup before the model is ready (building the built-in data reads it on the host; no training
has started).
"""

from __future__ import annotations

import collections
import math
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.conftest import fast_config
from tests.test_trial import _corrupt_grad_at

READS: tuple[tuple[type, str], ...] = (
    (torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "__float__"),
    (torch.amp.GradScaler, "get_scale"),
)


class SyncCounter:
    """Counts host reads by the function that made them, once ``start()`` is called.

    A read made inside another counted read (get_scale's own ``.item()``) counts once.
    """

    def __init__(self) -> None:
        self.by_caller: collections.Counter[str] = collections.Counter()
        self.optimizers: list[torch.optim.Optimizer] = []
        self.counting = False
        self._depth = 0

    def start(self, _model: nn.Module) -> None:
        self.counting = True

    def total(self) -> int:
        return sum(self.by_caller.values())

    def _host_counter(self, obj: object) -> bool:
        return any(obj is state.get("step") for opt in self.optimizers
                   for state in opt.state.values())

    def wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(obj: object, *args: Any, **kwargs: Any) -> Any:
            if self.counting and self._depth == 0 and not self._host_counter(obj):
                self.by_caller[sys._getframe(1).f_code.co_qualname] += 1
            self._depth += 1
            try:
                return original(obj, *args, **kwargs)
            finally:
                self._depth -= 1

        return counted


def _run_counting(monkeypatch: pytest.MonkeyPatch, config: Any,
                  hook: Callable[[list[dict[str, Any]]], Callable[[nn.Module], None]] | None
                  ) -> tuple[SyncCounter, list[dict[str, Any]], dict[str, Any]]:
    from trials import sana_finetune

    counter = SyncCounter()
    for owner, name in READS:
        monkeypatch.setattr(owner, name, counter.wrap(getattr(owner, name)))
    rows: list[dict[str, Any]] = []

    def on_model(model: nn.Module) -> None:
        if hook is not None:
            hook(rows)(model)
        counter.start(model)

    handle = register_optimizer_step_pre_hook(
        lambda opt, *_: None if opt in counter.optimizers else counter.optimizers.append(opt))
    try:
        summary = sana_finetune.run(config, rows.append, on_model=on_model)
    finally:
        handle.remove()
    return counter, rows, summary


# Each evaluation reads two losses: the validation set's and the retain set's.
SETS = 2
# Step 0's load check (training/damage.py) reads one more: sana-tiny's fp32 weights run under
# fp16 autocast, another compute dtype, so the base is also evaluated in fp32 (once).
LOAD_CHECK = 1


def test_fp16_amp_trial_syncs_twice_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    steps, evals = 4, 3  # eval_every=2: the base (step 0), then after steps 2 and 4
    config = fast_config(precision="fp16-amp", attention_fp32=True, steps=steps, eval_every=2)
    counter, rows, summary = _run_counting(monkeypatch, config, None)
    assert summary["outcome"] == "completed" and len(rows) == steps + 1
    assert [row["loss_scale"] for row in rows] == [65536.0] * (steps + 1)
    # 2 per step (the guard's), 1 per evaluated set (its K losses in one read), 1 at setup: the
    # scaler's initial scale, a float until the first scale() makes it a tensor (no device wait
    # even on a GPU, but counted here as a get_scale call).
    assert counter.total() == 2 * steps + SETS * evals + LOAD_CHECK + 1, counter.by_caller
    assert counter.by_caller == {"Guard.before_step": steps, "Guard.after_step": steps,
                                 "FixedValidation.__call__": SETS * evals + LOAD_CHECK,
                                 "scale_on_host": 1}


def test_fp16_amp_back_offs_are_seen_without_extra_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    # inf gradients every step: GradScaler skips each step and halves its scale; the trial sees
    # the halving in the one after-step read and diverges on the floor at step 3.
    config = fast_config(precision="fp16-amp", attention_fp32=True, steps=6, eval_every=2,
                         min_loss_scale=1e4)
    counter, rows, summary = _run_counting(
        monkeypatch, config,
        lambda rows: _corrupt_grad_at(rows, "proj_out.weight", set(range(1, 7)), math.inf))
    assert summary["divergence_cause"] == "loss_scale_collapse" and summary["step"] == 3
    assert [row["skipped"] for row in rows] == [False, True, True, True]
    # 3 steps x 2, the base's and step 2's evaluations, the scale read at setup; a loss-scale
    # collapse needs no replay to say where it was seen.
    assert counter.total() == 2 * 3 + SETS * 2 + LOAD_CHECK + 1, counter.by_caller
