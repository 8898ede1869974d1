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


_FORWARD_AD_READY = False


def load_forward_ad_decompositions() -> None:
    """Load torch's forward-mode AD decompositions now, without their warning.

    The first forward-mode product of a process (``torch.func.jvp``/``jacfwd``/``hessian``)
    imports ``torch._decomp.decompositions_for_jvp``, which (torch 2.13) runs
    ``torch.jit.script`` on each decomposition and so emits ``DeprecationWarning:
    torch.jit.script is deprecated`` from inside torch: nothing a caller can act on. Datatrace
    calls this before its own forward-mode products; the filter covers only that import
    and that message, once per process."""
    global _FORWARD_AD_READY
    if _FORWARD_AD_READY:
        return
    import warnings

    # another torch may have no such module: then there is nothing to pre-load
    with warnings.catch_warnings(), contextlib.suppress(ImportError):
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning
        )
        import torch._decomp.decompositions_for_jvp  # noqa: F401
    _FORWARD_AD_READY = True
