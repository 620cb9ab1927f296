"""Where computation runs: the torch device and the number of CPU threads (one answer for every job)."""

from __future__ import annotations

import os


class DeviceError(RuntimeError):
    """A device was asked for that this machine does not have."""


def resolve_device(device: str = "auto"):
    """`auto` -> a CUDA GPU when one is visible, else the CPU; `cpu`, `cuda`, `cuda:N` as given
    (a CUDA device without a visible GPU raises DeviceError with a clear message)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but no CUDA GPU is visible")
    return torch.device(device)


def default_threads() -> int:
    """All cores this process may use: on 2 cores, 2 torch threads train 1.5x faster than 1
    (measured: 47 s vs 69 s per epoch of the cpu preset on 7,500 cells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
