"""Multi-process runs (``torchrun``): who am I, and how results are merged.

Every datatrace job list is split round-robin across ranks; each rank computes its own
jobs into a zero-filled result array, and one all-reduce (sum) gives every rank the full
array. Each entry is computed by exactly one rank and added to zeros, so the merged result
is bit-identical to a single-process run (for jobs that are deterministic given their
inputs). Under ``torchrun`` without an initialised process group, datatrace initialises
one itself from the environment (gloo on CPU, NCCL when the device is CUDA).
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def ensure_initialized(device: torch.device | None = None) -> None:
    """Initialise the default process group from ``torchrun``'s environment, if it set one
    (``WORLD_SIZE`` > 1) and nobody has yet."""
    if env_world_size() > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)  # a live gloo group aborts the interpreter at exit


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_jobs(n_jobs: int) -> list[int]:
    """The job numbers this rank runs: rank, rank + size, rank + 2·size, ..."""
    rank, size = world()
    return list(range(rank, n_jobs, size))


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (in place; identity for one process)."""
    _, size = world()
    if size > 1:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            moved = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(moved)
            t.copy_(moved.cpu())
        else:
            dist.all_reduce(t)
    return t


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def resolve_device(name: str | None = "auto") -> torch.device:
    """The device a command runs on: ``"auto"`` (or ``None``) is CUDA when available (under
    torchrun ``cuda:LOCAL_RANK``, one GPU per process), else the CPU; otherwise a torch
    device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    from .errors import ConfigError

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return device
