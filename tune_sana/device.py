"""Which torch device a run uses, and how much memory it took there."""

from __future__ import annotations

import resource
import sys

import torch

from tune_sana.config import UserError


def pick_device(choice: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a UserError."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is visible; use --set device=cpu")
    return torch.device(choice)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or this process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
