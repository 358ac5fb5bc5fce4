"""Where a run executes: the torch device and the number of CPU threads."""

from __future__ import annotations

import os

import torch

from bnexp.config import ConfigError


def pick_device(device: str) -> torch.device:
    """auto -> cuda when torch sees a GPU, else cpu; cuda without a GPU is a config error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not allowed: torch sees no CUDA GPU on this machine "
                          "(use device=auto or device=cpu)")
    return torch.device(device)


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_threads(threads: str, auto: int | None = None) -> int:
    """torch threads for this job: an explicit integer, else `auto` (what the launcher allows;
    None = every core this process may use)."""
    if threads != "auto":
        return int(threads)
    return auto if auto is not None else available_cores()


def set_threads(n: int) -> None:
    """Set torch's intra-op threads (float reductions depend on it: keep it fixed for exact repeats)."""
    torch.set_num_threads(n)
