#!/usr/bin/env python
"""Benchmark datatrace TRAK against traker 0.3.2 (``trak.TRAKer``) and dattri 0.3.0
(``dattri.algorithm.trak.TRAKAttributor``), side by side on the CPU.

Usage::

    python bench/bench_trak.py [--quick] [--repeats N] [--threads T] [--json out.json]
                               [--workloads small,cnn] [--libraries datatrace,traker,dattri]
                               [--proj-dim K] [--damping LAM] [--dt-reference]

Workloads (the builders of ``bench_tracin.py``: scikit-learn ``load_digits``, no downloads,
seeded and deterministic; the same model, data and 4 SGD checkpoints for every library):

* ``small``: MLP 64-128-10 (9,610 parameters), 1,000 train x 200 test.
* ``cnn``: the CNN of ``bench_tracin``'s ``large`` workload (17,362 parameters, trained on
  20,000 augmented images), attributing over the first 5,000 of its training examples
  (``subset``) x the first 500 held-out test images.
* ``--quick``: ``small`` cut to 300 x 50 and ``cnn`` (trained on 2,000) cut to 600 x 100,
  projection dimension 128, one repeat (a smoke test).

Score convention (datatrace's; every peer is configured or converted to it)::

    S = (1/C) sum_c (1/n) Phi_q,c (Phi_c^T Phi_c / n + lam I)^{-1} Phi_c^T diag(1 - p_c)
      = (1/C) sum_c Phi_q,c (Phi_c^T Phi_c + n lam I)^{-1} Phi_c^T diag(1 - p_c)

of shape (n_test, n_train), positive = proponent. ``Phi_c`` (n x k) are the randomly
projected per-example gradients of the margin ``f = log p_y - log(1 - p_y)`` at checkpoint c
(``Phi_q,c`` those of the queries), ``p_c`` the probability of the true label at checkpoint
c, n the number of training examples, C the number of checkpoints and k = ``--proj-dim``
(default 512). k must be < n: at k >= n the undamped Gram matrix fits any target exactly
and the scores lose their meaning. The second line shows that datatrace's 1/n is absorbed
by its damping convention: no peer needs a 1/n rescaling, only a rescaled ridge.

Damping: one ridge that all three libraries can express (datatrace ``damping``, traker
``lambda_reg``, dattri ``regularization``). It must be > 0 because the unprojected
reference below has p >> n, so its undamped Gram matrix is singular. The default is
``lam = lam0``: the mean squared entry of the unprojected margin gradients at the final
checkpoint (datatrace's damping unit; its own default is 10 lam0). ``--damping`` sets lam.
(TRAK's paper and traker's default use lam = 0.)

Conversions (all read in the installed sources):

* datatrace: ``dt.TRAK(projection_dim=k, damping=lam, projection_seed=seed)`` computes S as
  written: checkpoint weights 1/C, and each checkpoint's scores times its own 1 - p_c. Its
  projection has E[P P^T] = I (Gaussian entries / sqrt(k)); for ``nn.Linear`` layers it is
  Kronecker-structured (datatrace's default), for ``nn.Conv2d`` dense. Each checkpoint gets
  an independent projection (seed + 1,000,003 c), as in traker and dattri.
* traker: ``TRAKer(task="image_classification", device="cpu", use_half_precision=False)``.
  - Its model output is the same margin, and its ``out_to_loss`` (Q) is 1 - p.
  - On the CPU it uses its ``BasicProjector`` with N(0, 1) entries (not divided by
    sqrt(k)), a different seed per checkpoint, and it divides features by sqrt(p)
    (p = number of parameters): Phi_t = sqrt(k/p) Phi. So ``lambda_reg = n k lam / p``.
  - Its ``BasicScoreComputer`` divides (X^T X + lambda_reg I)^{-1} by the mean of its
    absolute entries (a float16 safeguard). That factor differs between checkpoints, so it
    reweights them. A subclass, ``_UnscaledScoreComputer``, computes the same products in
    float32 without that division.
  - ``finalize_scores`` averages the per-checkpoint scores and, separately, the Q terms (the
    paper's (mean_c Phi_q,c ...) x (mean_c Q_c)). datatrace instead multiplies each
    checkpoint's scores by its own Q_c. So the script calls ``finalize_scores`` once per
    checkpoint (``model_ids=[c]``: scores_c x Q_c) and averages those, which gives S exactly.
  - The result is (n_train, n_test), so it is transposed. Its sign is already
    positive = proponent.
  - ``save_dir`` is a fresh temporary directory. ``load_from_save_dir=False`` is broken in
    0.3.2: ``experiments.json`` is then never created, and scoring reads it.
* dattri: ``TRAKAttributor``.
  - The task is ``AttributionTask(loss_func=margin, target_func=margin)``, called with one
    example at a time (dattri vmaps). ``correct_probability_func`` is
    ``exp(-cross_entropy)``, so Q = 1 - p.
  - Its CPU projector has N(0, 1/k) entries, and it divides gradients by sqrt(p):
    Phi_d = Phi / sqrt(p). So ``regularization = n lam / p``.
  - Like traker, it averages Q over checkpoints separately. The script builds one attributor
    per checkpoint (each on a single-checkpoint task), runs ``cache`` + ``attribute`` on
    each, and averages the C results, which gives S exactly. dattri's own checkpoint loop
    would do the same work. ``proj_seed = seed + 100000 c`` reproduces the seed dattri
    itself uses for checkpoint c.
  - The result is (n_train, n_test), so it is transposed. Its sign is already
    positive = proponent.
  - In 0.3.0, ``projector_kwargs`` updates a module-level default dict that all later
    attributors share, so the script always passes every key.
  - dattri's dense projector is a copy of traker's (same seeds, same blocks). With the
    conversions above, the two produce the same matrices (pairwise Pearson 1.0000), which
    checks both sets of conversions against each other.

Agreement. Random projections differ between libraries and seeds, so every library is
compared with an UNPROJECTED float64 reference of the same S (same lam):

* ``r(ref)`` / ``agreement``: the mean over test queries of the Pearson correlation over
  training examples.
* ``scale``: the least-squares slope against the reference. It is ~1 when the conversions
  are right; projection shrinks it somewhat.
* How the reference is computed: in its kernel form ``Phi_q Phi^T (Phi Phi^T + n lam I)^{-1}``
  (an n x n solve, exact for lam > 0), with per-example margin gradients from
  ``torch.func``, independently of all three libraries.
* How the reference is checked: against datatrace's own unprojected float64 TRAK
  (``projection_dim=None``) on the last layer (``fc2``), where datatrace's p x p
  eigendecomposition is cheap. On every parameter that eigendecomposition took 18 min for
  ``small`` on 2 busy cores (four 9,610 x 9,610 float64 matrices). ``--dt-reference`` adds
  it anyway, and reports its agreement with the kernel form.
* Seeds: timed run r (r = 0, 1, ...) uses projection seed r in every library. The reported
  agreement is the mean over the repeats. ``r(seed)`` = seed 0 vs seed 1 of one library (the
  projection noise). Pairwise agreement between libraries uses seed 0.

Timing:

* Every timed run is a fresh worker process. It imports, warms up with the same library on
  a 64 x 8 slice with k = 32, then runs the full workload once.
* Runs are interleaved across libraries: repeat 1 of every library, then repeat 2, ...
* Before each run (untimed): ``gc.collect()``, ``os.sync()``, and a wait (up to
  ``--max-wait`` s) for an idle machine.
* The median wall clock is reported, taken over the runs that no other process disturbed
  when there are any.
* ``mem GB`` is the worker's peak resident memory (VmRSS sampled every 10 ms) above its
  level after the warm-up.
* What is timed is everything from a trained model and its checkpoints (in memory) to the
  score matrix:
  - datatrace: ``TRAK.fit`` (featurize every checkpoint, Gram matrices) + ``attribute``.
  - traker: ``TRAKer(...)``, then ``load_checkpoint`` + ``featurize`` for every checkpoint,
    ``finalize_features``, ``start_scoring_checkpoint`` + ``score`` for every checkpoint,
    and ``finalize_scores``.
  - dattri: ``AttributionTask`` + ``TRAKAttributor`` construction, ``cache``, ``attribute``.
* Not timed: training, data loaders, creating the temporary directory, the transposition.
* Contention: when other processes compete for the 2 cores, datatrace's many small torch
  operations slow down far more than the peers' (once 30 s instead of 0.14 s for ``cnn``
  in ``--quick``). Rows with disturbed runs say so in their note.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: peers' progress bars

import argparse
import copy
import gc
import importlib.metadata
import json
import logging
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from common import RssPeak
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tracin  # the shared workloads and timing hygiene
from bench_tracin import (
    BUSY_LIMIT,
    CNN,
    MLP,
    Workload,
    _busy_s,
    _src_state,
    make_large,
    make_small,
    quiet,
    subset,
)

LIBRARIES = ("datatrace", "traker", "dattri")


@dataclass
class Settings:
    proj_dim: int
    damping: float  # lam, datatrace's convention
    batch_size: int
    seed: int = 0


# ----------------------------------------------------------------------------- workloads


def build_workloads(names: list[str], quick: bool) -> list[Workload]:
    out = []
    for name in names:
        if name == "small":
            wl = make_small()
            if quick:
                wl = subset(wl, 300, 50)
        elif name == "cnn":
            if quick:
                wl = subset(make_large(n_train=2_000, n_test=200), 600, 100)
            else:
                wl = subset(make_large(), 5_000, 500)
            wl.name = "cnn"
        else:
            raise ValueError(f"unknown workload {name!r} (choose from small, cnn)")
        out.append(wl)
    return out


def save_workload(wl: Workload, path: str) -> None:
    torch.save(
        {
            "name": wl.name,
            "arch": type(wl.model).__name__,
            "ckpts": wl.ckpts,
            "train": wl.train,
            "test": wl.test,
            "test_acc": wl.test_acc,
        },
        path,
    )


def load_workload(path: str) -> Workload:
    d = torch.load(path, weights_only=True)
    model = {"MLP": MLP, "CNN": CNN}[d["arch"]]()
    model.load_state_dict(d["ckpts"][-1][0])
    wl = Workload(d["name"], model, d["ckpts"], tuple(d["train"]), tuple(d["test"]))
    wl.test_acc = d["test_acc"]
    return wl


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- runners
# Each runner: (workload, settings) -> (S of shape (n_test, n_train) in datatrace's
# convention, {phase: seconds}). Only the library calls are inside the timed region.


def run_datatrace(wl: Workload, st: Settings) -> tuple[torch.Tensor, dict[str, float]]:
    import datatrace as dt

    task = dt.ClassificationTask(copy.deepcopy(wl.model))
    ckpts = [dt.Checkpoint.from_state_dict(sd) for sd, _ in wl.ckpts]  # TRAK weighs 1/C
    method = dt.TRAK(projection_dim=st.proj_dim, damping=st.damping, projection_seed=st.seed)
    t0 = time.perf_counter()
    fitted = method.fit(task, ckpts, wl.train, batch_size=st.batch_size, progress=False)
    t1 = time.perf_counter()
    S = fitted.attribute(wl.test)
    t2 = time.perf_counter()
    del fitted
    return S.detach(), {"fit": t1 - t0, "attribute": t2 - t1, "total": t2 - t0}


def _batches(
    data: tuple[torch.Tensor, torch.Tensor], size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for s in range(0, len(data[1]), size):
        yield data[0][s : s + size], data[1][s : s + size]


def run_traker(wl: Workload, st: Settings) -> tuple[torch.Tensor, dict[str, float]]:
    import numpy as np
    from trak import TRAKer
    from trak.score_computers import BasicScoreComputer

    class _UnscaledScoreComputer(BasicScoreComputer):
        """traker's BasicScoreComputer without ``xtx_inv /= xtx_inv.abs().mean()``."""

        def get_x_xtx_inv(self, grads: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
            eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
            inv = torch.linalg.inv((xtx + self.lambda_reg * eye).float()).to(self.dtype)
            return grads @ inv

    model = copy.deepcopy(wl.model)
    n, m, p = len(wl.train[1]), len(wl.test[1]), n_params(model)
    save_dir = tempfile.mkdtemp(prefix="bench-trak-traker-")
    try:
        t0 = time.perf_counter()
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=n,
            save_dir=save_dir,  # a fresh directory (load_from_save_dir=False is broken in
            # 0.3.2: it never creates experiments.json, which scoring then reads)
            device="cpu",
            score_computer=_UnscaledScoreComputer,
            proj_dim=st.proj_dim,
            logging_level=logging.ERROR,
            use_half_precision=False,
            projector_seed=st.seed,
            lambda_reg=n * st.proj_dim * st.damping / p,  # Phi_t = sqrt(k/p) Phi
        )
        for c, (sd, _) in enumerate(wl.ckpts):
            traker.load_checkpoint(sd, model_id=c)
            for xb, yb in _batches(wl.train, st.batch_size):
                traker.featurize(batch=(xb, yb), num_samples=len(yb))
        traker.finalize_features()
        for c, (sd, _) in enumerate(wl.ckpts):
            traker.start_scoring_checkpoint(
                exp_name="bench", checkpoint=sd, model_id=c, num_targets=m
            )
            for xb, yb in _batches(wl.test, st.batch_size):
                traker.score(batch=(xb, yb), num_samples=len(yb))
        t1 = time.perf_counter()
        total = None
        for c in range(len(wl.ckpts)):  # scores_c x Q_c, one checkpoint at a time
            s = torch.from_numpy(np.array(traker.finalize_scores("bench", model_ids=[c])))
            total = s if total is None else total + s
        t2 = time.perf_counter()
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
    S = (total / len(wl.ckpts)).T.contiguous()
    return S, {"featurize+score": t1 - t0, "finalize_scores": t2 - t1, "total": t2 - t0}


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p_y - log(1 - p_y) of logits (..., classes) and labels (...)."""
    correct = logits.gather(-1, y[..., None])[..., 0]
    others = logits.scatter(-1, y[..., None], float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def run_dattri(wl: Workload, st: Settings) -> tuple[torch.Tensor, dict[str, float]]:
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    model = copy.deepcopy(wl.model)
    model.eval()
    n, p = len(wl.train[1]), n_params(model)

    def margin(params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = data  # one example: dattri vmaps over the batch
        logits = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        return _margin(logits, y.unsqueeze(0)).squeeze(0)

    def correct_probability(
        params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        x, y = data
        logits = torch.func.functional_call(model, params, (x.unsqueeze(0),))
        return torch.exp(-F.cross_entropy(logits, y.unsqueeze(0)))

    train_loader = DataLoader(TensorDataset(*wl.train), batch_size=st.batch_size, shuffle=False)
    test_loader = DataLoader(TensorDataset(*wl.test), batch_size=st.batch_size, shuffle=False)
    t0 = time.perf_counter()
    total = None
    for c, (sd, _) in enumerate(wl.ckpts):  # one attributor per checkpoint: Q_c (see above)
        task = AttributionTask(loss_func=margin, target_func=margin, model=model, checkpoints=[sd])
        projector = {
            "proj_dim": st.proj_dim,
            "proj_max_batch_size": 32,
            "proj_seed": st.seed + 100_000 * c,  # = dattri's own seed for checkpoint c
            "device": "cpu",
        }
        attributor = TRAKAttributor(
            task=task,
            correct_probability_func=correct_probability,
            projector_kwargs=projector,
            device="cpu",
            regularization=n * st.damping / p,  # Phi_d = Phi / sqrt(p)
        )
        attributor.cache(train_loader)
        s = attributor.attribute(test_loader)  # (n_train, n_test)
        total = s if total is None else total + s
    t1 = time.perf_counter()
    S = (total / len(wl.ckpts)).T.contiguous()
    return S.detach(), {"total": t1 - t0}


RUNNERS: dict[str, Callable[[Workload, Settings], tuple[torch.Tensor, dict[str, float]]]] = {
    "datatrace": run_datatrace,
    "traker": run_traker,
    "dattri": run_dattri,
}
API = {
    "datatrace": "dt.TRAK",
    "traker": "TRAKer",
    "dattri": "TRAKAttributor",
}


# ----------------------------------------------------------------------------- reference


@dataclass
class Kernels:
    """Per checkpoint, in float64 without projection: K = Phi Phi^T (n, n), Kq = Phi_q Phi^T
    (m, n) and Q = 1 - p (n,); lam0 = mean squared gradient entry at the last checkpoint."""

    K: list[torch.Tensor]
    Kq: list[torch.Tensor]
    Q: list[torch.Tensor]
    lam0: float
    seconds: float

    def scores(self, damping: float) -> torch.Tensor:
        """S (n_test, n_train) = (1/C) sum_c Kq_c (K_c + n lam I)^{-1} diag(Q_c)."""
        n = self.K[0].shape[0]
        total = torch.zeros_like(self.Kq[0])
        for K, Kq, Q in zip(self.K, self.Kq, self.Q, strict=True):
            L = torch.linalg.cholesky(K + n * damping * torch.eye(n, dtype=K.dtype))
            total += torch.cholesky_solve(Kq.T, L).T * Q[None, :]
        return total / len(self.K)


def margin_gradients(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    data: tuple[torch.Tensor, torch.Tensor],
    params: tuple[str, ...] | None = None,
    batch: int = 250,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example margin gradients (n, p) and 1 - p_y (n,), float64, with torch.func."""
    state = {k: v.double() for k, v in state.items()}
    names = [k for k, _ in model.named_parameters() if params is None or k.split(".")[0] in params]
    fixed = {k: v for k, v in state.items() if k not in names}

    def f(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, {**fixed, **w}, (x[None],))
        return _margin(logits, y[None])[0]

    per_example = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))
    w = {k: state[k] for k in names}
    grads, q = [], []
    for xb, yb in _batches(data, batch):
        g = per_example(w, xb.double(), yb)
        grads.append(torch.cat([g[k].reshape(len(yb), -1) for k in names], dim=1))
        with torch.no_grad():
            logits = torch.func.functional_call(model, state, (xb.double(),))
        q.append(1.0 - torch.softmax(logits, dim=1).gather(1, yb[:, None])[:, 0])
    return torch.cat(grads), torch.cat(q)


