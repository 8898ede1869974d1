#!/usr/bin/env python
"""Scale run: TracIn with a 1,024-dimensional random projection on 100,000 training examples.

Usage::

    python bench/bench_scale.py [--n-train 100000] [--n-query 1000] [--dim 1024] [--json F]
        [--libraries datatrace,dattri,captum,traker] [--peer-train 5000] [--peer-query 100]
        [--peer-method graddot|tracin] [--peer-full captum] [--repeats 3] [--max-wait 120]
    python bench/bench_scale.py --quick      # --n-train 5000 --peer-train 1000 --dense-n 200,
                                             # --repeats 1 --max-wait 10 (~2-3 min)

Workload: synthetic inputs (64 features, 10 classes, seeded), an MLP 64-512-512-10 (301k
parameters), 2 checkpoints, float32, 2 threads. Each measurement runs in a fresh process
so that its peak resident memory is its own (``VmHWM`` of /proc/self/status, which starts
afresh at exec; not ``ru_maxrss``, which Linux carries over from the parent at the spawn):

* ``plain``: one forward + backward pass over the training set in batches (the cost of
  one epoch of training without the optimizer step), per checkpoint: the reference the
  featurization throughput is compared with.
* ``featurize``: ``dt.TracIn(projection_dim=dim).fit(..., store=DIR)`` (per-example
  gradients through the hooked layers, Kronecker-structured projection, written to the
  on-disk store), then ``top_k(queries, k=10)`` streamed over training blocks.
* ``dense``: the same with ``kronecker=False`` (every per-example gradient formed, then
  projected by a dense Gaussian matrix), on a ``--dense-n`` (2,000) slice (it is slower),
  to show what the factored projection saves.

Targets of the scale issue: featurization within 2x of ``plain``; peak RSS under 4 GB.

Peers (``--libraries``), side by side on the same model, data, checkpoints and projection
dimension. Method ``--peer-method graddot`` (default: the final checkpoint, weight 1) or
``tracin`` (both checkpoints, weighted 0.1 and 0.05). Each library featurizes the first
``--peer-train`` training examples and scores the first ``--peer-query`` queries (the full
``(queries, train)`` matrix), in its own fresh process; the time is measured on that prefix
and extrapolated linearly to ``--n-train`` (labelled as such). datatrace runs the same on the
prefix and on the full set (features in memory). Settings of each peer:

* dattri 0.3.0 ``TracInAttributor(task, weight_list, normalized_grad=False,
  projector_kwargs={"proj_dim": dim, "proj_max_batch_size": 32, "proj_seed": 0,
  "device": "cpu"})``: every parameter; its CPU projector (``BasicProjector``, Gaussian,
  scaled by 1/sqrt(k)) regenerates the dense 301k x 100 matrix block by block for every
  training batch and again for the queries at every training batch. Loss: the cross-entropy
  of one example (functional_call). Result (train, queries), transposed.
* captum 0.9.0 ``TracInCPFastRandProj(model, final_fc_layer=model[4], ...,
  loss_fn=CrossEntropyLoss(reduction="sum"), projection_dim=dim, seed=0)`` (needs
  ``annoy``): by design it uses only the last Linear layer's weight gradient (bias excluded),
  projected as ``(P_e e) (P_a a)^T`` with ``min(sqrt(k), 10) x min(sqrt(k), 512)`` = 10 x 32 =
  320 dimensions per checkpoint for k = 1,024. Time = constructor (featurization and the
  Annoy index) + ``influence(queries, k=None)``. Its agreement is also given (in the note)
  against exact Grad-Dot of that weight alone.
* traker 0.3.2 ``TRAKer(model, "image_classification", device="cpu",
  use_half_precision=False, proj_dim=dim)``: featurization only (``load_checkpoint`` +
  ``featurize``: per-example gradients of the margin, projected by its Gaussian
  ``BasicProjector``, plus the out-to-loss term ``1 - p``). Not a Grad-Dot method; for the
  agreement only (untimed), the queries are featurized too and converted to projected
  loss-gradient inner products: for cross-entropy ``grad loss = -(1 - p) grad margin``, so
  ``S[j, i] = sum_c w_c (1 - p_j)(1 - p_i) <phi_j, phi_i> * grad_dim / k`` (its features
  are divided by sqrt(grad_dim) and its CPU projection matrix is N(0, 1), unscaled).

Timing: every measurement runs ``--repeats`` times (once when the first run takes
``--slow-threshold`` s or more), each in a fresh process, and the median is reported. Before
each run the script waits up to ``--max-wait`` s for other processes to use < 0.25 cores;
a run during which they used more is marked CONTENDED in its note (``busy`` in the table).

Agreement: mean over queries of the Pearson correlation of each library's score row with
exact (unprojected) scores of the same method from datatrace (``dt.GradDot()``, or
``dt.TracIn()`` for ``--peer-method tracin``), over the same training examples.

The JSON gets a ``rows`` list (workload, method, library, seconds, n_train,
extrapolated_seconds_full, peak_mem_gb, agreement, agreement_with, note).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("TQDM_DISABLE", "1")  # peers' progress bars

WEIGHTS = (0.1, 0.05)  # checkpoint weights (learning rates) of the TracIn workload
PEERS = ("dattri", "captum", "traker")


def peak_rss_gb() -> float:
    """This process's peak resident memory, in GB (10^6 kB).

    ``VmHWM`` belongs to the process's own address space, so it starts afresh at exec;
    ``ru_maxrss`` does not (Linux keeps the parent's resident size at vfork+exec), so a
    worker's ``ru_maxrss`` is never below the parent's memory."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    w = torch.randn(64, 10, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    return x, y


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def state_dicts() -> list[tuple[dict[str, torch.Tensor], float]]:
    """The two checkpoints (state dict, weight), exactly as ``worker`` builds them."""
    m = model()
    out = [({k: v.detach().clone() for k, v in m.state_dict().items()}, WEIGHTS[0])]
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)
    out.append(({k: v.detach().clone() for k, v in m.state_dict().items()}, WEIGHTS[1]))
    return out


