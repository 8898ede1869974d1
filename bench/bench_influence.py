#!/usr/bin/env python
"""Benchmark datatrace influence functions against dattri 0.3.0 and kronfluence 1.0.1.

Usage::

    python bench/bench_influence.py [--workload mlp|cnn] [--quick] [--repeats N] [--threads T]
                                    [--json out.json] [--dampings 0.01[,0.1]]
                                    [--methods exact,cg,...] [--profile]

Workloads (scikit-learn ``load_digits``; no downloads; seeded and deterministic; features
/16; the same seeded split and the same training recipe, plain SGD lr 0.1, batch 32, 100
epochs, on 500 training examples; 100 held-out test queries; one checkpoint; float32; every
parameter), chosen with ``--workload``:

* ``mlp`` (default, ``digits-mlp``): an MLP 64-128-10 (ReLU, 9,610 parameters).
  ``--quick``: an MLP 64-16-10 (1,210 parameters), 100 train x 20 test (a smoke test).
* ``cnn`` (``digits-cnn``): the features reshaped to (1, 8, 8) images, Conv2d(1, 8, 3,
  padding=1) - ReLU - MaxPool2d(2) - Conv2d(8, 16, 3, padding=1) - ReLU - MaxPool2d(2) -
  Flatten - Linear(64, 10) (1,898 parameters, so the exact Hessian is cheap).
  ``--quick``: 4 and 8 channels (666 parameters), 100 train x 20 test. The solvers are
  model-agnostic except the Kronecker-factored ones: datatrace's K-FAC/EK-FAC and
  kronfluence's EK-FAC support Conv2d (per-position unfolded patches), dattri's
  ``IFAttributorEKFAC`` does not (asked for every Linear and Conv2d layer it fails in its
  covariance estimate; its default ``module_name=None`` would silently keep only the
  nn.Linear layers): that cell is recorded as an error with its message. Any cell that
  raises is recorded the same way (table, ``results[].error``, ``rows[].note``) instead of
  stopping the run. Worker processes rebuild the model from the saved workload file, which
  holds the workload kind and architecture.

Score convention (datatrace's, every peer is normalised to it)::

    S[j, i] = (1/n) q_j^T (H + lam I)^{-1} g_i          shape (n_test, n_train)

``H`` = Hessian of the MEAN training cross-entropy, ``q_j`` = gradient of the test loss,
``g_i`` = gradient of the training loss, ``n`` = number of training examples; positive =
proponent (removing i raises the test loss). Conversions (all found in the installed
sources, and checked by the ``scale`` column = least-squares slope of peer vs reference,
which is ~1 when sign and scale are right):

* dattri (all ``IFAttributor*``): the loss function given to ``AttributionTask`` is the MEAN
  cross-entropy of its batch, so its Hessian/Fisher is in the mean convention and
  ``regularization`` / ``damping`` = lam as is. ``attribute`` returns
  ``g_i^T (H + lam)^{-1} q_j`` of shape (n_train, n_test), not divided by n and not negated:
  S = dattri.T / n.
  - ``IFAttributorExplicit``: ``regularization=lam``; it forms (and solves with) one
    Hessian PER BATCH of the cached training loader and sums the solutions, so it gets a
    single full-batch loader (anything else is a different, wrong estimate).
  - ``IFAttributorCG``: ``regularization=lam``; runs exactly ``max_iter`` iterations (its
    ``tol`` is ignored) starting from x0 = v, i.e. ``max_iter + 1`` Hessian-vector products.
  - ``IFAttributorLiSSA``: its recursion ``h <- v + (1 - d) h - H_B h / s`` returns
    ``(H + d s I)^{-1} v``, so ``damping = lam / scaling``; ``scaling`` = the same ``scale``
    datatrace gets.
  - ``IFAttributorArnoldi``: ``regularization=lam`` (eigenpairs of H + lam I),
    ``proj_dim = rank``; ``max_iter = n_iter + 1`` (it does ``max_iter - 1`` products).
  - ``IFAttributorDataInf``: ``regularization=lam`` (the same lam in every layer; same
    closed form as datatrace's DataInf).
  - ``IFAttributorEKFAC``: ``damping=lam`` added to its eigenvalues; its curvature is the
    EMPIRICAL Fisher (its target function with the true labels), averaged over examples.
* kronfluence: ``compute_train_loss`` SUMS the per-example cross-entropy (so per-example
  gradients are those of single examples) and samples labels from the model when
  ``sample=True`` (true Fisher, the default ``use_empirical_fisher=False``); its factors are
  divided by the number of examples (mean convention) and ``ScoreArguments.damping_factor``
  is added to the eigenvalues, so ``damping_factor = lam``. Pairwise scores are
  ``q_j^T (G + lam)^{-1} g_i`` (n_test, n_train): S = kronfluence / n. AMP/fp16 is off
  (``amp_dtype=None`` for factors and scores); every dtype float32 except its default
  float64 eigendecomposition.

References: ``r(H)`` = mean over queries of the Pearson correlation (over training examples)
with datatrace ``ExactHessian`` in FLOAT64 at the same lam; ``r(GN)`` = the same with
datatrace ``GaussNewton`` (float64), for K-FAC/EK-FAC/DataInf, which approximate G, not H.
The float64 exact reference is also checked against an independent computation (Hessian by
``torch.func.hessian``, ``torch.linalg.solve``), which also gives the Hessian's spectrum
(LiSSA's ``scale`` for both libraries = 1.5 x the largest |eigenvalue| of H + lam).

Timing: N full runs per cell, interleaved across cells (run 1 of every cell, then run 2...).
By default (``--isolate all``) every timed run is a fresh worker process that first warms up
on a tiny MLP 64-16-10 (60 x 10 examples: imports, torch.func, hooks, LAPACK) and then
runs the full workload once, as a user's script would. In one long-lived process a run's
speed depends on the heap that earlier runs left behind (datatrace's exact Hessian builds 2x
faster after dattri's CG has left ~20 GB of freed heap: fewer page faults), and dattri's
explicit Hessian alone peaks at ~14 GB. Cells not isolated warm up once on a slice (50 x 10)
in the main process. Before each run (untimed): ``gc.collect()``, glibc ``malloc_trim``,
``os.sync()`` and a wait for an idle machine. The median (and min) wall clock
(``time.perf_counter``) is reported; ``mem GB`` is the peak resident memory above the level
before the run.
A cell whose first full run takes more than ``--slow-threshold`` s (default 60) is run only
once (``n`` column). datatrace's time is ``fit`` (featurize into its temporary on-disk store
+ fit the preconditioner) plus ``attribute``; peers' times are everything their API needs
for the same matrix (dattri: constructing task + attributor, ``cache``, ``attribute``;
kronfluence: ``prepare_model`` on a copy, ``Analyzer``, ``fit_all_factors``,
``compute_pairwise_scores``, into a temporary output directory). Training, building data
loaders and the references are not timed. Every library gets the same batch size
(``--batch-size``, default 500 = the whole training set).

JSON (``--json``): ``environment`` (``workload`` description, ``workload_name``),
``references``, ``results`` (every detail of every cell), ``targets``, ``profiles``, and
``rows``: one flat dict per (damping, method, library) cell with exactly the keys
``workload`` ("digits-mlp" | "digits-cnn"), ``method`` ("exact", "cg<iters>" e.g. "cg20",
"lissa", "arnoldi", "datainf", "ekfac"), ``library``, ``seconds`` (median wall clock; null
if the cell failed), ``peak_mem_gb`` (null if failed), ``agreement`` (r(GN) for DataInf and
EK-FAC, r(H) otherwise; null if failed or not finite), ``agreement_with`` ("exact IF
float64" | "Gauss-Newton IF float64"), ``damping`` and ``note`` (the error, NaN counts,
warnings and other notes, "; "-joined).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: dattri's inner bars

import argparse
import copy
import cProfile
import gc
import io
import json
import logging
import math
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from common import RssPeak
from torch import nn

# ----------------------------------------------------------------------------- workload


class MLP(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class CNN(nn.Module):
    """Conv2d(1, c1, 3, padding=1) - ReLU - MaxPool2d(2) - Conv2d(c1, c2, 3, padding=1) - ReLU
    - MaxPool2d(2) - Flatten - Linear(4 c2, 10) on (1, 8, 8) digit images (1,898 parameters
    for c1, c2 = 8, 16). Explicit integer padding: datatrace's K-FAC/EK-FAC reject
    ``padding="same"``."""

    def __init__(self, c1: int = 8, c2: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, c1, 4, 4)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, c2, 2, 2)
        return self.fc(x.flatten(1))


WORKLOAD_KINDS = ("mlp", "cnn")


def build_model(kind: str, arch: dict[str, Any]) -> nn.Module:
    if kind == "mlp":
        return MLP(int(arch["hidden"]))
    if kind == "cnn":
        c1, c2 = arch["channels"]
        return CNN(int(c1), int(c2))
    raise ValueError(f"unknown workload kind {kind!r} (expected one of {WORKLOAD_KINDS})")


@dataclass
class Workload:
    model: nn.Module  # trained, float32
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    train_acc: float = float("nan")
    test_acc: float = float("nan")
    train_loss: float = float("nan")
    kind: str = "mlp"  # "mlp" | "cnn": which model build_model(kind, arch) rebuilds
    arch: dict[str, Any] = field(default_factory=dict)  # {"hidden": h} | {"channels": [c1, c2]}

    @property
    def name(self) -> str:
        """``digits-mlp`` or ``digits-cnn`` (the ``workload`` of the JSON ``rows``)."""
        return f"digits-{self.kind}"

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def n_train(self) -> int:
        return len(self.train[1])

    @property
    def n_test(self) -> int:
        return len(self.test[1])

    def describe(self) -> str:
        if self.kind == "cnn":
            c1, c2 = self.arch["channels"]
            model = (
                f"digits CNN 1x8x8 conv3x3({c1})-ReLU-maxpool2-conv3x3({c2})-ReLU-maxpool2-"
                f"linear({4 * c2}->10)"
            )
        else:
            model = f"digits MLP 64-{self.model.fc1.out_features}-10 ReLU"
        return (
            f"{model} ({self.n_params:,} params), {self.n_train} train x "
            f"{self.n_test} test, float32; train loss {self.train_loss:.4f}, train acc "
            f"{self.train_acc:.3f}, test acc {self.test_acc:.3f}"
        )

    def slice(self, n_train: int, n_test: int) -> Workload:
        return Workload(
            self.model,
            tuple(t[:n_train] for t in self.train),
            tuple(t[:n_test] for t in self.test),
            kind=self.kind,
            arch=self.arch,
        )


def make_workload(
    n_train: int,
    n_test: int,
    hidden: int = 128,
    epochs: int = 100,
    lr: float = 0.1,
    seed: int = 0,
    kind: str = "mlp",
    channels: tuple[int, int] = (8, 16),
) -> Workload:
    """Seeded digits workload: the same split and plain-SGD recipe (batch 32) for both
    kinds; ``kind="cnn"`` reshapes the features to (1, 8, 8) images and ignores ``hidden``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)  # (1797, 64) in [0, 1]
    if kind == "cnn":
        X = X.reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    Xtr, ytr = X[tr].contiguous(), y[tr].contiguous()
    torch.manual_seed(seed)
    arch: dict[str, Any] = (
        {"channels": [int(c) for c in channels]} if kind == "cnn" else {"hidden": hidden}
    )
    model = build_model(kind, arch)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        p = torch.randperm(n_train, generator=g)
        for s in range(0, n_train, 32):
            idx = p[s : s + 32]
            opt.zero_grad()
            F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    for q in model.parameters():
        q.requires_grad_(True)
    wl = Workload(model, (Xtr, ytr), (X[te].contiguous(), y[te].contiguous()), kind=kind, arch=arch)
    with torch.no_grad():
        out = model(Xtr)
        wl.train_loss = float(F.cross_entropy(out, ytr))
        wl.train_acc = float((out.argmax(1) == ytr).float().mean())
        wl.test_acc = float((model(wl.test[0]).argmax(1) == wl.test[1]).float().mean())
    return wl