def kernels(wl: Workload, params: tuple[str, ...] | None = None) -> Kernels:
    t0 = time.perf_counter()
    model = copy.deepcopy(wl.model).double().eval()
    K, Kq, Q = [], [], []
    for sd, _ in wl.ckpts:
        G, q = margin_gradients(model, sd, wl.train, params)
        Gq, _ = margin_gradients(model, sd, wl.test, params)
        K.append(G @ G.T)
        Kq.append(Gq @ G.T)
        Q.append(q)
        lam0 = float(G.pow(2).mean())
        del G, Gq
    return Kernels(K, Kq, Q, lam0, time.perf_counter() - t0)


def datatrace_unprojected(
    wl: Workload, damping: float, params: tuple[str, ...] | None = None
) -> torch.Tensor:
    """datatrace's own TRAK without projection, in float64 (the brief's reference)."""
    import datatrace as dt

    model = copy.deepcopy(wl.model).double()
    ckpts = [
        dt.Checkpoint.from_state_dict({k: v.double() for k, v in sd.items()}) for sd, _ in wl.ckpts
    ]
    train = (wl.train[0].double(), wl.train[1])
    test = (wl.test[0].double(), wl.test[1])
    fitted = dt.TRAK(projection_dim=None, damping=damping, params=params).fit(
        dt.ClassificationTask(model), ckpts, train, batch_size=500, progress=False
    )
    return fitted.attribute(test)