def worker(args: argparse.Namespace) -> dict:
    import datatrace as dt

    torch.set_num_threads(args.threads)
    x, y = data(args.n_train, 0)
    xq, yq = data(args.n_query, 1)
    m = model()
    ckpts = [dt.Checkpoint.from_module(m, weight=WEIGHTS[0])]
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)
    ckpts.append(dt.Checkpoint.from_module(m, weight=WEIGHTS[1]))
    out: dict = {"mode": args.worker, "n_train": args.n_train}
    t0 = time.perf_counter()
    if args.worker == "plain":
        loss_fn = nn.CrossEntropyLoss()
        for ck in ckpts:
            m.load_state_dict(ck.state)
            for s in range(0, len(x), args.batch_size):
                m.zero_grad(set_to_none=True)
                loss_fn(m(x[s : s + args.batch_size]), y[s : s + args.batch_size]).backward()
        out["seconds"] = time.perf_counter() - t0
    else:
        kron = args.worker != "dense"
        spec = dt.FeatureSpec(
            projection_dim=args.dim, kronecker=None if kron else False, kronecker_block=args.block
        )
        method = dt.GradientAttributor(spec, normalize=False, all_checkpoints=True, name="TracIn")
        task = dt.ClassificationTask(m)
        with tempfile.TemporaryDirectory() as store:
            fitted = method.fit(
                task, ckpts, (x, y), store=store, batch_size=args.batch_size, progress=False
            )
            out["featurize_seconds"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            vals, _ = fitted.top_k((xq, yq), k=10)
            out["top_k_seconds"] = time.perf_counter() - t1
            out["store_mb"] = fitted.store.nbytes() / 1e6 if fitted.store is not None else 0
            out["checksum"] = float(vals.double().sum())
        out["seconds"] = out["featurize_seconds"]
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# ----------------------------------------------------------------------------------------
# Peer comparison workers: featurize args.prefix training examples (of the n_train set) at
# the method's checkpoints, score args.peer_query queries; save S (queries, prefix).


def _peer_setup(args: argparse.Namespace) -> tuple:
    torch.set_num_threads(args.threads)
    x, y = data(args.n_train, 0)  # the prefix of the full set (labels depend on n_train)
    x, y = x[: args.prefix].contiguous(), y[: args.prefix].contiguous()
    xq, yq = data(args.n_query, 1)
    xq, yq = xq[: args.peer_query].contiguous(), yq[: args.peer_query].contiguous()
    cks = state_dicts()
    if args.peer_method == "graddot":
        cks = [(cks[-1][0], 1.0)]
    return x, y, xq, yq, cks


def _dt_method(dt, args: argparse.Namespace, projected: bool, params=None):
    spec = dt.FeatureSpec(
        params=params,
        projection_dim=args.dim if projected else None,
        kronecker_block=args.block,
    )
    tracin = args.peer_method == "tracin"
    return dt.GradientAttributor(
        spec, normalize=False, all_checkpoints=tracin, name="TracIn" if tracin else "GradDot"
    )


def run_ref(args: argparse.Namespace) -> tuple[dict, dict]:
    """Exact (unprojected) scores of the method, every parameter and the last weight only."""
    import datatrace as dt

    x, y, xq, yq, cks = _peer_setup(args)
    m = model()
    ckpts = [dt.Checkpoint.from_state_dict(sd, weight=w) for sd, w in cks]
    task = dt.ClassificationTask(m)
    t0 = time.perf_counter()
    full = _dt_method(dt, args, False).fit(task, ckpts, (x, y), batch_size=args.batch_size)
    S = full.attribute((xq, yq))
    del full
    last = _dt_method(dt, args, False, ("4.weight",)).fit(
        task, ckpts, (x, y), batch_size=args.batch_size
    )
    S_last = last.attribute((xq, yq))
    return {"seconds": time.perf_counter() - t0}, {"S": S, "S_last": S_last}


def run_datatrace(args: argparse.Namespace) -> tuple[dict, dict]:
    import datatrace as dt

    x, y, xq, yq, cks = _peer_setup(args)
    m = model()
    ckpts = [dt.Checkpoint.from_state_dict(sd, weight=w) for sd, w in cks]
    t0 = time.perf_counter()
    task = dt.ClassificationTask(m)
    fitted = _dt_method(dt, args, True).fit(
        task, ckpts, (x, y), batch_size=args.batch_size, progress=False
    )
    t1 = time.perf_counter()
    S = fitted.attribute((xq, yq))
    t2 = time.perf_counter()
    info = {"seconds": t2 - t0, "featurize_seconds": t1 - t0, "score_seconds": t2 - t1}
    info["in_memory"] = fitted.store is not None and fitted.store.__class__.__name__.startswith(
        "Memory"
    )
    return info, {"S": S}


def run_dattri(args: argparse.Namespace) -> tuple[dict, dict]:
    import torch.nn.functional as F
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    x, y, xq, yq, cks = _peer_setup(args)
    m = model()
    m.eval()

    def loss_func(params: dict[str, torch.Tensor], batch: tuple) -> torch.Tensor:
        xi, yi = batch  # one example: dattri vmaps over the batch
        logits = torch.func.functional_call(m, params, (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    train_loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False)
    # dattri recomputes (and re-projects) every query gradient for every training batch:
    # one query batch keeps that to one vmap call per training batch.
    test_loader = DataLoader(TensorDataset(xq, yq), batch_size=len(yq), shuffle=False)
    proj = {"proj_dim": args.dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
    t0 = time.perf_counter()
    task = AttributionTask(loss_func=loss_func, model=m, checkpoints=[sd for sd, _ in cks])
    att = TracInAttributor(
        task=task,
        weight_list=torch.tensor([w for _, w in cks]),
        normalized_grad=False,
        projector_kwargs=proj,
        device="cpu",
    )
    assert att.projector_kwargs is not None and att.projector_kwargs["proj_dim"] == args.dim
    S = att.attribute(train_loader, test_loader).T.contiguous()  # (train, test) -> (test, train)
    info = {"seconds": time.perf_counter() - t0, "projector_kwargs": dict(att.projector_kwargs)}
    return info, {"S": S}


def run_captum(args: argparse.Namespace) -> tuple[dict, dict]:
    try:
        import annoy  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"annoy not installable/importable: {exc}") from exc
    from captum.influence import TracInCPFastRandProj
    from torch.utils.data import DataLoader, TensorDataset

    x, y, xq, yq, cks = _peer_setup(args)
    m = model()
    m.eval()
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, (sd, w) in enumerate(cks):  # checkpoint files: not timed
            paths.append(str(Path(d) / f"ckpt{i}.pt"))
            torch.save({"state_dict": sd, "lr": w}, paths[-1])

        def load(model_: nn.Module, path: str) -> float:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            model_.load_state_dict(ck["state_dict"])
            return float(ck["lr"])  # captum weights the checkpoint's scores by this

        loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False)
        t0 = time.perf_counter()
        tracin = TracInCPFastRandProj(
            m,
            m[4],
            loader,
            checkpoints=paths,
            checkpoints_load_func=load,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=args.batch_size,
            projection_dim=args.dim,
            seed=0,
        )
        t1 = time.perf_counter()
        S = tracin.influence((xq, yq), k=None)  # (test, train), positive = proponent
        t2 = time.perf_counter()
    pq = tracin.projection_quantities
    info = {
        "seconds": t2 - t0,
        "featurize_seconds": t1 - t0,
        "score_seconds": t2 - t1,
        "dims_per_checkpoint": (pq[0].shape[1] * pq[1].shape[1]) if pq is not None else None,
    }
    return info, {"S": S.detach()}


def run_traker(args: argparse.Namespace) -> tuple[dict, dict]:
    import logging

    import numpy as np
    from trak import TRAKer

    x, y, xq, yq, cks = _peer_setup(args)
    m = model()
    m.eval()
    n, nq, bs = len(y), len(yq), args.batch_size
    S = torch.zeros(nq, n, dtype=torch.float64)
    timed = 0.0
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        tr = TRAKer(
            model=m,
            task="image_classification",
            train_set_size=n + nq,  # the queries go after the training set (untimed)
            save_dir=d,
            device="cpu",
            use_half_precision=False,
            proj_dim=args.dim,
            logging_level=logging.ERROR,
        )
        timed += time.perf_counter() - t0
        for c, (sd, w) in enumerate(cks):
            t0 = time.perf_counter()
            tr.load_checkpoint(sd, model_id=c)
            for s in range(0, n, bs):
                tr.featurize((x[s : s + bs], y[s : s + bs]), num_samples=len(y[s : s + bs]))
            timed += time.perf_counter() - t0
            for s in range(0, nq, bs):  # untimed: queries, for the agreement only
                tr.featurize((xq[s : s + bs], yq[s : s + bs]), num_samples=len(yq[s : s + bs]))
            store = tr.saver.current_store
            phi = torch.from_numpy(np.array(store["grads"], dtype=np.float64))
            otl = torch.from_numpy(np.array(store["out_to_loss"], dtype=np.float64)).reshape(-1)
            # projected loss gradient = -(1 - p) * P^T grad margin; traker divided the
            # features by sqrt(grad_dim) (tr.normalize_factor) and its CPU projector is not
            # scaled (P ~ N(0, 1)): / sqrt(k) makes E[S] the exact inner product
            g = phi * otl[:, None] * (float(tr.normalize_factor) / args.dim**0.5)
            S += w * (g[n:] @ g[:n].T)
    info = {"seconds": timed, "featurize_seconds": timed, "grad_dim": tr.num_params_for_grad}
    return info, {"S": S.float()}


PEER_RUNNERS = {
    "ref": run_ref,
    "datatrace": run_datatrace,
    "dattri": run_dattri,
    "captum": run_captum,
    "traker": run_traker,
}


def peer_worker(args: argparse.Namespace) -> dict:
    info, mats = PEER_RUNNERS[args.worker.removeprefix("peer-")](args)
    torch.save(mats, args.out)
    out = {"mode": args.worker, "n_train": args.prefix, **info}
    out["peak_rss_gb"] = peak_rss_gb()
    return out


# ----------------------------------------------------------------------------------------


def mean_pearson(S: torch.Tensor, R: torch.Tensor) -> float:
    """Mean over queries (rows) of the Pearson correlation of S with R."""
    a = S.double() - S.double().mean(1, keepdim=True)
    b = R.double() - R.double().mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return float(r.mean())


BUSY_LIMIT = 0.25  # CPU cores used by other processes above which a run counts as contended
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / _HZ  # user nice system irq softirq steal


def _own_s() -> float:
    t = os.times()  # this process and its finished children (the workers)
    return t.user + t.system + t.children_user + t.children_system


def other_cores(since: tuple[float, float, float]) -> float:
    """CPU cores other processes used since ``since`` = (wall, busy, own)."""
    wall = time.perf_counter() - since[0]
    other = (_busy_s() - since[1]) - (_own_s() - since[2])
    return max(0.0, other) / wall if wall > 0 else 0.0


def _mark() -> tuple[float, float, float]:
    return time.perf_counter(), _busy_s(), _own_s()


def wait_quiet(max_wait: float) -> float:
    """Wait up to ``max_wait`` s until other processes use < BUSY_LIMIT cores; return the
    last 1-second measurement."""
    t_end = time.perf_counter() + max_wait
    while True:
        m = _mark()
        time.sleep(1.0)
        load = other_cores(m)
        if load < BUSY_LIMIT or time.perf_counter() >= t_end:
            return load


def run_worker(
    args: argparse.Namespace, mode: str, n: int, extra: list[str], timeout: float | None = None
) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--n-train", str(n),
           "--n-query", str(args.n_query), "--dim", str(args.dim),
           "--batch-size", str(args.batch_size), "--block", str(args.block),
           "--threads", str(args.threads), *extra]  # fmt: skip
    before = wait_quiet(args.max_wait)
    m = _mark()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    during = other_cores(m)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{mode} exited {proc.returncode}: {' | '.join(tail)}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["other_cores_before"] = round(before, 2)
    out["other_cores_during"] = round(during, 2)
    return out


