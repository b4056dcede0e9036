"""Where a divergence was first seen: replay the failing batch once with forward hooks.

Hooks are attached only for the replay, so healthy steps pay nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Diagnosis:
    """The module where a NaN/inf first appeared (finite inputs, non-finite output), if any, and
    the largest finite activation magnitude seen in the replay (fp16 tops out at 65504)."""

    first_nonfinite_module: str | None
    max_abs_activation: float | None


def _tensors(output: object) -> Iterable[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif hasattr(output, "sample") and isinstance(output.sample, torch.Tensor):
        yield output.sample


def _all_finite(value: object) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(value) if t.is_floating_point())


def replay_forward(model: nn.Module, forward: Callable[[], object]) -> Diagnosis:
    """Run ``forward()`` (no grad) with a hook on every module; name where NaN/inf first appeared.

    The module named is the first (in completion order) whose inputs were all finite and whose
    output was not: the module that made the bad value, not the first one that merely carried it.
    (Sana's linear attention does its matmuls in the processor of ``attn1``, between its
    submodules: its NaN first shows in ``attn1.to_out.0``, whose input is already NaN, so
    ``attn1`` is named.) If no module qualifies, the first module with a non-finite output is.
    """
    origin: list[str] = []
    first: list[str] = []
    peak = [0.0]

    def hook(name: str) -> Callable[[nn.Module, tuple[object, ...], dict[str, object], object],
                                    None]:
        def _check(_module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object],
                   output: object) -> None:
            bad = False
            for tensor in _tensors(output):
                if not tensor.is_floating_point() or tensor.numel() == 0:
                    continue
                finite = torch.isfinite(tensor)
                if finite.any():
                    peak[0] = max(peak[0], float(tensor[finite].abs().max()))
                bad = bad or not bool(finite.all())
            if bad and not origin:
                if not first:
                    first.append(name)
                if _all_finite(args) and _all_finite(tuple(kwargs.values())):
                    origin.append(name)

        return _check

    handles = [
        module.register_forward_hook(hook(name), with_kwargs=True)
        for name, module in model.named_modules() if name
    ]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    found = origin or first
    return Diagnosis(found[0] if found else None, peak[0] if peak[0] > 0 else None)


def first_nonfinite_grad(model: nn.Module) -> str | None:
    """Name of the first parameter (in registration order) whose gradient is not finite."""
    for name, param in model.named_parameters():
        if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
            return name
    return None


def first_nonfinite_param(model: nn.Module) -> str | None:
    """Name of the first parameter (in registration order) holding a NaN or inf."""
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return name
    return None