# ----------------------------------------------------------------------------- measuring


def per_query_pearson(S: torch.Tensor, R: torch.Tensor) -> float:
    """Mean over queries (rows) of the Pearson correlation over training examples; NaN if
    any entry of S is not finite."""
    a, b = S.double(), R.double()
    if not torch.isfinite(a).all():
        return float("nan")
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return float(r.mean())


def lsq_scale(S: torch.Tensor, R: torch.Tensor) -> float:
    """Least-squares slope of S on R (1 = same sign and scale)."""
    a, b = S.double().flatten(), R.double().flatten()
    return float((a @ b) / (b @ b))


class ChildCpuWatch:
    """CPU cores that processes other than this one and its (finished) workers used."""

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), _busy_s(), self._own()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others(self) -> float:
        wall = time.perf_counter() - self.t
        other = (_busy_s() - self.busy) - (self._own() - self.own)
        return max(0.0, other) / wall if wall > 0 else 0.0


# ----------------------------------------------------------------------------- workers


def worker_main(spec: dict[str, Any]) -> int:
    """One timed run in a fresh process: warm up on a slice, run, save (S, times)."""
    warnings.filterwarnings("ignore")
    wl = load_workload(spec["workload"])
    st = Settings(**spec["settings"])
    run = RUNNERS[spec["library"]]
    warm = subset(wl, 64, 8)
    run(warm, Settings(min(32, st.proj_dim), st.damping, st.batch_size, st.seed))
    gc.collect()
    with RssPeak() as mem:
        S, t = run(wl, st)
    t["mem_gb"] = mem.gb
    torch.save({"S": S, "t": t}, spec["out"])
    return 0


