"""Peak tensor memory of code run on a CPU, counted by torch itself (for checking estimates).

``TensorPeak`` is a TorchDispatchMode: every tensor an operator returns has its storage counted
once (views share it) until the storage is freed, so ``peak`` is the most tensor bytes alive
at once while the mode was on, like ``torch.cuda.max_memory_allocated`` without the allocator's
rounding. Tensors made before the mode started count only if passed to ``count``. Process
memory (RSS) is no use here: the tiny model's tensors are smaller than the allocator's noise.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorPeak(TorchDispatchMode):
    """Live and peak bytes of tensor storages created while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def count(self, *tensors: torch.Tensor) -> None:
        """Count tensors made before the mode started (a model's weights, say)."""
        for tensor in tensors:
            self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live or tensor.device.type == "meta":
            return
        size = storage.nbytes()
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out
