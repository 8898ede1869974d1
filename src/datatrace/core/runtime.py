"""Runtime helpers: eval mode, the model's device, whether to show progress bars."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn


def show_progress(progress: bool | None) -> bool:
    """Progress bars on when asked, or by default when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run in eval mode (dropout off, batch-norm running statistics), then restore the flags."""
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def model_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