def run_isolated(lib: str, workload_path: str, st: Settings, threads: int) -> tuple:
    fd, out = tempfile.mkstemp(prefix="bench-trak-", suffix=".pt")
    os.close(fd)
    spec = {"workload": workload_path, "library": lib, "settings": st.__dict__, "out": out}
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads)]
    try:
        proc = subprocess.run(
            [*cmd, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            how = "killed (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
            raise RuntimeError(f"worker {how}: {' | '.join(tail)}")
        d = torch.load(out, weights_only=True)
    finally:
        os.unlink(out)
    return d["S"], d["t"]


# ----------------------------------------------------------------------------- main


@dataclass
class Prepared:
    """A workload saved for the workers, its settings, its reference and untimed checks."""

    wl: Workload
    path: str
    settings: Settings
    reference: torch.Tensor
    info: dict[str, Any]


def prepare(wl: Workload, tmpdir: str, args: argparse.Namespace, proj_dim: int) -> Prepared:
    n = len(wl.train[1])
    path = os.path.join(tmpdir, f"{wl.name}.pt")
    save_workload(wl, path)
    kern = kernels(wl)
    lam = args.damping if args.damping is not None else kern.lam0
    st = Settings(proj_dim, lam, args.batch_size)
    ref = kern.scores(lam)
    info: dict[str, Any] = {
        "describe": wl.describe(),
        "n_params": wl.n_params,
        "damping": lam,
        "lam0": kern.lam0,
        "traker_lambda_reg": n * proj_dim * lam / wl.n_params,
        "dattri_regularization": n * lam / wl.n_params,
        "reference": "float64 TRAK without projection, kernel form, same damping",
        "reference_s": kern.seconds,
    }
    del kern
    # The kernel-form reference vs datatrace's own unprojected TRAK, on the last layer and a
    # slice of the data: a check of the formula (datatrace's p x p is cheap there).
    t0 = time.perf_counter()
    last = ("fc2",)
    part = subset(wl, min(n, 1_000), min(len(wl.test[1]), 100))
    r_dt = datatrace_unprojected(part, lam, params=last)
    r_kern = kernels(part, params=last).scores(lam)
    info["reference_check"] = {
        "params": list(last),
        "n_train": len(part.train[1]),
        "n_test": len(part.test[1]),
        "pearson": per_query_pearson(r_kern, r_dt),
        "scale": lsq_scale(r_kern, r_dt),
        "max_rel_err": float((r_kern - r_dt).abs().max() / r_dt.abs().max()),
        "seconds": time.perf_counter() - t0,
    }
    if args.dt_reference and wl.name == "small":
        t0 = time.perf_counter()
        r_full = datatrace_unprojected(wl, lam)
        info["datatrace_unprojected"] = {
            "pearson_with_reference": per_query_pearson(r_full, ref),
            "scale": lsq_scale(r_full, ref),
            "seconds": time.perf_counter() - t0,
        }
    chk = info["reference_check"]
    print(f"workload {wl.describe()}", flush=True)
    print(
        f"  lam = {lam:.4g} (lam0 {info['lam0']:.4g}); traker lambda_reg "
        f"{info['traker_lambda_reg']:.4g}, dattri regularization "
        f"{info['dattri_regularization']:.4g}; reference {info['reference_s']:.1f}s",
        flush=True,
    )
    print(
        f"  reference vs datatrace TRAK(projection_dim=None) float64 on fc2 "
        f"({chk['n_train']} x {chk['n_test']}): Pearson {chk['pearson']:.6f}, "
        f"scale {chk['scale']:.6f}",
        flush=True,
    )
    if "datatrace_unprojected" in info:
        u = info["datatrace_unprojected"]
        print(
            f"  datatrace TRAK(projection_dim=None) float64, every parameter: Pearson with the "
            f"reference {u['pearson_with_reference']:.6f}, scale {u['scale']:.6f} "
            f"({u['seconds']:.0f}s)",
            flush=True,
        )
    return Prepared(wl, path, st, ref, info)


@dataclass
class Cell:
    workload: str
    library: str
    runs_s: list[float] = field(default_factory=list)
    mem_gb: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # cores used by other processes
    phases: dict[str, list[float]] = field(default_factory=dict)
    agreement: list[float] = field(default_factory=list)  # with the reference, one per seed
    scale: list[float] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)  # seeds 0 and 1
    error: str | None = None

    def median(self) -> float | None:
        """Median over the runs that no other process disturbed (all if none was clean)."""
        clean = [t for t, o in zip(self.runs_s, self.others, strict=True) if o <= BUSY_LIMIT]
        return statistics.median(clean or self.runs_s) if self.runs_s else None


def run_cells(prep: Prepared, libs: list[str], repeats: int, threads: int) -> dict[str, Cell]:
    cells = {lib: Cell(prep.wl.name, lib) for lib in libs}
    for rep in range(repeats):  # interleaved: repeat r of every library, then r + 1
        st = copy.copy(prep.settings)
        st.seed = rep
        for lib, cell in cells.items():
            if cell.error:
                continue
            before = quiet()
            watch = ChildCpuWatch()
            label = f"  {prep.wl.name:5s} run {rep + 1}/{repeats} {lib:9s}"
            try:
                S, t = run_isolated(lib, prep.path, st, threads)
            except Exception as e:  # a failing peer is recorded, not fatal
                cell.error = f"{type(e).__name__}: {e}"[:300]
                print(f"{label} FAILED: {cell.error}", flush=True)
                continue
            cell.others.append(max(before, watch.others()))
            cell.runs_s.append(t["total"])
            cell.mem_gb.append(t["mem_gb"])
            for k, v in t.items():
                cell.phases.setdefault(k, []).append(v)
            cell.agreement.append(per_query_pearson(S, prep.reference))
            cell.scale.append(lsq_scale(S, prep.reference))
            if rep < 2:
                cell.scores.append(S)
            busy = cell.others[-1] > BUSY_LIMIT
            print(
                f"{label} {t['total']:8.2f}s  mem {t['mem_gb']:5.2f} GB  "
                f"r(ref) {cell.agreement[-1]:.4f}"
                + (f"  (busy: others used {cell.others[-1]:.2f} cores)" if busy else ""),
                flush=True,
            )
    return cells


def summarize(prep: Prepared, cells: dict[str, Cell]) -> tuple[list[dict], list[dict]]:
    """The JSON rows (fixed keys) and per-cell details; adds pairwise agreement to info."""
    name = prep.wl.name
    ref_name = f"{prep.info['reference']} (lam={prep.settings.damping:.4g})"
    dt_cell = cells.get("datatrace")
    dt_med = dt_cell.median() if dt_cell else None
    dt_S = dt_cell.scores[0] if dt_cell and dt_cell.scores else None
    done = [c for c in cells.values() if c.scores]
    prep.info["pairwise_seed0"] = {
        f"{a.library}~{b.library}": per_query_pearson(a.scores[0], b.scores[0])
        for i, a in enumerate(done)
        for b in done[i + 1 :]
    }
    rows, details = [], []
    for lib, c in cells.items():
        med = c.median()
        vs_dt = None
        if c.scores and dt_S is not None:
            vs_dt = 1.0 if lib == "datatrace" else per_query_pearson(c.scores[0], dt_S)
        note = [c.error] if c.error else []
        if any(x != x for x in c.agreement):
            note.append("non-finite scores")
        busy = sum(o > BUSY_LIMIT for o in c.others)
        if busy:
            note.append(f"{busy}/{len(c.others)} runs disturbed by other processes")
        rows.append(
            {
                "workload": name,
                "method": "trak",
                "library": lib,
                "seconds": med,
                "peak_mem_gb": statistics.median(c.mem_gb) if c.mem_gb else None,
                "agreement": statistics.fmean(c.agreement) if c.agreement else None,
                "agreement_with": ref_name,
                "note": "; ".join(note),
            }
        )
        details.append(
            {
                "workload": name,
                "library": lib,
                "api": API[lib],
                "ratio": med / dt_med if med is not None and dt_med else None,
                "runs_s": c.runs_s,
                "phases_s": c.phases,
                "mem_gb": c.mem_gb,
                "others_cores": c.others,
                "agreement_per_seed": c.agreement,
                "scale_per_seed": c.scale,
                "agreement_with_datatrace_seed0": vs_dt,
                "seed0_vs_seed1": (
                    per_query_pearson(c.scores[0], c.scores[1]) if len(c.scores) > 1 else None
                ),
            }
        )
    return rows, details


def _fmt(x: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}s}" if x is None or x != x else f"{x:{width}{spec}}"


