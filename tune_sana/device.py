"""Which torch device a run uses, and how much memory it took there."""

from __future__ import annotations

import resource
import sys

import torch

from tune_sana.config import UserError

# What peak_memory_mb measured (the trials.parquet column peak_memory_kind).
CUDA_MAX_ALLOCATED = "cuda_max_allocated"
CPU_PEAK_RSS = "cpu_peak_rss"


def pick_device(choice: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a UserError."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is visible; use --set device=cpu")
    return torch.device(choice)


def reset_peak_memory(device: torch.device) -> None:
    """Start the GPU's peak count afresh (a CPU process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """The peak memory in MiB and what it measured.

    On a GPU: ``torch.cuda.max_memory_allocated`` since the last ``reset_peak_memory``, the
    tensors torch allocated (``cuda_max_allocated``; the caching allocator reserves more). On a
    CPU: the whole process's peak resident set size since it started (``cpu_peak_rss``), which
    includes Python, torch and the data, and in a reused worker process any earlier trial's peak.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, CUDA_MAX_ALLOCATED
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), CPU_PEAK_RSS
