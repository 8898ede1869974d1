"""GPU anchor benchmark (issue 6): exact Grad-Dot of a ResNet-9-style CNN on CUDA.

    python bench/bench_gpu.py --json bench/results_gpu.json   # a GPU machine (gpu_check.sh)
    python bench/bench_gpu.py --quick --device cpu            # a tiny version anywhere

What it measures and the target: bench/README.md (GPU).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import harness
import torch
from agreement import max_rel_err, pearson
from peers import captum_peer, dattri_peer
from torch import nn
from torch.func import functional_call, grad, vmap
from workloads import ResNet9

import datatrace as dt


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
    for name, dtype, precision in (("fp32", torch.float32, "ieee"), ("tf32", torch.float32, "tf32"),
                                   ("bf16", torch.bfloat16, "ieee")):  # fmt: skip
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


def forward_backward_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                          repeats: int) -> float:  # fmt: skip
    """Examples/s of one plain forward+backward pass (mean loss, eval mode)."""

    def run() -> None:
        for s in range(0, len(x), batch):
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[s : s + batch]), y[s : s + batch]).backward()

    return len(x) / timed(run, x.device, repeats)[0]


def vmap_loop(model: nn.Module, train: tuple, queries: tuple, batch: int) -> Callable:
    """The plain baseline: ``vmap(grad)`` per-example gradients, query gradients held,
    training gradients block by block, one matmul per block."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            functional_call(model, (p, buffers), (x[None],)), y[None]
        )

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))

    def flat(data: tuple, s: int) -> torch.Tensor:
        g = per_example(params, data[0][s : s + batch], data[1][s : s + batch])
        return torch.cat([v.flatten(1) for v in g.values()], dim=1)

    def run() -> torch.Tensor:
        q = torch.cat([flat(queries, s) for s in range(0, len(queries[0]), batch)])
        return torch.cat([q @ flat(train, s).T for s in range(0, len(train[0]), batch)], dim=1)

    return run


def datatrace_run(model: nn.Module, train: tuple, queries: tuple, batch: int, **spec: Any) -> tuple:
    """(fit + attribute, a split timing of one run: fit / query features / read / scoring)."""
    task, ckpt = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    last = dt.CheckpointWeights.LAST
    method = dt.GradientAttributor(dt.FeatureSpec(**spec), checkpoints=last, name="GradDot")
    kw = dict(batch_size=batch, block_size=len(train[0]), progress=False, max_memory_bytes=80 << 30)

    def run() -> torch.Tensor:
        return method.fit(task, ckpt, train, **kw).attribute(queries)

    def split() -> dict[str, float]:
        device = queries[0].device
        sync(device)
        marks = [time.perf_counter()]

        def mark() -> None:
            sync(device)
            marks.append(time.perf_counter())

        fitted = method.fit(task, ckpt, train, **kw)
        mark()
        q = fitted.query_features(queries)
        mark()
        g = fitted._train_block(0, 0, fitted.n_train)
        mark()
        with fitted.features.scoring():
            fitted.features.pairwise(q[0], g)
        mark()
        d = [b - a for a, b in itertools.pairwise(marks)]
        return {"fit": d[0], "query_features": d[1], "read": d[2], "scoring": d[3]}

    return run, split


def cases(model: nn.Module, train: tuple, queries: tuple, args: argparse.Namespace) -> tuple:
    """[(library, variant, run)] for ``--libraries``, and datatrace's split timers."""
    libs, bs = set(args.libraries.split(",")), args.batch_size
    out, splits = [], {}
    if "datatrace" in libs:
        for label, spec in (("float32", {}), ("tf32 scoring", {"tf32": True}),
                            ("bf16 features", {"feature_dtype": torch.bfloat16})):  # fmt: skip
            run, splits[label] = datatrace_run(model, train, queries, bs, **spec)
            out.append(("datatrace", label, run))
    if "captum" in libs:  # the model as it is, weight 1
        out.append(("captum", "TracInCP", lambda: captum_peer.tracincp(
            model, train, queries, ["final"], lambda m, path: 1.0, batch_size=bs)))  # fmt: skip
    if "dattri" in libs:
        out.append(("dattri", "TracIn", lambda: dattri_peer.tracin(
            model, [model.state_dict()], [1.0], train, queries, bs)))  # fmt: skip
    if "vmap" in libs:
        out.append(("vmap loop", "vmap(grad)", vmap_loop(model, train, queries, bs)))
    return out, splits


def exactness(a: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"pearson": pearson(a, ref), "max_rel_err": max_rel_err(a, ref)}


