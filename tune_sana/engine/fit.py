"""Does every trial of a space fit in its share of a GPU? Preflight asks before launch.

Ray's fractional GPUs do not limit memory: with ``resources.gpu: 0.5`` two trials share one
GPU and each must fit in half of it (a trial of more than one GPU holds a full replica on each).
A trial needs training/memory.py's estimate of its tensors, plus what a CUDA process holds
beyond them: its context (CUDA_CONTEXT) and the caching allocator's slack (ALLOCATOR_SLACK).
The settings that change memory may be searched: the worst combination of their values must
fit, and the refusal names it. The GPU's memory comes from ``resources.gpu_memory_gb`` when set,
else from torch.cuda on the driver; with neither, or when no trial gets a GPU, nothing is
checked.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tune_sana.config import TrialConfig, UserError, build_config
from tune_sana.engine.space import SweepSpec
from tune_sana.training.memory import GIB, DataShape, MemoryEstimate, estimate, gib

CUDA_CONTEXT = GIB // 2  # CUDA context + cuBLAS/cuDNN handles of one process (~0.3-0.6 GiB)
ALLOCATOR_SLACK = 1.10  # PyTorch's caching allocator reserves more than it hands out
# Trial keys whose value changes a trial's memory (the others: lr, warmup, clipping, ...).
MEMORY_KEYS = ("model", "variant", "data", "precision", "optimizer", "batch_size",
               "grad_accum_steps", "gradient_checkpointing", "finetune", "lora_rank",
               "lora_targets", "val_batch_size", "val_draws", "damage_tolerance")


@dataclass(frozen=True)
class Fit:
    """The worst trial of a space: its searched memory settings, estimate and need (bytes)."""

    searched: dict[str, Any]
    estimate: MemoryEstimate

    @property
    def needed(self) -> int:
        return int(self.estimate.total * ALLOCATOR_SLACK) + CUDA_CONTEXT


def budget(spec: SweepSpec) -> int | None:
    """Bytes of GPU memory each trial may use (its share of one GPU), or None when nothing is
    checked: no trial gets a GPU, or the GPU's memory is unknown."""
    devices = {str(d) for d in _values(spec, "device")}
    if spec.resources.gpu <= 0 or not devices & {"cuda", "auto"}:
        return None
    total = gpu_total(spec)
    return None if total is None else int(min(spec.resources.gpu, 1.0) * total)


def gpu_total(spec: SweepSpec) -> int | None:
    """Bytes of one GPU: resources.gpu_memory_gb, else the driver's first CUDA device, else
    None."""
    if spec.resources.gpu_memory_gb is not None:
        return int(spec.resources.gpu_memory_gb * GIB)
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def worst_trial(spec: SweepSpec, model_configs: Mapping[str, Mapping[str, Any]],
                data: Mapping[str, DataShape]) -> Fit | None:
    """The combination of memory settings that needs the most, over every value the space can
    give them (each choice; both ends of a range). ``model_configs`` and ``data`` map each
    model and data value to its transformer config and shapes; a trial whose model or data is
    missing from them is not estimated (None when none is)."""
    values = {key: _values(spec, key) for key in MEMORY_KEYS}
    worst: Fit | None = None
    for combo in itertools.product(*values.values()):
        chosen = dict(zip(values, combo, strict=True))
        try:
            config = build_config({**spec.fixed, **chosen}, source="fit")
        except UserError:
            continue  # a combination no trial can have
        if config.model not in model_configs or config.data not in data:
            continue
        searched = {k: v for k, v in chosen.items() if k in spec.space}
        fit = Fit(searched, estimate(config, model_configs[config.model], data[config.data]))
        if worst is None or fit.needed > worst.needed:
            worst = fit
    return worst


def check_fit(spec: SweepSpec, model_configs: Mapping[str, Mapping[str, Any]],
              data: Mapping[str, DataShape]) -> Fit | None:
    """UserError (one line, with the numbers) when the worst trial cannot fit in its share of
    a GPU; returns that trial otherwise (None when nothing is checked)."""
    allowed = budget(spec)
    worst = worst_trial(spec, model_configs, data) if allowed is not None else None
    if worst is None or allowed is None:
        return None
    if worst.needed <= allowed:
        return worst
    share, total = min(spec.resources.gpu, 1.0), gpu_total(spec) or 0
    which = ("the trial with " + ", ".join(f"{k}={_show(v)}" for k, v in worst.searched.items())
             if worst.searched else "each trial")
    split = (f"{share:g} x {gib(total)} GiB = {gib(allowed)} GiB (Ray does not split GPU "
             "memory)" if share < 1 else f"{gib(allowed)} GiB")
    raise UserError(
        f"the space does not fit: {which} needs about {gib(worst.needed)} GiB of GPU memory "
        f"(tensors {worst.estimate.describe()}; plus {ALLOCATOR_SLACK - 1:.0%} allocator "
        f"slack and {gib(CUDA_CONTEXT)} GiB CUDA context), but resources.gpu "
        f"{spec.resources.gpu:g} "
        f"gives each trial {split}; lower batch_size, set gradient_checkpointing true, pick a "
        "smaller optimizer state or precision, or raise resources.gpu")


def _values(spec: SweepSpec, key: str) -> list[Any]:
    """Every value ``key`` can take that matters for memory: each choice, both ends of a range,
    else the fixed value or the default."""
    if key in spec.space:
        return spec.space[key].extremes()
    default = TrialConfig.model_fields[key].default
    value = spec.fixed.get(key, default)
    return [getattr(value, "value", value)]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