@dataclass
class Settings:
    damping: float
    batch_size: int
    cg_iters: int = 0
    lissa_depth: int = 1000
    lissa_batch: int = 50
    lissa_scale: float = 1.0
    arnoldi_rank: int = 50
    arnoldi_iter: int = 120
    top_eig: float = float("nan")  # largest |eigenvalue| of H + lam (from the reference)


# ----------------------------------------------------------------------------- runners
# Each runner: (workload, settings) -> (S (n_test, n_train) in datatrace's convention,
# {phase: seconds}, [notes]). Only the library calls are inside the timed region.


_PROFILER: cProfile.Profile | None = None  # set by profile_datatrace: profiles only fit+attribute


def _dt_run(wl: Workload, st: Settings, make: Callable[[Any], Any]) -> tuple:
    import datatrace as dt

    model = copy.deepcopy(wl.model)
    task = dt.ClassificationTask(model)
    ckpts = [dt.Checkpoint.from_module(model)]
    method = make(dt)
    if _PROFILER is not None:
        _PROFILER.enable()
    t0 = time.perf_counter()
    fitted = method.fit(task, ckpts, wl.train, batch_size=st.batch_size, progress=False)
    t1 = time.perf_counter()
    S = fitted.attribute(wl.test)
    t2 = time.perf_counter()
    if _PROFILER is not None:
        _PROFILER.disable()
    notes = []
    pc = fitted.preconditioners[0] if fitted.preconditioners else None
    if pc is not None and hasattr(pc, "iterations"):
        notes.append(f"{pc.iterations} CG iterations")
    del fitted
    gc.collect()
    return S.detach(), {"fit": t1 - t0, "attribute": t2 - t1, "total": t2 - t0}, notes