def time_cases(runs: list, device: torch.device, repeats: int) -> tuple[list[dict], dict]:
    rows, results = [], {}
    for lib, label, run in runs:
        try:
            t, results[lib, label] = timed(run, device, repeats)
        except Exception as exc:  # a peer that cannot run is reported, not fatal
            rows.append(
                {"library": lib, "variant": label, "seconds": None, "note": repr(exc)[:300]}
            )
            print(f"{lib:10s} {label:14s} failed: {exc!r}"[:300])
            continue
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            run()
            peak = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(
            {"library": lib, "variant": label, "seconds": t, "peak_gpu_gb": peak, "note": ""}
        )
    ref = results.get(("datatrace", "float32"))
    base = next((r["seconds"] for r in rows if r["variant"] == "float32"), None)
    for r in rows:
        if (S := results.get((r["library"], r["variant"]))) is not None and ref is not None:
            r.update(exactness(S, ref))
        if r["seconds"] and base:
            r["ratio_vs_datatrace"] = r["seconds"] / base
    return rows, results


def float64_check(model: nn.Module, train: tuple, queries: tuple, width: int) -> dict[str, float]:
    """datatrace float32 vs float64 on a 200 × 20 subset: exact scores either way."""
    m64 = ResNet9(width).to(train[0].device).double()
    m64.load_state_dict(model.state_dict())
    m64.eval()
    sub, subq = (train[0][:200], train[1][:200]), (queries[0][:20], queries[1][:20])

    def grad_dot(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        fitted = dt.GradDot().fit(dt.ClassificationTask(m), [dt.Checkpoint.from_module(m)],
                                  (sub[0].to(dtype), sub[1]), progress=False)  # fmt: skip
        return fitted.attribute((subq[0].to(dtype), subq[1]))

    return exactness(grad_dot(model, torch.float32), grad_dot(m64, torch.float64))


def trained_resnet(args: argparse.Namespace, device: torch.device) -> tuple:
    """ResNet-9 after one epoch of SGD on synthetic data (a checkpoint, not an initialisation),
    and the data: the first ``n_train`` examples for training, the rest as queries."""
    torch.manual_seed(0)
    model = ResNet9(args.width).to(device)
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
    return model, x, y


def print_gpu_table(res: dict[str, Any]) -> None:
    fmt = harness.fmt
    for r in res["rows"]:
        print(f"{r['library']:10s} {r['variant']:14s} {fmt(r['seconds'], '9.3f')} s, "
              f"{fmt(r.get('ratio_vs_datatrace'), '6.2f')} x datatrace, GPU "
              f"{fmt(r.get('peak_gpu_gb'), '6.2f')} GB, pearson {fmt(r.get('pearson'), '9.6f')}, "
              f"max rel err {fmt(r.get('max_rel_err'), '8.1e')} {r['note'][:60]}")  # fmt: skip
    for label, parts in res.get("datatrace_split", {}).items():
        print(f"datatrace {label}: fit {parts['fit']:.3f} s, queries {parts['query_features']:.3f} s, "
              f"scoring {parts['scoring']:.4f} s = {parts['scoring_tflops']:.1f} TFLOP/s "
              f"({100 * parts['fraction_of_matmul_rate']:.0f}% of the matmul rate)")  # fmt: skip
    if "float32_vs_float64" in res:
        print(f"datatrace float32 vs float64 (200 x 20): {res['float32_vs_float64']}")


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
    from internals import resolve_device

    device = resolve_device(args.device)
    model, x, y = trained_resnet(args, device)
    train, queries = (x[: args.n_train], y[: args.n_train]), (x[args.n_train :], y[args.n_train :])
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    res: dict[str, Any] = {
        "workload": {"model": f"ResNet-9 width {args.width}", "params": n_params, "n_train": args.n_train,
                     "n_query": args.n_query, "batch_size": args.batch_size},
        "environment": {"device": name, "torch": torch.__version__, "python": sys.version.split()[0]},
    }  # fmt: skip
    print(f"ResNet-9 w={args.width}: {n_params:,} parameters on {name}")
    res["matmul_tflops"] = matmul_rates(device, 512 if args.quick else 8192, args.repeats)
    res["forward_backward_per_s"] = forward_backward_rate(
        model, *train, args.batch_size, args.repeats
    )
    print(
        f"matmul TFLOP/s {res['matmul_tflops']}; fwd+bwd {res['forward_backward_per_s']:,.0f} ex/s"
    )
    runs, splits = cases(model, train, queries, args)
    res["rows"], _ = time_cases(runs, device, args.repeats)
    flops = 2 * args.n_query * args.n_train * n_params
    for label, split in splits.items():
        parts = split()
        tflops = flops / parts["scoring"] / 1e12
        rate = res["matmul_tflops"].get(
            "tf32" if label.startswith("tf32") else "fp32", float("nan")
        )
        res.setdefault("datatrace_split", {})[label] = {**parts, "scoring_tflops": tflops,
                                                        "fraction_of_matmul_rate": tflops / rate}  # fmt: skip
    if "datatrace" in args.libraries.split(","):
        res["float32_vs_float64"] = float64_check(model, train, queries, args.width)
    print_gpu_table(res)
    harness.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
