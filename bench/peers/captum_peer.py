"""captum 0.9.0: ``TracInCP`` (exact) and ``TracInCPFastRandProj`` (last layer, projected).
Conversions: bench/README.md (how each peer is configured)."""

from __future__ import annotations

import os

import torch
from harness import Clock
from torch import nn
from workloads import loader


def save_checkpoints(ckpts: list[tuple[dict, float]], directory: str, tag: str) -> list[str]:
    """The checkpoints as files (captum loads them by path); the weight travels along."""
    paths = [os.path.join(directory, f"{tag}-ckpt{c}.pt") for c in range(len(ckpts))]
    for path, (sd, weight) in zip(paths, ckpts, strict=True):
        torch.save({"state_dict": sd, "lr": weight}, path)
    return paths


def load_checkpoint(model: nn.Module, path: str) -> float:
    d = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(d["state_dict"])
    return float(d["lr"])  # captum multiplies the checkpoint's scores by this


def tracincp(model: nn.Module, train: tuple, test: tuple, paths: list[str], batch_size: int,
             layers: list[str] | None = None) -> torch.Tensor:  # fmt: skip
    """sum_c w_c <grad loss(test_j), grad loss(train_i)>, (n_test, n_train), over the
    parameters of ``layers`` (None: every layer captum supports)."""
    from captum.influence import TracInCP

    tracin = TracInCP(model, loader(train, batch_size), checkpoints=paths,
                      checkpoints_load_func=load_checkpoint, layers=layers,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), sample_wise_grads_per_batch=True)  # fmt: skip
    return tracin.influence(test).detach()


def fast_rand_proj(model: nn.Sequential, train: tuple, test: tuple, paths: list[str], dim: int,
                   batch_size: int) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Projected TracIn on the last Linear layer: (S, {seconds, featurize/score split})."""
    try:
        import annoy  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"annoy not installable/importable: {exc}") from exc
    from captum.influence import TracInCPFastRandProj

    clock = Clock()
    tracin = TracInCPFastRandProj(
        model, model[-1], loader(train, batch_size), checkpoints=paths,
        checkpoints_load_func=load_checkpoint, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=batch_size, projection_dim=dim, seed=0)  # fmt: skip
    clock.lap("featurize_seconds")
    S = tracin.influence(test, k=None)
    t = clock.lap("score_seconds")
    pq = tracin.projection_quantities
    dims = pq[0].shape[1] * pq[1].shape[1] if pq is not None else None
    return S.detach(), {**t, "seconds": t["total"], "dims_per_checkpoint": dims}