def dt_exact(wl: Workload, st: Settings) -> tuple:
    return _dt_run(wl, st, lambda dt: dt.Influence(dt.ExactHessian(damping=st.damping)))


def dt_cg(wl: Workload, st: Settings) -> tuple:
    # tol far below float32 precision: exactly cg_iters iterations, like dattri
    return _dt_run(
        wl,
        st,
        lambda dt: dt.Influence(
            dt.ConjugateGradient(damping=st.damping, max_iter=st.cg_iters, tol=1e-30)
        ),
    )


def dt_lissa(wl: Workload, st: Settings) -> tuple:
    return _dt_run(
        wl,
        st,
        lambda dt: dt.Influence(
            dt.LiSSA(
                damping=st.damping,
                scale=st.lissa_scale,
                depth=st.lissa_depth,
                repeat=1,
                batch_size=st.lissa_batch,
            )
        ),
    )


def dt_arnoldi(wl: Workload, st: Settings) -> tuple:
    return _dt_run(
        wl,
        st,
        lambda dt: dt.Influence(
            dt.Arnoldi(rank=st.arnoldi_rank, damping=st.damping, n_iter=st.arnoldi_iter)
        ),
    )


def dt_datainf(wl: Workload, st: Settings) -> tuple:
    return _dt_run(wl, st, lambda dt: dt.DataInf(damping=st.damping))


def dt_ekfac(wl: Workload, st: Settings) -> tuple:
    return _dt_run(wl, st, lambda dt: dt.Influence(dt.EKFAC(damping=st.damping)))


# -- dattri


