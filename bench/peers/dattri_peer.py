"""dattri 0.3.0: TracIn, the influence-function attributors and TRAK, converted to
datatrace's convention (mean-loss curvature, S = dattri.T / n; every conversion and trap:
bench/README.md, how each peer is configured)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from harness import Clock
from references import margin
from torch import nn
from workloads import loader

from peers import InfluenceSettings, TrakSettings


def _loss(model: nn.Module, example_dim: int, f: Callable = F.cross_entropy) -> Callable:
    """``f`` (mean cross-entropy, or the margin) of a batch, or of one example of
    ``example_dim`` dimensions (the LiSSA collate function casts labels to float)."""

    def loss(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = data
        if x.dim() == example_dim:
            x, y = x.unsqueeze(0), y.reshape(1)
        return f(torch.func.functional_call(model, params, (x,)), y.long())

    return loss


def tracin(model: nn.Module, ckpts: list[tuple[dict, float]], train: tuple, test: tuple,
           batch_size: int, projector_kwargs: dict | None = None) -> torch.Tensor:  # fmt: skip
    """sum_c w_c <g_test, g_train>, (n_test, n_train); exact unless ``projector_kwargs``."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    task = AttributionTask(loss_func=_loss(model, train[0].dim() - 1), model=model,
                           checkpoints=[sd for sd, _ in ckpts])  # fmt: skip
    attributor = TracInAttributor(task=task, weight_list=torch.tensor([w for _, w in ckpts]),
                                  normalized_grad=False, projector_kwargs=projector_kwargs,
                                  device=str(train[0].device))  # fmt: skip
    if projector_kwargs is None:
        attributor.projector_kwargs = None  # passing None still projects (k=512): README
    return attributor.attribute(
        loader(train, batch_size), loader(test, len(test[1]))
    ).T.contiguous()


def _arnoldi_notes(attributor: Any) -> list[str]:
    """Kept eigenvalues of H + lam that are <= 0 (dattri's Arnoldi then returns NaN)."""
    for cell in getattr((getattr(attributor, "arnoldi_projectors", None) or [None])[0],
                        "__closure__", None) or []:  # fmt: skip
        ev = getattr(cell.cell_contents, "eigvals", None)
        if ev is not None and int((ev <= 0).sum()):
            return [f"{int((ev <= 0).sum())} of its {ev.numel()} kept eigenvalues of H+lam <= 0"]
    return []


def influence(wl: Any, st: InfluenceSettings, method: str) -> tuple:
    """(S, {fit, attribute, total}, notes) of one ``IFAttributor*``; fit = construction + cache."""
    from dattri.algorithm import influence_function as IF
    from dattri.task import AttributionTask

    model = copy.deepcopy(wl.model).eval()
    # EK-FAC: every Linear and Conv2d layer, i.e. every parameter, as for the other cells
    # (dattri's default module_name=None would silently keep the nn.Linear layers only)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    lam = st.damping
    make = {
        "exact": lambda kw: IF.IFAttributorExplicit(**kw, regularization=lam),
        "CG": lambda kw: IF.IFAttributorCG(**kw, max_iter=st.cg_iters, regularization=lam),
        "LiSSA": lambda kw: IF.IFAttributorLiSSA(**kw, batch_size=st.lissa_batch, num_repeat=1,
            recursion_depth=st.lissa_depth, damping=lam / st.lissa_scale, scaling=st.lissa_scale),
        "Arnoldi": lambda kw: IF.IFAttributorArnoldi(**kw, proj_dim=st.arnoldi_rank,
            max_iter=st.arnoldi_iter + 1, regularization=lam, seed=0),
        "DataInf": lambda kw: IF.IFAttributorDataInf(**kw, regularization=lam),
        "EK-FAC": lambda kw: IF.IFAttributorEKFAC(**kw, damping=lam, module_name=layers),
    }[method]  # fmt: skip
    torch.manual_seed(0)  # LiSSA samples with the global generator
    clock = Clock()
    try:
        task = AttributionTask(loss_func=_loss(model, wl.train[0].dim() - 1), model=model,
                               checkpoints=[model.state_dict()])  # fmt: skip
        attributor = make({"task": task, "device": "cpu"})
        attributor.cache(loader(wl.train, wl.n_train))
        clock.lap("fit")
        # one IHVP solve per pair of batches: one test batch
        S = attributor.attribute(loader(wl.train, st.batch_size), loader(wl.test, wl.n_test))
        clock.lap("attribute")
    except Exception as exc:
        if method != "EK-FAC" or not convs:
            raise
        raise RuntimeError(
            f"dattri IFAttributorEKFAC cannot fit Conv2d layers {convs} (its covariance "
            f"estimate handles only 2-D (batch, features) layer inputs; its default "
            f"module_name=None would silently keep only the nn.Linear layers): "
            f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    S = S.detach().T.contiguous() / wl.n_train
    bad = int((~torch.isfinite(S)).sum())
    notes = [f"{bad}/{S.numel()} scores NaN/inf"] if bad else []
    return S, clock.times, notes + _arnoldi_notes(attributor)


def trak(wl: Any, st: TrakSettings) -> tuple[torch.Tensor, dict[str, float]]:
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = copy.deepcopy(wl.model).eval()
    n, p = wl.n_train, sum(q.numel() for q in model.parameters())
    margin_of = _loss(model, wl.train[0].dim() - 1, lambda z, y: margin(z, y).sum())  # one example

    def correct_probability(params: dict, data: tuple) -> torch.Tensor:
        logits = torch.func.functional_call(model, params, (data[0][None],))
        return torch.exp(-F.cross_entropy(logits, data[1][None]))

    train, test = loader(wl.train, st.batch_size), loader(wl.test, st.batch_size)
    clock, total = Clock(), 0.0
    for c, (sd, _) in enumerate(wl.ckpts):
        task = AttributionTask(
            loss_func=margin_of, target_func=margin_of, model=model, checkpoints=[sd]
        )
        # dattri's own seed for checkpoint c; every key, as 0.3.0 updates a shared module dict
        projector = {"proj_dim": st.proj_dim, "proj_max_batch_size": 32,
                     "proj_seed": st.seed + 100_000 * c, "device": "cpu"}  # fmt: skip
        attributor = TRAKAttributor(task=task, correct_probability_func=correct_probability,
                                    projector_kwargs=projector, device="cpu",
                                    regularization=n * st.damping / p)  # fmt: skip
        attributor.cache(train)
        total = total + attributor.attribute(test)  # (n_train, n_test)
    return (total / len(wl.ckpts)).T.contiguous().detach(), clock.lap()
