"""Precision modes as data, and the one place that applies them.

| mode     | trainable weights | compute        | loss scaling        | optimizer state |
|----------|-------------------|----------------|---------------------|-----------------|
| fp32     | fp32              | fp32           | none                | fp32            |
| fp16-amp | fp32              | autocast fp16  | dynamic (GradScaler)| fp32            |
| bf16-amp | fp32              | autocast bf16  | none                | fp32            |
| fp16     | fp16              | fp16           | none possible       | fp16            |
| bf16     | bf16              | bf16           | none                | bf16            |
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tune_sana.config import Precision, UserError


@dataclass(frozen=True)
class PrecisionPolicy:
    """What one precision mode means for weights, compute and loss scaling."""

    mode: Precision
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    loss_scaling: bool

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or self.weight_dtype


POLICIES: dict[Precision, PrecisionPolicy] = {
    Precision.FP32: PrecisionPolicy(Precision.FP32, torch.float32, None, False),
    Precision.FP16_AMP: PrecisionPolicy(Precision.FP16_AMP, torch.float32, torch.float16, True),
    Precision.BF16_AMP: PrecisionPolicy(Precision.BF16_AMP, torch.float32, torch.bfloat16, False),
    Precision.FP16: PrecisionPolicy(Precision.FP16, torch.float16, None, False),
    Precision.BF16: PrecisionPolicy(Precision.BF16, torch.bfloat16, None, False),
}

# Which checkpoint weight variant each mode is native to (reference/sana.md: the FP16 release
# was trained in fp16 and bf16 "destroys" it; the BF16 release belongs to bf16).
NATIVE_VARIANT: dict[Precision, str | None] = {
    Precision.FP32: None,
    Precision.FP16_AMP: "fp16",
    Precision.BF16_AMP: "bf16",
    Precision.FP16: "fp16",
    Precision.BF16: "bf16",
}


def policy_for(mode: Precision | str) -> PrecisionPolicy:
    """The policy of ``mode``; UserError naming the valid modes if it is unknown."""
    try:
        return POLICIES[Precision(mode)]
    except ValueError:
        valid = ", ".join(p.value for p in Precision)
        raise UserError(f"unknown precision mode '{mode}'; valid modes: {valid}") from None


def pairing(mode: Precision, variant: str | None) -> str:
    """'native', 'crossed' or 'n/a' (fp32, or a checkpoint without a declared variant)."""
    native = NATIVE_VARIANT[mode]
    if native is None or variant is None:
        return "n/a"
    return "native" if native == variant else "crossed"


def check_supported(mode: Precision, device: torch.device) -> None:
    """Raise UserError before training if ``device`` cannot run ``mode``."""
    policy = POLICIES[mode]
    dtype = policy.compute_dtype
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            raise UserError(
                f"precision '{mode.value}' needs bf16, which {name} lacks; "
                "use fp32 or fp16-amp on this GPU"
            )
    elif device.type != "cpu":
        raise UserError(f"device '{device}' is not supported; use cpu or cuda")


def autocast(
    policy: PrecisionPolicy, device: torch.device
) -> contextlib.AbstractContextManager[None]:
    """torch.autocast for amp modes, a no-op context otherwise."""
    if policy.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=policy.autocast_dtype)


def grad_scaler(policy: PrecisionPolicy, device: torch.device,
                sharded: bool = False) -> torch.amp.GradScaler:
    """A real dynamic GradScaler for fp16-amp; a disabled one (a pass-through) otherwise.
    ``sharded`` (FSDP): the scaler that agrees across ranks whether any shard held an inf, so
    every rank backs off together."""
    if sharded and policy.loss_scaling:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=True)
    return torch.amp.GradScaler(device.type, enabled=policy.loss_scaling)


def scale_on_host(scaler: torch.amp.GradScaler) -> float | None:
    """The loss scale as a Python float, None without loss scaling.

    A host sync once the scaler holds its scale on the device (after the first ``scale()``):
    for setup and resume, never for every step.
    """
    return scaler.get_scale() if scaler.is_enabled() else None


def scale_on_device(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The loss scale as a 0-dim fp32 tensor where the scaler keeps it (no host sync); None
    without loss scaling."""
    if not scaler.is_enabled():
        return None
    # get_scale() is .item() of this tensor: one host sync per call. The private
    # _get_scale_async() (still in torch 2.13; GradScaler's own step() uses it) returns the
    # tensor itself, so the guard can bring it to the host with the parameter norm in one sync.
    scale = scaler._get_scale_async()
    if scale is None:  # no scale() yet: the scaler still holds its initial scale as a float
        return torch.tensor(scaler.get_scale(), dtype=torch.float32)
    return scale


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    """Disable autocast inside (for matmuls that must stay in fp32)."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield
