"""Where one trial process stands among its trial's workers: rank, world size, and the few
collectives the trial loop needs. No Ray here: the runtime (Ray Train, torchrun, a test's own
process group) initialises ``torch.distributed`` and the trial reads its place from it.

With one worker every method is the identity or a no-op, so the single-process trial runs the
same code and pays nothing. With several:

- **Data.** Every rank draws the same global batch (``world`` x its own share, same generator,
  same noise) and keeps its contiguous shard, so N workers at batch b see exactly the samples,
  noise and timesteps of one worker at batch N x b.
- **Agreement.** The step's loss is all-reduced once per step, with one flag per rank saying
  whose local loss was not finite, just before the pre-step check: every rank reaches the same
  verdict at the same step (health.py), and the record names the rank that saw it first. Under
  ``ddp`` with fp32 gradients this vector rides DDP's own last gradient all-reduce (a comm
  hook appends it to the last bucket), so agreement costs no collective of its own; otherwise
  (fsdp, or bf16/fp16 gradients, which would round the loss) it is one all-reduce of its own.
  Under ``ddp`` the grad norm, parameter norm and loss scale need no agreement: every replica
  applies the same averaged gradient, so they are equal on every rank. Under ``fsdp`` the
  norms are sums over shards, so they are reduced as part of computing them.
- **Validation.** Every rank evaluates the whole fixed validation set on its full model (``ddp``:
  the unwrapped replica, no collective; ``fsdp``: all ranks together, parameters gathered), so
  the number is the one a single worker computes for the same weights.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

FSDP_CAME = ("optimizer came with resources.parallel fsdp: came-pytorch keeps its factored "
             "state as plain tensors, FSDP2 shards the gradients; use adamw, or parallel ddp")


@dataclass
class _Ride:
    """The step's health vector on its way out with DDP's last gradient bucket, and back."""

    outgoing: torch.Tensor | None = None
    arrived: torch.Tensor | None = None


def _allreduce_with_ride(ride: _Ride, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP's averaging all-reduce of one gradient bucket, with ``ride.outgoing`` appended to the
    last bucket of the step when the dtypes match: one collective carries both."""
    grads = bucket.buffer().div_(dist.get_world_size())
    health = ride.outgoing
    riding = (health is not None and bucket.is_last() and health.dtype == grads.dtype
              and health.device == grads.device)
    packed = torch.cat([grads, cast(torch.Tensor, health)]) if riding else grads
    if riding:
        ride.outgoing = None
    n = grads.numel()

    def unpack(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        out = done.value()[0]
        if not riding:
            return out
        ride.arrived = out[n:]
        return out[:n]

    work = dist.all_reduce(packed, async_op=True)
    return cast(torch.futures.Future[torch.Tensor], cast(Any, work).get_future().then(unpack))


@dataclass(frozen=True)
class Ranks:
    """This process's rank among ``world`` workers of one trial, and how they share the model."""

    rank: int = 0
    world: int = 1
    parallel: str = "ddp"  # or "fsdp"
    device: str | None = None  # this worker's device, set by the runtime (else config.device)
    ride: _Ride = field(default_factory=_Ride, compare=False, repr=False)

    @classmethod
    def current(cls, parallel: str = "ddp", device: str | None = None) -> Ranks:
        """From the initialised default process group; one worker when there is none."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(device=device)
        return cls(dist.get_rank(), dist.get_world_size(), parallel, device)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def sharded(self) -> bool:
        """Parameters and gradients are shards (FSDP2 DTensors), not replicas."""
        return self.distributed and self.parallel == "fsdp"

    # --- the model ---------------------------------------------------------------------------

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the training forward runs through: the model itself with one worker;
        DistributedDataParallel over it (``ddp``); the model sharded in place (``fsdp``)."""
        if not self.distributed:
            return model
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            blocks = getattr(model, "transformer_blocks", None)
            for block in blocks or []:  # one all-gather per block, then the rest at the root
                fully_shard(block)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Sana's depthwise 3x3 convs ([C, 1, 3, 3]) get gradients whose strides differ from
        # DDP's bucket views only along a dimension of size 1: the same memory, not a slowdown.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        self._attach_ride(ddp)
        return ddp

    def _attach_ride(self, ddp: nn.Module) -> None:
        """Let the health vector ride the gradients' all-reduce (``send_with_gradients``)."""
        # A lambda: DDP checks a hook's annotations against the classes themselves, and this
        # module's are strings (postponed evaluation).
        cast(Any, ddp).register_comm_hook(
            self.ride, lambda ride, bucket: _allreduce_with_ride(ride, bucket))

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The module itself under a DDP wrapper (validation, replays, checkpoints)."""
        inner = getattr(model, "module", None)
        return inner if isinstance(inner, nn.Module) and type(model).__name__ == \
            "DistributedDataParallel" else model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        """DDP: reduce gradients only on the last micro-batch of an accumulated step."""
        if self.distributed and not self.sharded and not last:
            with cast(Any, model).no_sync():
                yield
        else:
            yield

    # --- data --------------------------------------------------------------------------------

    def shard_bounds(self, total: int) -> tuple[int, int]:
        """This rank's contiguous slice [start, stop) of a global batch of ``total`` samples."""
        per = math.ceil(total / self.world)
        start = min(self.rank * per, total)
        return start, min(start + per, total)

    # --- agreement -----------------------------------------------------------------------------

    def _health(self, loss: torch.Tensor) -> torch.Tensor:
        """This rank's share of [mean loss, flag per rank]: its loss / world and its own flag
        (1 when its loss is not finite), zeros elsewhere."""
        loss = loss.detach().float().reshape(1)
        flags = torch.zeros(self.world, device=loss.device)
        flags[self.rank] = (~torch.isfinite(loss)).float().squeeze()
        return torch.cat([loss / self.world, flags])

    def send_with_gradients(self, loss: torch.Tensor) -> None:
        """Under ``ddp``, called with the step's loss just before the backward that reduces the
        gradients: the health vector goes out in the same all-reduce as the last bucket."""
        if self.distributed and not self.sharded:
            self.ride.outgoing = self._health(loss)

    def agree(self, loss: torch.Tensor) -> torch.Tensor:
        """[mean loss, flag per rank] summed over ranks (no host sync); with one worker, [loss,
        flag]. A rank's flag is 1 when its own loss is not finite; a non-finite loss anywhere
        makes the mean non-finite everywhere. Under ``ddp`` the vector came back with the
        gradients (``send_with_gradients``); else it takes one all-reduce of a few floats. The
        grad norm needs no agreement: replicas compute it from the same averaged gradient, and
        under fsdp it is a sum over shards already. (Its own all-reduce started asynchronously
        to overlap the backward measured slower on a loaded 2-core box, and riding the
        gradients' all-reduce costs nothing: bench/rank_agreement.py.)"""
        if not self.distributed:
            return self._health(loss)
        arrived, self.ride.arrived, self.ride.outgoing = self.ride.arrived, None, None
        if arrived is not None:  # every rank took the same path: same buckets, same dtypes
            return arrived
        vector = self._health(loss)
        dist.all_reduce(vector)
        return vector

    def sum_squares(self, local: torch.Tensor) -> torch.Tensor:
        """A sum over shards (``fsdp``); unchanged for replicas."""
        if self.sharded:
            dist.all_reduce(local)
        return local

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (a pickle round trip; rare: divergences)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return cast(torch.Tensor, to_local()) if callable(to_local) else tensor