def run_repeated(
    args: argparse.Namespace,
    mode: str,
    n: int,
    extra: list[str],
    timeout: float | None = None,
    repeats: int = 1,
) -> dict:
    """``run_worker`` ``repeats`` times (once if the first run takes >= --slow-threshold s;
    up to 2 x ``repeats`` while every run was contended, when ``repeats`` > 1); the median run (by ``seconds``)
    of the uncontended runs if any, else of all, with every run's seconds and the largest
    peak RSS."""

    def quiet() -> list[dict]:
        return [r for r in runs if r["other_cores_during"] <= BUSY_LIMIT]

    runs = [run_worker(args, mode, n, extra, timeout)]
    while runs[0]["seconds"] < args.slow_threshold and (
        len(runs) < repeats or (repeats > 1 and not quiet() and len(runs) < 2 * repeats)
    ):
        runs.append(run_worker(args, mode, n, extra, timeout))
    pool = quiet() or runs
    out = dict(sorted(pool, key=lambda r: r["seconds"])[(len(pool) - 1) // 2])
    out["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    out["quiet_runs"] = len(quiet())
    out["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
    return out


def repeats_note(res: dict) -> str:
    t = res.get("all_seconds", [])
    if len(t) < 2:
        return ""
    q = res.get("quiet_runs", len(t))
    which = f"the {q} uncontended of " if 0 < q < len(t) else ""
    return f"median of {which}{len(t)} runs {t}"


def contention(res: dict) -> str:
    c = res.get("other_cores_during", 0.0)
    if c > BUSY_LIMIT:
        return (
            f"CONTENDED: {c:.1f} cores busy outside this run on average (other processes, or "
            "kernel memory management such as DAMON/balloon, which memory-heavy runs trigger)"
        )
    return ""


def workload_name(n: int) -> str:
    return f"scale-{n // 1000}k" if n % 1000 == 0 else f"scale-{n}"


def peers(args: argparse.Namespace, libraries: list[str], results: dict) -> list[dict]:
    """Run the prefix comparison; return the rows (datatrace's full TracIn row excluded)."""
    n_full, prefix = args.n_train, min(args.peer_train, args.n_train)
    method = f"{args.peer_method}-proj{args.dim}"
    wl = workload_name(n_full)
    exact = "TracIn" if args.peer_method == "tracin" else "Grad-Dot"
    ref_name = f"exact {exact} (datatrace dt.{exact.replace('-', '')}(), no projection)"
    rows: list[dict] = []
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    common = ["--peer-method", args.peer_method, "--peer-query", str(args.peer_query)]

    def run(lib: str, n: int) -> tuple[dict | None, dict | None, str]:
        path = os.path.join(tmp, f"{lib}-{n}.pt")
        extra = [*common, "--prefix", str(n), "--out", path]
        reps = 1 if lib == "ref" else args.repeats
        try:
            res = run_repeated(args, f"peer-{lib}", n_full, extra, args.peer_timeout, reps)
        except subprocess.TimeoutExpired:
            return None, None, f"timed out after {args.peer_timeout:.0f} s"
        except Exception as exc:  # a peer failing is a result, not a crash of the suite
            return None, None, f"failed: {exc}"
        mats = torch.load(path, weights_only=True)
        os.remove(path)
        return res, mats, ""

    full_peers = [lib for lib in args.peer_full.split(",") if lib in PEERS and lib in libraries]
    ref_n = n_full if "datatrace" in libraries or full_peers else prefix
    ref, ref_m, err = run("ref", ref_n)
    results["peer-ref"] = ref if ref is not None else {"error": err}
    print("peer-ref", results["peer-ref"], flush=True)

    def agreement(S: torch.Tensor | None, key: str = "S") -> float | None:
        if ref_m is None or S is None:
            return None
        return mean_pearson(S, ref_m[key][:, : S.shape[1]])

    runs: list[tuple[str, int]] = []
    if "datatrace" in libraries:
        runs.append(("datatrace", n_full))
        if prefix < n_full:
            runs.append(("datatrace", prefix))
    for lib in PEERS:
        if lib in libraries:
            runs.append((lib, prefix))
            if lib in full_peers and prefix < n_full:
                runs.append((lib, n_full))
    for lib, n in runs:
        res, mats, err = run(lib, n)
        key = f"peer-{lib}" + ("-full" if n == n_full else "")
        results[key] = res if res is not None else {"error": err}
        print(key, results[key], flush=True)
        S = mats["S"] if mats is not None else None
        row = {
            "workload": wl,
            "method": method,
            "library": lib,
            "seconds": res["seconds"] if res else None,
            "n_train": n,
            "extrapolated_seconds_full": (
                res["seconds"] * n_full / n if res and n < n_full else None
            ),
            "peak_mem_gb": res["peak_rss_gb"] if res else None,
            "agreement": agreement(S),
            "agreement_with": f"{ref_name}, mean per-query Pearson over {args.peer_query} "
            f"queries x the same {n:,} training examples",
            "note": "",
        }
        notes = []
        if err:
            notes.append(err)
        elif res is not None:
            rate = n / res["seconds"]
            ext = " (measured)" if n == n_full else f"; extrapolated linearly to {n_full:,}"
            if lib == "datatrace":
                notes.append(
                    f"fit {res['featurize_seconds']:.2f} s (features in "
                    f"{'memory' if res['in_memory'] else 'a temporary store'}, Kronecker "
                    f"projection m={args.block}) + attribute {res['score_seconds']:.2f} s; "
                    f"{rate:,.0f} train ex/s overall{ext}"
                )
            elif lib == "dattri":
                notes.append(
                    f"TracInAttributor, projector_kwargs={res['projector_kwargs']} (CPU "
                    "BasicProjector, dense Gaussian, every parameter); featurize and score "
                    f"interleaved; {rate:,.0f} train ex/s{ext}"
                )
            elif lib == "captum":
                notes.append(
                    "TracInCPFastRandProj: last Linear weight only (bias and other layers "
                    f"ignored), {res['dims_per_checkpoint']} projected dims per checkpoint for "
                    f"projection_dim={args.dim}; constructor (featurize + Annoy index) "
                    f"{res['featurize_seconds']:.2f} s + influence(k=None) "
                    f"{res['score_seconds']:.2f} s; {rate:,.0f} train ex/s{ext}; agreement "
                    f"with exact Grad-Dot of that weight alone: "
                    f"{agreement(S, 'S_last'):.4f}"
                )
            elif lib == "traker":
                notes.append(
                    "TRAKer featurize only (load_checkpoint + featurize: projected margin "
                    "gradients + out-to-loss), no finalize/score; "
                    f"{rate:,.0f} train ex/s{ext}; agreement from its features converted to "
                    "projected loss-gradient inner products (untimed query featurization)"
                )
        if res is not None:
            notes += [t for t in (repeats_note(res), contention(res)) if t]
        row["note"] = "; ".join(notes)
        rows.append(row)
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def print_rows(rows: list[dict]) -> None:
    print()
    hdr = ("library", "method", "n_train", "seconds", "ex/s", "extrap. full s", "peak GB",
           "agreement", "busy")  # fmt: skip
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    for r in rows:
        rate = r["n_train"] / r["seconds"] if r["seconds"] else None
        cells = (r["library"], r["method"], f"{r['n_train']:,}", f(r["seconds"], ".2f"),
                 f(rate, ",.0f"), f(r["extrapolated_seconds_full"], ",.1f"),
                 f(r["peak_mem_gb"], ".2f"), f(r["agreement"], ".4f"),
                 "yes" if "CONTENDED" in r["note"] else "")  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        print(f"- {r['library']} {r['method']} n={r['n_train']:,}: {r['note']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", "--n", type=int, default=100_000)
    ap.add_argument("--n-query", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--dense-n", type=int, default=2_000)
    ap.add_argument("--block", type=int, default=4, help="kronecker_block m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--libraries",
        default="datatrace,dattri,captum,traker",
        help="comma-separated subset of datatrace,dattri,captum,traker (datatrace: the "
        "plain/featurize/dense runs and its prefix/full rows)",
    )
    ap.add_argument(
        "--peer-train",
        type=int,
        default=5_000,
        help="training examples (a prefix of the set) each peer featurizes and scores",
    )
    ap.add_argument(
        "--peer-full",
        default="",
        help="comma-separated peers to also run on the full training set (measured, not "
        "extrapolated; e.g. captum, which is fast because it uses the last layer only)",
    )
    ap.add_argument("--peer-query", type=int, default=100, help="queries scored by each peer")
    ap.add_argument("--peer-method", choices=("graddot", "tracin"), default="graddot")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="fresh-process runs per measurement, median reported (runs whose first try "
        "takes >= --slow-threshold s run once)",
    )
    ap.add_argument("--slow-threshold", type=float, default=30.0)
    ap.add_argument(
        "--max-wait",
        type=float,
        default=120,
        help="before each run, wait up to S seconds until other processes use < 0.25 cores",
    )
    ap.add_argument("--peer-timeout", type=float, default=1800, help="seconds per peer run")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: defaults --n-train 5000 --peer-train 1000 --dense-n 200 "
        "--repeats 1 --max-wait 10",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prefix", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker.startswith("peer-"):
            print(json.dumps(peer_worker(args)))
        else:
            print(json.dumps(worker(args)))
        return
    if args.quick:  # smaller defaults; values given explicitly win
        for name, value in (("n_train", 5_000), ("peer_train", 1_000), ("dense_n", 200),
                            ("repeats", 1), ("max_wait", 10.0)):  # fmt: skip
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    unknown = set(libraries) - {"datatrace", *PEERS}
    if unknown:
        ap.error(f"unknown libraries {sorted(unknown)}")
    results: dict = {}
    rows: list[dict] = []
    ratio = dense_ratio = None
    if "datatrace" in libraries:
        for mode, n in (("plain", args.n_train), ("featurize", args.n_train), ("dense", args.dense_n),
                        ("featurize-small", args.dense_n)):  # fmt: skip
            results[mode] = run_repeated(args, mode.split("-")[0], n, [], None, args.repeats)
            print(mode, results[mode], flush=True)
        plain, feat = results["plain"], results["featurize"]
        ratio = feat["featurize_seconds"] / plain["seconds"]
        dense_ratio = (
            results["dense"]["featurize_seconds"] / results["featurize-small"]["featurize_seconds"]
        )
        print()
        print(
            f"{args.n_train:,} training examples, MLP 64-512-512-10 (301k parameters), 2 checkpoints, k = {args.dim}"
        )
        print(
            f"plain forward+backward over the data, per checkpoint x 2: {plain['seconds']:.2f} s ({2 * args.n_train / plain['seconds']:,.0f} examples/s)"
        )
        print(
            f"datatrace featurize (per-example grads, Kronecker projection, on-disk store): {feat['featurize_seconds']:.2f} s = {ratio:.2f}x plain [target <= 2x: {'MET' if ratio <= 2 else 'MISSED'}]"
        )
        print(
            f"top-10 of {args.n_query:,} queries over the store: {feat['top_k_seconds']:.2f} s; store {feat['store_mb']:.0f} MB"
        )
        print(
            f"peak RSS: featurize+score {feat['peak_rss_gb']:.2f} GB [target < 4 GB: {'MET' if feat['peak_rss_gb'] < 4 else 'MISSED'}]; plain {plain['peak_rss_gb']:.2f} GB"
        )
        print(
            f"dense projection (every gradient formed) on {args.dense_n:,}: {results['dense']['featurize_seconds']:.2f} s vs Kronecker {results['featurize-small']['featurize_seconds']:.2f} s ({dense_ratio:.1f}x)"
        )
        rows.append(
            {
                "workload": workload_name(args.n_train),
                "method": f"tracin-proj{args.dim}",
                "library": "datatrace",
                "seconds": feat["featurize_seconds"] + feat["top_k_seconds"],
                "n_train": args.n_train,
                "extrapolated_seconds_full": None,
                "peak_mem_gb": feat["peak_rss_gb"],
                "agreement": None,
                "agreement_with": "none: no exact TracIn reference at this size "
                f"(agreement is measured on the {args.peer_method} rows)",
                "note": (
                    f"TracIn over 2 checkpoints: fit into the on-disk store "
                    f"{feat['featurize_seconds']:.2f} s ({ratio:.2f}x plain forward+backward "
                    f"{plain['seconds']:.2f} s; {args.n_train / feat['featurize_seconds']:,.0f} "
                    f"train ex/s) + top-10 of {args.n_query:,} queries "
                    f"{feat['top_k_seconds']:.2f} s"
                    + "".join(
                        f"; {k}: {t}"
                        for k, r in (("featurize", feat), ("plain", plain))
                        for t in (repeats_note(r), contention(r))
                        if t
                    )
                ),
            }
        )
    if any(lib in libraries for lib in ("datatrace", *PEERS)):
        print(
            f"\npeers: {args.peer_method}, k = {args.dim}, {args.peer_query} queries, prefix "
            f"{min(args.peer_train, args.n_train):,} of {args.n_train:,} training examples",
            flush=True,
        )
        rows += peers(args, libraries, results)
    print_rows(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results, "featurize_vs_plain": ratio,
                       "dense_vs_kronecker": dense_ratio, "rows": rows}, fh, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
