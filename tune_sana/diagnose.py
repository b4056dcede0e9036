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
    """The first module (in execution order) whose output held a NaN/inf, if any, and the
    largest finite activation magnitude seen in the replay (fp16 tops out at 65504)."""

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


def replay_forward(model: nn.Module, forward: Callable[[], object]) -> Diagnosis:
    """Run ``forward()`` (no grad) with a hook on every module; report the first non-finite output.

    Leaf modules are checked before the containers that enclose them because hooks fire in
    completion order, so the first hit is the innermost module that produced the bad value.
    """
    first: list[str] = []
    peak = [0.0]

    def hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def _check(_module: nn.Module, _inputs: object, output: object) -> None:
            for tensor in _tensors(output):
                if not tensor.is_floating_point() or tensor.numel() == 0:
                    continue
                finite = torch.isfinite(tensor)
                if finite.any():
                    peak[0] = max(peak[0], float(tensor[finite].abs().max()))
                if not first and not bool(finite.all()):
                    first.append(name)

        return _check

    handles = [
        module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name
    ]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return Diagnosis(first[0] if first else None, peak[0] if peak[0] > 0 else None)


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