def _dattri_setup(wl: Workload, st: Settings) -> tuple:
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    model = copy.deepcopy(wl.model)
    model.eval()
    example_dim = wl.train[0].dim() - 1  # 1 for the MLP's (64,), 3 for the CNN's (1, 8, 8)

    def loss_func(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # MEAN cross-entropy of the batch (dattri vmaps single examples as batches of 1; the
        # LiSSA collate function casts labels to float, hence .long())
        x, y = data
        if x.dim() == example_dim:
            x, y = x.unsqueeze(0), y.reshape(1)
        logits = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(logits, y.long())

    n = wl.n_train
    full = DataLoader(TensorDataset(*wl.train), batch_size=n, shuffle=False)
    train_loader = DataLoader(TensorDataset(*wl.train), batch_size=st.batch_size, shuffle=False)
    # dattri re-transforms every test batch for every training batch (one IHVP solve per
    # pair of batches): one batch of all queries and full training batches keep it to one.
    test_loader = DataLoader(TensorDataset(*wl.test), batch_size=wl.n_test, shuffle=False)

    def make_task() -> Any:
        return AttributionTask(loss_func=loss_func, model=model, checkpoints=[model.state_dict()])

    return make_task, full, train_loader, test_loader


def _dattri_run(wl: Workload, st: Settings, make_attr: Callable[[Any], Any]) -> tuple:
    make_task, full, train_loader, test_loader = _dattri_setup(wl, st)
    torch.manual_seed(0)  # LiSSA samples with the global generator
    t0 = time.perf_counter()
    attr = make_attr(make_task())
    attr.cache(full)
    t1 = time.perf_counter()
    S = attr.attribute(train_loader, test_loader)  # (n_train, n_test)
    t2 = time.perf_counter()
    S = S.detach().T.contiguous() / wl.n_train
    notes = []
    bad = int((~torch.isfinite(S)).sum())
    if bad:
        notes.append(f"{bad}/{S.numel()} scores NaN/inf")
    proj = getattr(attr, "arnoldi_projectors", None)
    if proj:
        # the projector function closes over an ArnoldiProjector
        for cell in getattr(proj[0], "__closure__", None) or []:
            p = cell.cell_contents
            if hasattr(p, "eigvals") and p.eigvals is not None:
                ev = p.eigvals
                neg = int((ev <= 0).sum())
                if neg:
                    notes.append(f"{neg} of its {ev.numel()} kept eigenvalues of H+lam <= 0")
    return S, {"fit": t1 - t0, "attribute": t2 - t1, "total": t2 - t0}, notes


def dattri_explicit(wl: Workload, st: Settings) -> tuple:
    from dattri.algorithm.influence_function import IFAttributorExplicit

    return _dattri_run(
        wl,
        st,
        lambda task: IFAttributorExplicit(task=task, device="cpu", regularization=st.damping),
    )


def dattri_cg(wl: Workload, st: Settings) -> tuple:
    from dattri.algorithm.influence_function import IFAttributorCG

    return _dattri_run(
        wl,
        st,
        lambda task: IFAttributorCG(
            task=task, device="cpu", max_iter=st.cg_iters, regularization=st.damping
        ),
    )


def dattri_lissa(wl: Workload, st: Settings) -> tuple:
    from dattri.algorithm.influence_function import IFAttributorLiSSA

    return _dattri_run(
        wl,
        st,
        lambda task: IFAttributorLiSSA(
            task=task,
            device="cpu",
            batch_size=st.lissa_batch,
            num_repeat=1,
            recursion_depth=st.lissa_depth,
            damping=st.damping / st.lissa_scale,
            scaling=st.lissa_scale,
        ),
    )


def dattri_arnoldi(wl: Workload, st: Settings) -> tuple:
    from dattri.algorithm.influence_function import IFAttributorArnoldi

    return _dattri_run(
        wl,
        st,
        lambda task: IFAttributorArnoldi(
            task=task,
            device="cpu",
            proj_dim=st.arnoldi_rank,
            max_iter=st.arnoldi_iter + 1,
            regularization=st.damping,
            seed=0,
        ),
    )


def dattri_datainf(wl: Workload, st: Settings) -> tuple:
    from dattri.algorithm.influence_function import IFAttributorDataInf

    return _dattri_run(
        wl,
        st,
        lambda task: IFAttributorDataInf(task=task, device="cpu", regularization=st.damping),
    )


def dattri_ekfac(wl: Workload, st: Settings) -> tuple:
    from dattri.algorithm.influence_function import IFAttributorEKFAC

    # every Linear and Conv2d layer, i.e. every parameter, as for the other cells (on the MLP
    # the same as dattri's default module_name=None, which selects the nn.Linear layers only)
    layers = [n for n, m in wl.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    convs = [n for n, m in wl.model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        return _dattri_run(
            wl,
            st,
            lambda task: IFAttributorEKFAC(
                task=task, device="cpu", damping=st.damping, module_name=layers
            ),
        )
    except Exception as exc:
        if not convs:
            raise
        raise RuntimeError(
            f"dattri IFAttributorEKFAC cannot fit Conv2d layers {convs} (its covariance "
            f"estimate handles only 2-D (batch, features) layer inputs; its default "
            f"module_name=None would silently keep only the nn.Linear layers): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


# -- kronfluence


def kronfluence_ekfac(wl: Workload, st: Settings) -> tuple:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class DigitsTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False):
            x, y = batch
            logits = model(x)
            if sample:  # true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    train_ds, test_ds = TensorDataset(*wl.train), TensorDataset(*wl.test)
    model = copy.deepcopy(wl.model)
    out_dir = tempfile.mkdtemp(prefix="bench-kronfluence-")
    task = DigitsTask()
    torch.manual_seed(0)  # label sampling
    try:
        t0 = time.perf_counter()
        model = prepare_model(model, task)
        analyzer = Analyzer(
            analysis_name="digits",
            model=model,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=out_dir,
        )
        fargs = FactorArguments(
            strategy="ekfac",
            use_empirical_fisher=False,
            amp_dtype=None,
            covariance_max_examples=None,
            lambda_max_examples=None,
        )
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train_ds,
            per_device_batch_size=st.batch_size,
            factor_args=fargs,
            overwrite_output_dir=True,
        )
        t1 = time.perf_counter()
        sargs = ScoreArguments(damping_factor=st.damping, amp_dtype=None)
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=test_ds,
            train_dataset=train_ds,
            per_device_query_batch_size=wl.n_test,
            per_device_train_batch_size=st.batch_size,
            score_args=sargs,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
        t2 = time.perf_counter()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    S = scores.detach().float() / wl.n_train
    return S, {"fit": t1 - t0, "attribute": t2 - t1, "total": t2 - t0}, ["true Fisher, MC labels"]


# ----------------------------------------------------------------------------- references


def references(wl: Workload, damping: float, batch: int = 100) -> dict[str, Any]:
    """float64 datatrace ExactHessian and GaussNewton scores (only the public API is used)."""
    import datatrace as dt

    model = copy.deepcopy(wl.model).double()
    train = (wl.train[0].double(), wl.train[1])
    test = (wl.test[0].double(), wl.test[1])
    task = dt.ClassificationTask(model)
    ck = [dt.Checkpoint.from_module(model)]
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fh = dt.Influence(dt.ExactHessian(damping=damping)).fit(
            task, ck, train, batch_size=batch, progress=False
        )
        out["H"] = fh.attribute(test).float()
    out["H_warnings"] = sorted({str(x.message).split(":")[0] for x in w})
    del fh
    gc.collect()
    t1 = time.perf_counter()
    fg = dt.Influence(dt.GaussNewton(damping=damping)).fit(
        task, ck, train, batch_size=batch, progress=False
    )
    out["GN"] = fg.attribute(test).float()
    del fg
    gc.collect()
    out["seconds"] = {"exact_f64": t1 - t0, "gn_f64": time.perf_counter() - t1}
    return out


@dataclass
class Independent:
    """The float64 Hessian of the mean training loss and per-example gradients, computed
    without datatrace (torch.func), for checking the reference and for the spectrum."""

    H: torch.Tensor  # (p, p), undamped
    G: torch.Tensor  # (n, p) training-loss gradients
    Q: torch.Tensor  # (m, p) test-loss gradients
    evals: torch.Tensor  # eigenvalues of H, ascending
    seconds: float

    def scores(self, damping: float) -> torch.Tensor:
        p = self.H.shape[0]
        sol = torch.linalg.solve(self.H + damping * torch.eye(p, dtype=self.H.dtype), self.Q.T)
        return (sol.T @ self.G.T / self.G.shape[0]).float()


def independent(wl: Workload, batch: int = 50) -> Independent:
    from torch.func import functional_call, grad, hessian, vmap

    t0 = time.perf_counter()
    model = copy.deepcopy(wl.model).double()
    names = [k for k, _ in model.named_parameters()]
    shapes = [q.shape for _, q in model.named_parameters()]
    sizes = [q.numel() for _, q in model.named_parameters()]
    theta = torch.cat([q.detach().reshape(-1) for _, q in model.named_parameters()])

    def loss(t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts = torch.split(t, sizes)
        params = {n: q.reshape(s) for n, q, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y, reduction="sum")

    X, y = wl.train[0].double(), wl.train[1]
    n, p = len(y), theta.numel()
    H = torch.zeros(p, p, dtype=torch.float64)
    for s in range(0, n, batch):
        H += hessian(loss)(theta, X[s : s + batch], y[s : s + batch])
    H /= n
    H = (H + H.T) / 2

    def one(t: torch.Tensor, x: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return grad(loss)(t, x[None], yy[None])

    G = vmap(one, in_dims=(None, 0, 0))(theta, X, y)
    Q = vmap(one, in_dims=(None, 0, 0))(theta, wl.test[0].double(), wl.test[1])
    evals = torch.linalg.eigvalsh(H)
    return Independent(H, G, Q, evals, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- measuring


def per_query_pearson(S: torch.Tensor, R: torch.Tensor) -> tuple[float, int]:
    """Mean over queries (rows) of the Pearson correlation over training examples, ignoring
    rows with non-finite entries; returns (mean, number of such rows)."""
    a, b = S.double(), R.double()
    ok = torch.isfinite(a).all(1)
    a, b = a[ok], b[ok]
    if a.shape[0] == 0:
        return float("nan"), int((~ok).sum())
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return float(r.mean()), int((~ok).sum())


def lsq_scale(S: torch.Tensor, R: torch.Tensor) -> float:
    """Least-squares slope of S on R (1 = same sign and scale) over finite entries."""
    a, b = S.double().flatten(), R.double().flatten()
    ok = torch.isfinite(a)
    a, b = a[ok], b[ok]
    return float((a @ b) / (b @ b)) if a.numel() else float("nan")


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
BUSY_LIMIT = 0.25  # CPU cores used by other processes above which a run counts as contended
_max_wait = 300.0


def _busy_s() -> float:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / _HZ


def _own_s() -> float:
    """CPU seconds of this process and its finished children (isolated worker runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """CPU cores that *other* processes used over a time window (machine busy - ours)."""

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), _busy_s(), _own_s()

    def others(self) -> float:
        wall = time.perf_counter() - self.t
        other = (_busy_s() - self.busy) - (_own_s() - self.own)
        return max(0.0, other) / wall if wall > 0 else 0.0


def quiet() -> float:
    """gc, return freed heap to the OS, flush dirty pages, wait (up to --max-wait s) until
    other processes are idle."""
    gc.collect()
    malloc_trim()
    os.sync()
    w = CpuWatch()
    time.sleep(0.5)
    load, waited = w.others(), 0.0
    while load > BUSY_LIMIT and waited < _max_wait:
        if waited == 0.0:
            print(
                f"    (other processes use {load:.2f} cores: waiting up to {_max_wait:.0f}s)",
                flush=True,
            )
        w = CpuWatch()
        time.sleep(2.0)
        load = w.others()
        waited += 2.0
    return load


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc). dattri's CG and LiSSA leave ~20 GB of
    freed but fragmented heap behind, which would otherwise carry over into later runs."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_cell(fn: Callable, wl: Workload, st: Settings) -> tuple:
    gc.collect()
    malloc_trim()
    with warnings.catch_warnings(record=True) as w, RssPeak(interval=0.02) as mem:
        warnings.simplefilter("always")
        S, t, notes = fn(wl, st)
    t["mem_gb"] = mem.gb
    msgs = []
    for x in w:
        if x.category.__name__ in ("InfluenceWarning",) or "eigenvalue" in str(x.message):
            m = str(x.message).split(":")[0][:90]
            if len(m) > 70:
                m = m[:67] + "..."
            if m not in msgs:
                msgs.append(m)
    return S, t, notes + [f"warning: {m}" for m in msgs]


# ----------------------------------------------------------------------------- cells


@dataclass
class Cell:
    method: str  # exact, CG, LiSSA, Arnoldi, DataInf, EK-FAC
    variant: str  # settings label
    library: str
    api: str
    fn: Callable
    settings: Settings
    gn_type: bool = False
    isolate: bool = False
    times: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    S: torch.Tensor | None = None
    error: str | None = None


def build_cells(methods: list[str], libs: set[str], base: Settings, cg_iters: list[int]) -> list:
    cells: list[Cell] = []

    def add(method, variant, lib, api, fn, st=base, gn=False):
        if lib in libs:
            cells.append(Cell(method, variant, lib, api, fn, st, gn))

    lissa_v = f"D={base.lissa_depth},B={base.lissa_batch},s={base.lissa_scale:.3g}"
    arn_v = f"r={base.arnoldi_rank},it={base.arnoldi_iter}"
    for m in methods:
        if m == "exact":
            add("exact", "", "datatrace", "ExactHessian", dt_exact)
            add("exact", "", "dattri", "IFAttributorExplicit", dattri_explicit)
        elif m == "cg":
            for k in cg_iters:
                st = _rep(base, k)
                add("CG", f"iters={k}", "datatrace", "ConjugateGradient", dt_cg, st)
                add("CG", f"iters={k}", "dattri", "IFAttributorCG", dattri_cg, st)
        elif m == "lissa":
            add("LiSSA", lissa_v, "datatrace", "LiSSA", dt_lissa)
            add("LiSSA", lissa_v, "dattri", "IFAttributorLiSSA", dattri_lissa)
        elif m == "arnoldi":
            add("Arnoldi", arn_v, "datatrace", "Arnoldi", dt_arnoldi)
            add("Arnoldi", arn_v, "dattri", "IFAttributorArnoldi", dattri_arnoldi)
        elif m == "datainf":
            add("DataInf", "", "datatrace", "DataInf", dt_datainf, gn=True)
            add("DataInf", "", "dattri", "IFAttributorDataInf", dattri_datainf, gn=True)
        elif m == "ekfac":
            add("EK-FAC", "", "datatrace", "EKFAC", dt_ekfac, gn=True)
            add("EK-FAC", "", "dattri", "IFAttributorEKFAC", dattri_ekfac, gn=True)
            add("EK-FAC", "", "kronfluence", "Analyzer(ekfac)", kronfluence_ekfac, gn=True)
        else:
            raise ValueError(f"unknown method {m!r}")
    return cells


def _rep(base: Settings, k: int) -> Settings:
    st = copy.copy(base)
    st.cg_iters = k
    return st


DT_FUNCS = {
    "exact": dt_exact,
    "CG": dt_cg,
    "LiSSA": dt_lissa,
    "Arnoldi": dt_arnoldi,
    "DataInf": dt_datainf,
    "EK-FAC": dt_ekfac,
}


RUNNERS: dict[str, Callable] = {
    f.__name__: f
    for f in (
        dt_exact,
        dt_cg,
        dt_lissa,
        dt_arnoldi,
        dt_datainf,
        dt_ekfac,
        dattri_explicit,
        dattri_cg,
        dattri_lissa,
        dattri_arnoldi,
        dattri_datainf,
        dattri_ekfac,
        kronfluence_ekfac,
    )
}


def warm_settings(st: Settings, wl: Workload) -> Settings:
    """Cheap settings for a warm-up run on a small workload."""
    w = copy.copy(st)
    w.batch_size = min(st.batch_size, wl.n_train)
    w.lissa_batch = min(st.lissa_batch, wl.n_train)
    w.lissa_depth = min(st.lissa_depth, 20)
    w.cg_iters = min(st.cg_iters, 3) if st.cg_iters else 0
    w.arnoldi_rank = min(st.arnoldi_rank, 10)
    w.arnoldi_iter = min(st.arnoldi_iter, 30)
    return w


def tiny_workload(kind: str = "mlp") -> Workload:
    """MLP 64-16-10 (or, for the CNN workload, the 4/8-channel CNN) on 60 x 10 examples:
    warms the same code paths (imports, torch.func, hooks, convolutions, LAPACK) in a fresh
    worker process without the full-size factorization."""
    return make_workload(60, 10, hidden=16, epochs=5, lr=0.1, seed=1, kind=kind, channels=(4, 8))


def save_workload(wl: Workload, path: str) -> None:
    """The trained model and data, plus ``kind``/``arch`` so that isolated worker processes
    rebuild the same model (MLP or CNN) before loading the weights."""
    torch.save(
        {
            "kind": wl.kind,
            "arch": wl.arch,
            "hidden": wl.arch.get("hidden"),
            "state": wl.model.state_dict(),
            "train": wl.train,
            "test": wl.test,
            "stats": (wl.train_acc, wl.test_acc, wl.train_loss),
        },
        path,
    )


def load_workload(path: str) -> Workload:
    d = torch.load(path, weights_only=True)
    kind = d.get("kind", "mlp")
    arch = d.get("arch") or {"hidden": d["hidden"]}
    model = build_model(kind, arch)
    model.load_state_dict(d["state"])
    model.eval()
    wl = Workload(model, tuple(d["train"]), tuple(d["test"]), kind=kind, arch=arch)
    wl.train_acc, wl.test_acc, wl.train_loss = d["stats"]
    return wl


def worker_main(args: argparse.Namespace) -> int:
    """One timed run of one cell in a fresh process (--isolate): warm up on a tiny workload,
    run, save (S, times, notes)."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    spec = json.loads(args.worker)
    wl = load_workload(spec["workload"])
    st = Settings(**spec["settings"])
    fn = RUNNERS[spec["runner"]]
    try:
        tiny = tiny_workload(wl.kind)
        run_cell(fn, tiny, warm_settings(st, tiny))
        gc.collect()
        if spec.get("profile"):
            text = profile_run(fn, wl, st, spec["profile"])
            torch.save({"S": None, "t": {}, "notes": [text]}, spec["out"])
            return 0
        S, t, notes = run_cell(fn, wl, st)
    except Exception as exc:  # a library that cannot run this workload: a clean message
        import traceback

        traceback.print_exc()
        torch.save({"error": f"{type(exc).__name__}: {exc}"}, spec["out"])
        return 3
    torch.save({"S": S, "t": t, "notes": notes}, spec["out"])
    return 0


class WorkerError(RuntimeError):
    """An exception raised inside an isolated worker; its message is 'Type: message'."""


def run_isolated(cell: Cell, workload_path: str, threads: int, profile: str | None = None) -> tuple:
    import subprocess

    fd, out = tempfile.mkstemp(prefix="bench-influence-", suffix=".pt")
    os.close(fd)
    spec = {
        "workload": workload_path,
        "settings": cell.settings.__dict__,
        "runner": cell.fn.__name__,
        "out": out,
        "profile": profile,
    }
    try:
        proc = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--threads",
                str(threads),
                "--worker",
                json.dumps(spec),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 3 and os.path.getsize(out):  # the worker caught an exception
            raise WorkerError(torch.load(out, weights_only=False)["error"])
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            if proc.returncode == -9:  # SIGKILL, as the kernel's OOM killer sends
                ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
                how = f"killed by SIGKILL (out of memory? the machine has {ram:.0f} GB)"
            elif proc.returncode < 0:
                how = f"killed by signal {-proc.returncode}"
            else:
                how = f"exit {proc.returncode}"
            raise WorkerError(f"worker {how}" + (f": {' | '.join(tail)}" if tail else ""))
        d = torch.load(out, weights_only=False)
    finally:
        os.unlink(out)
    return d["S"], d["t"], d["notes"]


def profile_run(fn: Callable, wl: Workload, st: Settings, label: str, top: int = 14) -> str:
    """cProfile of one datatrace run (fit + attribute only): top functions by internal and
    by cumulative time, plus the minor page faults of the run."""
    import resource

    global _PROFILER
    pr = _PROFILER = cProfile.Profile()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    try:
        _, t, _ = run_cell(fn, wl, st)
    finally:
        _PROFILER = None
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    lines = [
        f"cProfile of datatrace {label} (fit {t['fit']:.2f}s, attribute {t['attribute']:.2f}s, "
        f"profiler overhead included; {faults / 1e6:.2f}M minor page faults in the run):"
    ]
    for key, what in (("tottime", "internal"), ("cumulative", "cumulative")):
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats(key).print_stats(top)
        body = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        start = next((i for i, ln in enumerate(body) if ln.lstrip().startswith("ncalls")), 0)
        lines.append(f"  top {top} by {what} time:")
        lines += ["    " + ln.replace(_SITE, "") for ln in body[start : start + top + 1]]
    return "\n".join(lines)


_SITE = os.path.dirname(os.path.dirname(torch.__file__)) + os.sep  # shortened in profiles


def profile_datatrace(cell: Cell, wl: Workload, workload_path: str, threads: int) -> str:
    """Profile one datatrace run of ``cell`` (in a fresh worker when the cell is isolated)."""
    label = f"{cell.method} {cell.variant}".strip()
    quiet()
    if cell.isolate:
        return run_isolated(cell, workload_path, threads, profile=label)[2][0]
    return profile_run(cell.fn, wl, cell.settings, label)


# ----------------------------------------------------------------------------- main


def flat_row(workload: str, r: dict[str, Any], cg_iters: int) -> dict[str, Any]:
    """One entry of the JSON ``rows``: the cell ``r`` (a ``results`` row) with the agreement
    that fits its method: r(GN) for the Gauss-Newton-type methods (DataInf, EK-FAC), r(H)
    otherwise; ``seconds``/``peak_mem_gb``/``agreement`` are None for a cell that failed."""
    key = {
        "exact": "exact",
        "LiSSA": "lissa",
        "Arnoldi": "arnoldi",
        "DataInf": "datainf",
        "EK-FAC": "ekfac",
    }.get(r["method"], f"cg{cg_iters}")
    gn = r["method"] in ("DataInf", "EK-FAC")
    ok = "median_s" in r
    notes = ([f"error: {r['error']}"] if r["error"] else []) + list(r["notes"])
    agreement = None
    if ok:
        if r["nonfinite_rows"]:
            notes.append(f"{r['nonfinite_rows']} queries with NaN/inf scores (excluded from r)")
        if any(x > BUSY_LIMIT for x in r["others_cores"]):
            notes.append("busy machine during a run")
        agreement = r["pearson_GN" if gn else "pearson_H"]
        agreement = agreement if math.isfinite(agreement) else None
    return {
        "workload": workload,
        "method": key,
        "library": r["library"],
        "seconds": float(r["median_s"]) if ok else None,
        "peak_mem_gb": float(r["mem_gb"]) if ok and math.isfinite(r["mem_gb"]) else None,
        "agreement": agreement,
        "agreement_with": "Gauss-Newton IF float64" if gn else "exact IF float64",
        "damping": float(r["damping"]),
        "note": "; ".join(notes),
    }


def _src_state() -> str:
    """git HEAD of the checkout plus a hash of uncommitted changes under src/ (if any)."""
    import hashlib
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "src"], cwd=root, capture_output=True, text=True
        ).stdout
    except OSError:
        return "?"
    return head + (f"+dirty:{hashlib.sha1(diff.encode()).hexdigest()[:8]}" if diff else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workload",
        choices=WORKLOAD_KINDS,
        default="mlp",
        help="mlp (default): digits MLP 64-128-10, 9,610 params; cnn: digits CNN on 1x8x8 "
        "images, conv3x3(8)-ReLU-maxpool2-conv3x3(16)-ReLU-maxpool2-linear(64->10), 1,898 "
        "params; both 500 train x 100 test, the same split and seeded plain-SGD recipe",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smaller model (MLP 64-16-10 / CNN with 4 and 8 channels), 100 train x 20 test, "
        "short solvers (smoke test)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    ap.add_argument(
        "--slow-threshold",
        type=float,
        default=60.0,
        help="a cell whose first run exceeds this many seconds runs only once",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="training examples per batch, every library (default: all)",
    )
    ap.add_argument(
        "--dampings",
        default="0.01",
        help="comma-separated lam values (mean-loss convention), e.g. 0.01,0.1",
    )
    ap.add_argument("--methods", default="exact,cg,lissa,arnoldi,datainf,ekfac")
    ap.add_argument("--libraries", default="datatrace,dattri,kronfluence")
    ap.add_argument("--cg-iters", default=None, help="matched CG iteration counts (default 20,100)")
    ap.add_argument("--lissa-depth", type=int, default=None, help="default 1000 (quick 200)")
    ap.add_argument("--lissa-batch", type=int, default=50)
    ap.add_argument(
        "--lissa-scale",
        type=float,
        default=None,
        help="LiSSA scale for both libraries (default 1.5 x largest |eig(H + lam)|)",
    )
    ap.add_argument("--arnoldi-rank", type=int, default=None, help="default 50 (quick 20)")
    ap.add_argument(
        "--arnoldi-iter",
        type=int,
        default=None,
        help="Krylov dimension (default 2 x rank + 20, datatrace's default)",
    )
    ap.add_argument(
        "--profile",
        default="auto",
        help="cProfile datatrace for these methods (comma list), 'auto' (those "
        "missing a target), or 'none'",
    )
    ap.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="seconds to wait before each timed run for other processes to go idle",
    )
    ap.add_argument(
        "--isolate",
        default="all",
        help="methods whose timed runs each get a fresh worker process (comma list, 'all' "
        "or 'none'). Default all: in one long-lived process a run's speed depends on the "
        "heap left by earlier runs (datatrace's exact Hessian builds 2x faster after "
        "dattri's CG has left ~20 GB of freed heap: fewer page faults), and dattri's "
        "explicit Hessian alone peaks at ~14 GB",
    )
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    global _max_wait
    _max_wait = args.max_wait

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)

    libs = {x for x in args.libraries.split(",") if x} | {"datatrace"}
    methods = [x.strip().lower() for x in args.methods.split(",") if x.strip()]
    import dattri  # noqa: F401

    import datatrace as dt

    versions = {"datatrace": dt.__version__, "torch": torch.__version__}
    for name in ("dattri", "kronfluence"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "?"

    kind = args.workload
    if args.quick:
        wl = make_workload(100, 20, hidden=16, epochs=100, lr=0.1, kind=kind, channels=(4, 8))
        cg_iters = [5, 30]
        depth, rank = 200, 20
    else:
        wl = make_workload(500, 100, hidden=128, epochs=100, lr=0.1, kind=kind, channels=(8, 16))
        cg_iters = [20, 100]
        depth, rank = 1000, 50
    if args.cg_iters:
        cg_iters = [int(x) for x in args.cg_iters.split(",")]
    depth = args.lissa_depth or depth
    rank = args.arnoldi_rank or rank
    n_iter = args.arnoldi_iter or min(wl.n_params, 2 * rank + 20)
    batch_size = args.batch_size or wl.n_train
    src_state = _src_state()
    env = {
        "datatrace_src": src_state,
        **versions,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "dtype": "float32",
        "batch_size": batch_size,
        "repeats": args.repeats,
        "slow_threshold_s": args.slow_threshold,
        "quick": args.quick,
        "workload": wl.describe(),
        "workload_name": wl.name,
    }
    print("environment:", json.dumps(env))
    print("workload:", wl.describe(), flush=True)

    all_rows: list[dict[str, Any]] = []
    flat_rows: list[dict[str, Any]] = []  # the JSON "rows": one per (damping, method, library)
    ref_info: dict[str, Any] = {}
    profiles: dict[str, str] = {}
    targets_all: list[dict[str, Any]] = []
    dampings = [float(x) for x in args.dampings.split(",")]
    ind = independent(wl)
    checks = {lam: ind.scores(lam) for lam in dampings}
    ind.H = None  # 740 MB in float64 for the MLP; only the spectrum and the scores are kept
    gc.collect()
    print(f"independent float64 Hessian + spectrum (untimed): {ind.seconds:.1f}s", flush=True)
    wl_fd, wl_path = tempfile.mkstemp(prefix="bench-influence-workload-", suffix=".pt")
    os.close(wl_fd)
    save_workload(wl, wl_path)
    iso = {m.strip().lower() for m in args.isolate.split(",")}
    for lam in dampings:
        print(f"\n=== damping lam = {lam:g} (mean-loss convention) ===", flush=True)
        ref = references(wl, lam)
        ev = ind.evals
        top = float((ev + lam).abs().max())
        info = {
            "hessian_eig_min": float(ev.min()),
            "hessian_eig_max": float(ev.max()),
            "n_eig_below_minus_lam": int((ev + lam <= 0).sum()),
            "ref_seconds": ref["seconds"],
            "ref_warnings": ref["H_warnings"],
        }
        print(
            f"reference (float64, untimed): H eigenvalues in [{info['hessian_eig_min']:.4g}, "
            f"{info['hessian_eig_max']:.4g}], {info['n_eig_below_minus_lam']} with "
            f"eig + lam <= 0; datatrace exact {ref['seconds']['exact_f64']:.1f}s, GN "
            f"{ref['seconds']['gn_f64']:.1f}s; warnings: {ref['H_warnings'] or 'none'}",
            flush=True,
        )
        r_hg, _ = per_query_pearson(ref["GN"], ref["H"])
        info["pearson_GN_vs_H"] = r_hg
        print(f"  r(GN reference vs exact-H reference) = {r_hg:.4f}")
        check = checks[lam]
        r_ind, _ = per_query_pearson(check, ref["H"])
        err = float((check.double() - ref["H"].double()).abs().max() / ref["H"].abs().max())
        info["independent_check"] = {"pearson": r_ind, "max_rel_err": err}
        print(
            f"  independent float64 check of the exact reference (torch.func.hessian + "
            f"linalg.solve): r = {r_ind:.6f}, max rel err {err:.1e}",
            flush=True,
        )
        scale = args.lissa_scale or 1.5 * top
        base = Settings(
            damping=lam,
            batch_size=batch_size,
            lissa_depth=depth,
            lissa_batch=min(args.lissa_batch, wl.n_train),
            lissa_scale=scale,
            arnoldi_rank=rank,
            arnoldi_iter=n_iter,
            top_eig=top,
        )
        cells = build_cells(methods, libs, base, cg_iters)
        for c in cells:
            c.isolate = "all" in iso or c.method.lower().replace("-", "") in iso
        ref_info[str(lam)] = info

        # warm-up on a slice (imports, lazy init, vmap/hook set-up, LAPACK); isolated cells
        # warm up in their own worker process, on a tiny model
        warm = wl.slice(min(50, wl.n_train), min(10, wl.n_test))
        for c in cells:
            if c.isolate:
                continue
            t0 = time.perf_counter()
            try:
                run_cell(c.fn, warm, warm_settings(c.settings, warm))
            except Exception as exc:
                print(f"  warm-up {c.method} {c.library}: {type(exc).__name__}: {exc}")
            print(
                f"  warm-up {c.method:7s} {c.variant:22s} {c.library:11s} "
                f"{time.perf_counter() - t0:6.2f}s",
                flush=True,
            )

        # timed runs, interleaved across cells
        for rep in range(args.repeats):
            for c in cells:
                if c.error is not None:
                    continue
                if rep > 0 and c.times and c.times["total"][0] > args.slow_threshold:
                    continue
                before = quiet()
                watch = CpuWatch()
                try:
                    if c.isolate:
                        S, t, notes = run_isolated(c, wl_path, args.threads)
                    else:
                        S, t, notes = run_cell(c.fn, wl, c.settings)
                except Exception as exc:
                    msg = (
                        str(exc) if isinstance(exc, WorkerError) else f"{type(exc).__name__}: {exc}"
                    )
                    c.error = msg[:400]
                    print(f"  {c.method:7s} {c.variant:22s} {c.library:11s} ERROR {c.error}")
                    continue
                t["others_cores"] = max(before, watch.others())
                for k, v in t.items():
                    c.times.setdefault(k, []).append(v)
                if c.S is None:
                    c.S = S
                    c.notes = notes
                print(
                    f"  {c.method:7s} {c.variant:22s} {c.library:11s} run {rep + 1} "
                    f"{t['total']:8.2f}s (fit {t['fit']:.2f}, attribute {t['attribute']:.2f})",
                    flush=True,
                )
                del S
                gc.collect()

        # rows
        dt_time = {}
        for c in cells:
            if c.library == "datatrace" and c.times:
                dt_time[(c.method, c.variant)] = statistics.median(c.times["total"])
        rows = []
        for c in cells:
            row: dict[str, Any] = {
                "damping": lam,
                "method": c.method,
                "variant": c.variant,
                "library": c.library,
                "api": c.api,
                "error": c.error,
                "notes": c.notes,
            }
            if c.times:
                med = {k: statistics.median(v) for k, v in c.times.items()}
                ref_t = dt_time.get((c.method, c.variant))
                r_h, bad_rows = per_query_pearson(c.S, ref["H"])
                r_g, _ = per_query_pearson(c.S, ref["GN"])
                row.update(
                    n_runs=len(c.times["total"]),
                    median_s=med["total"],
                    min_s=min(c.times["total"]),
                    fit_s=med["fit"],
                    attribute_s=med["attribute"],
                    mem_gb=max(c.times["mem_gb"]),
                    runs_s=c.times["total"],
                    others_cores=c.times["others_cores"],
                    ratio=med["total"] / ref_t if ref_t else float("nan"),
                    pearson_H=r_h,
                    pearson_GN=r_g,
                    nonfinite_rows=bad_rows,
                    scale_vs_H=lsq_scale(c.S, ref["GN"] if c.gn_type else ref["H"]),
                    scale_ref="GN" if c.gn_type else "H",
                    gn_type=c.gn_type,
                )
            rows.append(row)
        all_rows += rows
        flat_rows += [
            flat_row(wl.name, r, c.settings.cg_iters) for r, c in zip(rows, cells, strict=True)
        ]

        # targets
        def get(method: str, lib: str, variant: str | None = None) -> dict | None:
            for r in rows:
                if r["method"] == method and r["library"] == lib and "median_s" in r:
                    if variant is None or r["variant"] == variant:
                        return r
            return None

        targets = []

        def target(
            name: str,
            method: str,
            peer: str,
            need: float,
            variant: str | None = None,
            key: str = "pearson_H",
            tol: float = 0.01,
        ) -> None:
            d, p = get(method, "datatrace", variant), get(method, peer, variant)
            if d is None or p is None:
                return
            speed = p["median_s"] / d["median_s"]
            agree_ok = not (d[key] < p[key] - tol) if math.isfinite(p[key]) else True
            targets.append(
                {
                    "damping": lam,
                    "target": name,
                    "method": method,
                    "variant": variant or "",
                    "peer": peer,
                    "speedup": speed,
                    "needed": need,
                    "dt_" + key: d[key],
                    "peer_" + key: p[key],
                    "met": speed >= need and agree_ok,
                }
            )

        target("exact >= 5x faster than dattri explicit", "exact", "dattri", 5.0)
        for k in cg_iters:
            target(
                "CG >= 2x faster than dattri at equal agreement", "CG", "dattri", 2.0, f"iters={k}"
            )
        target("LiSSA >= 2x faster than dattri at equal agreement", "LiSSA", "dattri", 2.0)
        target(
            "EK-FAC at least as fast as kronfluence, equal or better agreement",
            "EK-FAC",
            "kronfluence",
            1.0,
            key="pearson_GN",
            tol=0.005,
        )
        targets_all += targets

        # table
        print()
        hdr = (
            f"{'method':8s} {'variant':22s} {'library':11s} {'API':21s} {'n':>2s} "
            f"{'median s':>9s} {'min s':>7s} {'ratio':>7s} {'mem GB':>6s} {'r(H)':>7s} {'r(GN)':>7s} {'scale':>6s}  notes"
        )
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            if "median_s" not in r:
                print(
                    f"{r['method']:8s} {r['variant']:22s} {r['library']:11s} {r['api']:21s} "
                    f"{'':>2s} {'ERROR':>9s}  {r['error']}"
                )
                continue
            busy = any(x > BUSY_LIMIT for x in r["others_cores"])
            notes = list(r["notes"])
            if r["nonfinite_rows"]:
                notes.append(f"{r['nonfinite_rows']} queries with NaN (excluded from r)")
            if busy:
                notes.append("busy machine during a run")
            ratio = "ref" if r["library"] == "datatrace" else f"{r['ratio']:.2f}"
            rg = f"{r['pearson_GN']:.4f}"
            print(
                f"{r['method']:8s} {r['variant']:22s} {r['library']:11s} {r['api']:21s} "
                f"{r['n_runs']:2d} {r['median_s']:9.2f} {r['min_s']:7.2f} {ratio:>7s} {r['mem_gb']:6.2f} "
                f"{r['pearson_H']:7.4f} "
                f"{rg:>7s} {r['scale_vs_H']:6.3f}  {'; '.join(notes)}"
            )
        print(
            "\nratio = peer median / datatrace median (> 1: datatrace faster); r(H), r(GN) = mean"
            " per-query Pearson vs the float64 exact-Hessian / Gauss-Newton references at the "
            "same lam; mem GB = peak resident memory above the level before the run (max over "
            "runs, sampled every 20 ms, freed-but-unreturned heap included); scale = "
            "least-squares slope vs the exact-H reference (vs GN for EK-FAC/DataInf rows), "
            "1 = same sign and scale; n = timed runs."
        )
        print("\ntargets:")
        for t in targets:
            key = "pearson_GN" if "dt_pearson_GN" in t else "pearson_H"
            print(
                f"  [{'MET ' if t['met'] else 'MISS'}] {t['target']} {t['variant']}: "
                f"{t['speedup']:.2f}x (need {t['needed']:g}x); {key.split('_')[1]}-agreement "
                f"datatrace {t['dt_' + key]:.4f} vs {t['peer']} {t['peer_' + key]:.4f}"
            )

        # profiles
        if args.profile != "none":
            if args.profile == "auto":
                want = sorted({t["method"] for t in targets if not t["met"]})
            else:
                names = {m.lower() for m in args.profile.split(",")}
                want = sorted({c.method for c in cells if c.method.lower() in names})
            for m in want:
                cell = next(
                    (
                        c
                        for c in cells
                        if c.method == m and c.library == "datatrace" and c.error is None
                    ),
                    None,
                )
                if cell is None:
                    continue
                if m == "CG":  # profile the longest matched count
                    cell = [c for c in cells if c.method == m and c.library == "datatrace"][-1]
                print()
                prof = profile_datatrace(cell, wl, wl_path, args.threads)
                profiles[f"{lam:g}/{m}"] = prof
                print(prof, flush=True)
        for c in cells:
            c.S = None
        gc.collect()

    os.unlink(wl_path)
    end_state = _src_state()
    if end_state != src_state:
        print(
            f"\nWARNING: datatrace sources changed during the run ({src_state} -> "
            f"{end_state}); worker processes may have run different code"
        )
        env["datatrace_src_end"] = end_state
    if args.json:
        out = {
            "environment": env,
            "references": ref_info,
            "results": all_rows,
            "rows": flat_rows,
            "targets": targets_all,
            "profiles": profiles,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