def print_table(rows: list[dict], details: list[dict], preps: list[Prepared]) -> None:
    hdr = (
        f"{'workload':8s} {'library':9s} {'API':14s} {'median s':>9s} {'ratio':>6s} "
        f"{'mem GB':>7s} {'r(ref)':>7s} {'scale':>6s} {'r(dt)':>7s} {'r(seed)':>7s}  note"
    )
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r, x in zip(rows, details, strict=True):
        scale = statistics.fmean(x["scale_per_seed"]) if x["scale_per_seed"] else None
        vs_dt = x["agreement_with_datatrace_seed0"]
        vs_dt_s = "ref" if r["library"] == "datatrace" and vs_dt else _fmt(vs_dt, ".4f", 7)
        print(
            f"{r['workload']:8s} {r['library']:9s} {x['api']:14s} {_fmt(r['seconds'], '.2f', 9)} "
            f"{_fmt(x['ratio'], '.2f', 6)} {_fmt(r['peak_mem_gb'], '.2f', 7)} "
            f"{_fmt(r['agreement'], '.4f', 7)} {_fmt(scale, '.3f', 6)} {vs_dt_s:>7s} "
            f"{_fmt(x['seed0_vs_seed1'], '.4f', 7)}  {r['note']}"
        )
    print(
        "\nratio = peer median / datatrace median (> 1: datatrace is faster). mem GB = peak RSS "
        "above the worker's level after its warm-up.\n"
        "r(ref) = mean per-query Pearson with the unprojected float64 reference at the same "
        "damping (mean over the repeats' projection seeds);\n"
        "scale = least-squares slope against it; r(dt) = the same Pearson with datatrace's "
        "scores (seed 0); r(seed) = seed 0 vs seed 1 of the same library."
    )
    for p in preps:
        pairs = p.info.get("pairwise_seed0", {})
        print(
            f"{p.wl.name}: pairwise (seed 0) " + ", ".join(f"{k} {v:.4f}" for k, v in pairs.items())
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, k=128, 1 repeat (<1 min)")
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed runs per cell (default 3; quick 1)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--workloads", default="small,cnn", help="comma-separated: small,cnn")
    ap.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated subset")
    ap.add_argument("--proj-dim", type=int, default=None, help="k (default 512; quick 128)")
    ap.add_argument(
        "--damping", type=float, default=None, help="lam, datatrace's convention (default lam0)"
    )
    ap.add_argument("--batch-size", type=int, default=500, help="examples per batch, every library")
    ap.add_argument(
        "--dt-reference",
        action="store_true",
        help="also datatrace's unprojected float64 TRAK on every parameter of 'small' (slow)",
    )
    ap.add_argument(
        "--max-wait",
        type=float,
        default=30.0,
        help="before each timed run, wait up to S s (default 30) for other processes to idle",
    )
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker_main(json.loads(args.worker))

    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    proj_dim = args.proj_dim or (128 if args.quick else 512)
    libs = [x for x in args.libraries.split(",") if x]
    for lib in libs:
        if lib not in LIBRARIES:
            ap.error(f"unknown library {lib!r}; choose from {', '.join(LIBRARIES)}")
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.damping is not None and args.damping <= 0:
        ap.error("--damping must be > 0 (the unprojected reference needs a ridge)")
    bench_tracin._max_wait = args.max_wait
    warnings.filterwarnings("ignore", category=UserWarning)

    import datatrace as dt

    versions = {"datatrace": dt.__version__}
    for lib, module in (("traker", "trak"), ("dattri", "dattri")):
        try:
            __import__(module)
            versions[lib] = importlib.metadata.version(lib)
        except Exception as e:  # a missing peer is reported (and its runs fail), not fatal
            versions[lib] = f"unavailable: {e}"
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        "datatrace_src": _src_state(dt),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "dtype": "float32 (reference float64)",
        "proj_dim": proj_dim,
        "batch_size": args.batch_size,
        "repeats": repeats,
        "quick": args.quick,
    }
    print("environment:", json.dumps(env), flush=True)

    t_start = time.perf_counter()
    tmpdir = tempfile.mkdtemp(prefix="bench-trak-")
    try:
        preps = []
        for wl in build_workloads(args.workloads.split(","), args.quick):
            if proj_dim >= len(wl.train[1]):
                ap.error(f"--proj-dim {proj_dim} must be < n_train = {len(wl.train[1])}")
            preps.append(prepare(wl, tmpdir, args, proj_dim))
        print(f"prepared in {time.perf_counter() - t_start:.0f}s (untimed)", flush=True)
        rows, details = [], []
        for prep in preps:
            r, d = summarize(prep, run_cells(prep, libs, repeats, args.threads))
            rows += r
            details += d
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    print_table(rows, details, preps)
    total_s = time.perf_counter() - t_start
    print(f"total {total_s:.0f}s")
    if args.json:
        out = {
            "environment": env,
            "rows": rows,
            "details": details,
            "workloads": {p.wl.name: p.info for p in preps},
            "total_seconds": total_s,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
