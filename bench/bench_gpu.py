"""GPU anchor benchmark (issue 6): exact Grad-Dot of a ResNet-9-style CNN on CUDA.

Workload (the issue's anchor): synthetic 3×32×32 inputs, a ResNet-9-style CNN with
1.65M parameters (channels 32-64-128-256, batch norm in eval mode), Grad-Dot of 5,000
training × 500 query examples at one checkpoint, every parameter, float32, no projection.

It measures, in one process on one GPU:

* the matmul rate (float32 IEEE, TF32, bfloat16; an 8192² GEMM) and one plain
  forward+backward pass's throughput (examples/s): the hardware anchors;
* datatrace ``dt.GradDot()``: fit (training features into GPU memory) + attribute, and
  the scoring part's FLOP rate (``2·n_q·n_train·p`` over the time of the query × training
  matmuls), in float32, with TF32 scoring, and with bfloat16 features;
* peers where installed: captum ``TracInCP`` (final checkpoint, summed loss), dattri
  ``TracInAttributor`` (no projection, weight 1), and a plain ``vmap(grad)`` loop;
* exactness: every score matrix against datatrace's float32 one (Pearson, max relative
  error), and datatrace float32 against a float64 run on a 200 × 20 subset.

captum's ``sample_wise_grads_per_batch`` hooks only Linear and Conv2d layers: its scores
leave out the batch-norm parameters' terms (checked on a small ResNet-9: Pearson 0.99999999
with datatrace restricted to the non-batch-norm parameters, 0.997 with all of them), so
its row is not the same quantity; it is timed as the issue's anchor timed it.

Target (issue 6, H100): datatrace ≤ 0.25 s (4× captum's 0.99 s), scoring ≥ 50% of the
measured float32 matmul rate.

Run (GPU machine; ``--quick`` runs a tiny version anywhere, also on the CPU):

    python bench/bench_gpu.py --json bench/results_gpu.json
    python bench/bench_gpu.py --quick --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import datatrace as dt


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class ResNet9(nn.Module):
    """ResNet-9 (Page's DAWNBench layout) with base width w: 1.65M parameters at w = 32."""

    def __init__(self, w: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            conv_bn(3, w),
            conv_bn(w, 2 * w, pool=True),
            Residual(2 * w),
            conv_bn(2 * w, 4 * w, pool=True),
            conv_bn(4 * w, 8 * w, pool=True),
            Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * w, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` runs after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def matmul_rates(device: torch.device, n: int, repeats: int) -> dict[str, float]:
    """TFLOP/s of an n × n GEMM in float32 (IEEE), TF32 and bfloat16."""
    out = {}
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    for name, dtype, precision in (
        ("fp32", torch.float32, "ieee"),
        ("tf32", torch.float32, "tf32"),
        ("bf16", torch.bfloat16, "ieee"),
    ):
        if name == "tf32" and device.type != "cuda":
            continue
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        matmul.fp32_precision = precision
        try:
            t, _ = timed(lambda a=a, b=b: a @ b, device, repeats)
        finally:
            matmul.fp32_precision = old
        out[name] = 2 * n**3 / t / 1e12
    return out


def forward_backward_rate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, repeats: int
) -> float:
    """Examples/s of one plain forward+backward pass (mean loss, eval mode)."""
    device = x.device
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for s in range(0, len(x), batch):
            model.zero_grad(set_to_none=True)
            loss_fn(model(x[s : s + batch]), y[s : s + batch]).backward()

    t, _ = timed(run, device, repeats)
    return len(x) / t


def vmap_loop(
    model: nn.Module, train: tuple, queries: tuple, batch: int
) -> Callable[[], torch.Tensor]:
    """The plain baseline: ``vmap(grad)`` per-example gradients, query gradients held,
    training gradients block by block, one matmul per block."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x[None],))
        return nn.functional.cross_entropy(out, y[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))

    def flat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = per_example(params, x, y)
        return torch.cat([v.flatten(1) for v in g.values()], dim=1)

    def run() -> torch.Tensor:
        q = torch.cat(
            [flat(queries[0][s : s + batch], queries[1][s : s + batch])
             for s in range(0, len(queries[0]), batch)]
        )  # fmt: skip
        cols = [
            q @ flat(train[0][s : s + batch], train[1][s : s + batch]).T
            for s in range(0, len(train[0]), batch)
        ]
        return torch.cat(cols, dim=1)

    return run


def datatrace_run(
    model: nn.Module, train: tuple, queries: tuple, batch: int, **spec: Any
) -> tuple[Callable[[], torch.Tensor], Callable[[], dict[str, float]]]:
    """(fit + attribute, a split timing of one run: fit / query features / scoring)."""
    task = dt.ClassificationTask(model)
    ckpt = [dt.Checkpoint.from_module(model)]
    method = dt.GradientAttributor(dt.FeatureSpec(**spec), all_checkpoints=False, name="GradDot")
    kw = dict(batch_size=batch, block_size=len(train[0]), progress=False, max_memory_bytes=80 << 30)

    def run() -> torch.Tensor:
        return method.fit(task, ckpt, train, **kw).attribute(queries)

    def split() -> dict[str, float]:
        device = queries[0].device
        sync(device)
        t0 = time.perf_counter()
        fitted = method.fit(task, ckpt, train, **kw)
        sync(device)
        t1 = time.perf_counter()
        q = fitted.query_features(queries)
        sync(device)
        t2 = time.perf_counter()
        g = fitted._train_block(0, 0, fitted.n_train)
        sync(device)
        t3 = time.perf_counter()
        with fitted.features.scoring():
            fitted.features.pairwise(q[0], g)
        sync(device)
        t4 = time.perf_counter()
        return {"fit": t1 - t0, "query_features": t2 - t1, "read": t3 - t2, "scoring": t4 - t3}

    return run, split


def captum_run(model: nn.Module, train: tuple, queries: tuple, batch: int) -> Callable:
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    def run() -> torch.Tensor:
        tracin = TracInCP(
            model,
            TensorDataset(*train),
            checkpoints=["final"],
            checkpoints_load_func=lambda m, path: 1.0,  # the model as it is, weight 1
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=batch,
            sample_wise_grads_per_batch=True,
        )
        return tracin.influence(queries)

    return run


def dattri_run(model: nn.Module, train: tuple, queries: tuple, batch: int) -> Callable:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    def loss(params: dict, data: tuple) -> torch.Tensor:
        x, y = data
        out = functional_call(model, params, (x[None] if x.dim() == 3 else x,))
        return nn.functional.cross_entropy(out, y.reshape(-1))

    def run() -> torch.Tensor:
        task = AttributionTask(loss_func=loss, model=model, checkpoints=[model.state_dict()])
        attr = TracInAttributor(task=task, weight_list=torch.ones(1), normalized_grad=False)
        attr.projector_kwargs = None  # dattri 0.3.0 projects unless this is None
        train_loader = DataLoader(TensorDataset(*train), batch_size=batch)
        test_loader = DataLoader(TensorDataset(*queries), batch_size=len(queries[0]))
        return attr.attribute(train_loader, test_loader).T

    return run


def agreement(a: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    a, ref = a.double().flatten().cpu(), ref.double().flatten().cpu()
    r = torch.corrcoef(torch.stack([a, ref]))[0, 1]
    return {
        "pearson": float(r),
        "max_rel_err": float((a - ref).abs().max() / ref.abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-query", type=int, default=500)
    ap.add_argument("--width", type=int, default=32, help="ResNet-9 base width (32: 1.65M)")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--libraries", default="datatrace,captum,dattri,vmap")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_query, args.width, args.batch_size, args.repeats = 64, 8, 4, 32, 1
    from datatrace.distributed import resolve_device

    device = resolve_device(args.device)
    libs = set(args.libraries.split(","))
    torch.manual_seed(0)
    model = ResNet9(args.width).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.n_train + args.n_query, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (len(x),), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for s in range(0, args.n_train, args.batch_size):  # one epoch: a checkpoint, not init
        opt.zero_grad()
        nn.functional.cross_entropy(
            model(x[s : s + args.batch_size]), y[s : s + args.batch_size]
        ).backward()
        opt.step()
    model.eval()
    train = (x[: args.n_train], y[: args.n_train])
    queries = (x[args.n_train :], y[args.n_train :])
    res: dict[str, Any] = {
        "workload": {
            "model": f"ResNet-9 width {args.width}",
            "params": n_params,
            "n_train": args.n_train,
            "n_query": args.n_query,
            "batch_size": args.batch_size,
        },
        "environment": {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
    }
    print(f"ResNet-9 w={args.width}: {n_params:,} parameters on {res['environment']['device']}")
    res["matmul_tflops"] = matmul_rates(device, 512 if args.quick else 8192, args.repeats)
    res["forward_backward_per_s"] = forward_backward_rate(
        model, *train, args.batch_size, args.repeats
    )
    print(
        f"matmul TFLOP/s {res['matmul_tflops']}; fwd+bwd {res['forward_backward_per_s']:,.0f} ex/s"
    )

    rows, results = [], {}
    cases: list[tuple[str, str, Callable[[], torch.Tensor]]] = []
    splits = {}
    if "datatrace" in libs:
        for label, spec in (
            ("float32", {}),
            ("tf32 scoring", {"tf32": True}),
            ("bf16 features", {"feature_dtype": torch.bfloat16}),
        ):
            run, split = datatrace_run(model, train, queries, args.batch_size, **spec)
            cases.append(("datatrace", label, run))
            splits[label] = split
    if "captum" in libs:
        cases.append(("captum", "TracInCP", captum_run(model, train, queries, args.batch_size)))
    if "dattri" in libs:
        cases.append(("dattri", "TracIn", dattri_run(model, train, queries, args.batch_size)))
    if "vmap" in libs:
        cases.append(("vmap loop", "vmap(grad)", vmap_loop(model, train, queries, args.batch_size)))
    for lib, label, run in cases:
        try:
            t, S = timed(run, device, args.repeats)
        except Exception as exc:  # a peer that cannot run is reported, not fatal
            rows.append(
                {"library": lib, "variant": label, "seconds": None, "note": repr(exc)[:300]}
            )
            print(f"{lib:10s} {label:14s} failed: {exc!r}"[:300])
            continue
        results[(lib, label)] = S
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            run()
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            peak = None
        rows.append(
            {"library": lib, "variant": label, "seconds": t, "peak_gpu_gb": peak, "note": ""}
        )
    ref = results.get(("datatrace", "float32"))
    base = next((r["seconds"] for r in rows if r["variant"] == "float32"), None)
    for r in rows:
        S = results.get((r["library"], r["variant"]))
        if S is not None and ref is not None:
            r.update(agreement(S, ref))
        if r["seconds"] and base:
            r["ratio_vs_datatrace"] = r["seconds"] / base
    flops = 2 * args.n_query * args.n_train * n_params
    for label, split in splits.items():
        parts = split()
        tflops = flops / parts["scoring"] / 1e12
        key = "tf32" if label.startswith("tf32") else "fp32"
        res.setdefault("datatrace_split", {})[label] = {
            **parts,
            "scoring_tflops": tflops,
            "fraction_of_matmul_rate": tflops / res["matmul_tflops"].get(key, float("nan")),
        }
    if "datatrace" in libs:  # float32 vs float64 on a subset: exact scores
        m64 = ResNet9(args.width).to(device).double()
        m64.load_state_dict(model.state_dict())
        m64.eval()
        sub, subq = (
            (train[0][:200].double(), train[1][:200]),
            (queries[0][:20].double(), queries[1][:20]),
        )
        s64 = (
            dt.GradDot()
            .fit(dt.ClassificationTask(m64), [dt.Checkpoint.from_module(m64)], sub, progress=False)
            .attribute(subq)
        )
        s32 = (
            dt.GradDot()
            .fit(
                dt.ClassificationTask(model),
                [dt.Checkpoint.from_module(model)],
                (sub[0].float(), sub[1]),
                progress=False,
            )
            .attribute((subq[0].float(), subq[1]))
        )
        res["float32_vs_float64"] = agreement(s32, s64)
    res["rows"] = rows
    print(
        f"\n{'library':10s} {'variant':14s} {'seconds':>9s} {'vs dt':>7s} {'GPU GB':>7s} {'pearson':>9s} {'max rel err':>11s}"
    )
    for r in rows:
        if r["seconds"] is None:
            print(f"{r['library']:10s} {r['variant']:14s} failed: {r['note'][:60]}")
            continue
        peak = f"{r['peak_gpu_gb']:.2f}" if r.get("peak_gpu_gb") is not None else "-"
        print(
            f"{r['library']:10s} {r['variant']:14s} {r['seconds']:9.3f} "
            f"{r.get('ratio_vs_datatrace', float('nan')):7.2f} {peak:>7s} "
            f"{r.get('pearson', float('nan')):9.6f} {r.get('max_rel_err', float('nan')):11.2e}"
        )
    for label, parts in res.get("datatrace_split", {}).items():
        print(
            f"datatrace {label}: fit {parts['fit']:.3f} s, queries {parts['query_features']:.3f} s, "
            f"scoring {parts['scoring']:.4f} s = {parts['scoring_tflops']:.1f} TFLOP/s "
            f"({100 * parts['fraction_of_matmul_rate']:.0f}% of the matmul rate)"
        )
    if "float32_vs_float64" in res:
        print(f"datatrace float32 vs float64 (200 x 20): {res['float32_vs_float64']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
