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


# How idle OpenMP threads (torch's, XGBoost's) wait for their next parallel region, by whether
# the job has the cores to itself. Measured on 2 cores, one backbone epoch of 2,560 PBC cells:
# alone, sleeping at once (OMP_WAIT_POLICY=PASSIVE) 15.8 s, spinning 1,000 times first 13.2 s,
# libgomp's default (300,000 spins) 12.8 s; two such jobs at once, each 25.0 / 27.9 s, and 49.5
# s at 10,000 spins. So a job that shares its cores sleeps at once (the server, and the rebuild
# it starts beside itself, where spinning XGBoost threads had made the classifier step 10-60x
# slower); any other job spins briefly (a full PBC build: backbone epochs 39.5 -> 33.5 s, VAE
# 33 -> 16 s).
# (libgomp: a GOMP_SPINCOUNT that is set overrides the policy's spin count, so "shared" sets both,
# and a job started by the server keeps them.)
OPENMP_WAIT = {"shared": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
               "own": {"GOMP_SPINCOUNT": "1000"}}


def set_openmp_wait(shares_cores: bool, environ: dict | None = None) -> None:
    """Set OPENMP_WAIT's variables in `environ` (default: this process's, where they work if set
    before the first parallel region); a variable already set is kept."""
    environ = os.environ if environ is None else environ
    for name, value in OPENMP_WAIT["shared" if shares_cores else "own"].items():
        environ.setdefault(name, value)


def openmp_wait_of(environ: dict | None = None) -> dict:
    """The OpenMP waiting variables set in `environ` (default: this process's): what a job hands
    to the workers it starts elsewhere (Ray workers on another node inherit their raylet's
    environment, not the driver's), so that they wait as the driver does."""
    environ = os.environ if environ is None else environ
    names = {name for setting in OPENMP_WAIT.values() for name in setting}
    return {name: environ[name] for name in sorted(names) if name in environ}


# glibc malloc: allocations above this size come from the heap instead of fresh mmap()s, and up
# to TRIM bytes freed at the heap's top are kept for reuse instead of returned to the kernel.
# By default every forward pass's activations (tens of MB) were mapped, page-faulted in zeroed
# and unmapped again: embedding 400 PBC crops on 2 threads took 15 s user + 9.5 s system time;
# with these 14.6 s + 0.7 s, 26.7 -> 41.5 cells/s (the same latents).
MALLOC_MMAP_THRESHOLD = 256 * 2**20
MALLOC_TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Make this process's malloc reuse freed memory (see MALLOC_MMAP_THRESHOLD); inherited by
    forked worker processes. True when applied (glibc); elsewhere nothing changes."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD))
