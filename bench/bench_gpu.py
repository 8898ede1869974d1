"""GPU anchor benchmark (issue 6): exact Grad-Dot of a ResNet-9-style CNN on CUDA.

    python bench/bench_gpu.py --json bench/results_gpu.json   # a GPU machine (gpu_check.sh)
    python bench/bench_gpu.py --quick --device cpu            # a tiny version anywhere

What it measures and the target: bench/README.md (GPU).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from collections.abc import Callable, Iterator
from typing import Any

import harness
import torch
from peers import captum_peer, dattri_peer
from torch import nn
from torch.func import functional_call, grad, vmap
from workloads import batches, resnet9

import datatrace as dt


def clock(device: torch.device) -> harness.Clock:
    """A clock that waits for the device's queued work before every reading."""
    return harness.Clock(lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` runs after one warm-up, and the last result."""
    out, times = fn(), []
    for _ in range(repeats):
        c = clock(device)
        out = fn()
        times.append(c.lap()["total"])
    return sorted(times)[len(times) // 2], out


def matmul_rates(device: torch.device, n: int, repeats: int) -> dict[str, float]:
    """TFLOP/s of an n × n GEMM in float32 (IEEE), TF32 and bfloat16."""
    out, matmul = {}, torch.backends.cuda.matmul
    old = matmul.fp32_precision
    for name, dtype, precision in (("fp32", torch.float32, "ieee"), ("tf32", torch.float32, "tf32"),
                                   ("bf16", torch.bfloat16, "ieee")):  # fmt: skip
        if name == "tf32" and device.type != "cuda":
            continue
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        matmul.fp32_precision = precision
        try:
            out[name] = 2 * n**3 / timed(lambda a=a, b=b: a @ b, device, repeats)[0] / 1e12
        finally:
            matmul.fp32_precision = old
    return out


def sgd_pass(model: nn.Module, data: tuple, batch: int, opt: Any = None) -> None:
    """One forward+backward pass over ``data`` (mean loss), an SGD step per batch if ``opt``."""
    for x, y in batches(data, batch):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        if opt is not None:
            opt.step()


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

    def flat(data: tuple) -> Iterator[torch.Tensor]:
        for x, y in batches(data, batch):
            yield torch.cat([v.flatten(1) for v in per_example(params, x, y).values()], dim=1)

    def run() -> torch.Tensor:
        q = torch.cat(list(flat(queries)))
        return torch.cat([q @ g.T for g in flat(train)], dim=1)

    return run


def datatrace_run(model: nn.Module, train: tuple, queries: tuple, batch: int, **spec: Any) -> tuple:
    """(fit + attribute, a split timing of one run: fit / query features / read / scoring)."""
    task, ckpt = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    last = dt.CheckpointWeights.LAST
    method = dt.GradientAttributor(dt.FeatureSpec(**spec), checkpoints=last, name="GradDot")
    kw = dict(batch_size=batch, block_size=len(train[0]), progress=False, max_memory_bytes=80 << 30)
    device = queries[0].device

    def split() -> dict[str, float]:
        c = clock(device)
        fitted = method.fit(task, ckpt, train, **kw)
        c.lap("fit")
        q = fitted.query_features(queries)
        c.lap("query_features")
        g = fitted._train_block(0, 0, fitted.n_train)
        c.lap("read")
        with fitted.features.scoring():
            fitted.features.pairwise(q[0], g)
        return c.lap("scoring")

    return lambda: method.fit(task, ckpt, train, **kw).attribute(queries), split


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
    return {"pearson": harness.pearson(a, ref), "max_rel_err": harness.max_rel_err(a, ref)}


def time_cases(runs: list, device: torch.device, repeats: int) -> list[dict]:
    rows, results = [], {}
    for lib, label, run in runs:
        r: dict[str, Any] = {"library": lib, "variant": label, "seconds": None, "note": ""}
        rows.append(r)
        try:
            r["seconds"], results[lib, label] = timed(run, device, repeats)
        except Exception as exc:  # a peer that cannot run is reported, not fatal
            r["note"] = repr(exc)[:300]
            print(f"{lib:10s} {label:14s} failed: {exc!r}"[:300])
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            run()
            r["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    ref = results.get(("datatrace", "float32"))
    base = next((r["seconds"] for r in rows if r["variant"] == "float32"), None)
    for r in rows:
        if (S := results.get((r["library"], r["variant"]))) is not None and ref is not None:
            r.update(exactness(S, ref))
        if r["seconds"] and base:
            r["ratio_vs_datatrace"] = r["seconds"] / base
    return rows


def float64_check(model: nn.Module, train: tuple, queries: tuple, width: int) -> dict[str, float]:
    """datatrace float32 vs float64 on a 200 × 20 subset: exact scores either way."""
    m64 = resnet9(width).to(train[0].device).double()
    m64.load_state_dict(model.state_dict())
    m64.eval()
    sub, subq = (train[0][:200], train[1][:200]), (queries[0][:20], queries[1][:20])

    def grad_dot(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        fitted = dt.GradDot().fit(dt.ClassificationTask(m), [dt.Checkpoint.from_module(m)],
                                  (sub[0].to(dtype), sub[1]), progress=False)  # fmt: skip
        return fitted.attribute((subq[0].to(dtype), subq[1]))

    return exactness(grad_dot(model, torch.float32), grad_dot(m64, torch.float64))


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
    ap = harness.arg_parser(__doc__, "datatrace,captum,dattri,vmap", repeats=5)
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-query", type=int, default=500)
    ap.add_argument("--width", type=int, default=32, help="ResNet-9 base width (32: 1.65M)")
    args = harness.parse_args(ap, argv)
    if args.quick:
        args.n_train, args.n_query, args.width, args.batch_size, args.repeats = 64, 8, 4, 32, 1
    from internals import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(0)  # ResNet-9 after one epoch of SGD on synthetic data: a checkpoint
    model = resnet9(args.width).to(device)
    x = torch.randn(args.n_train + args.n_query, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (len(x),), device=device)
    train, queries = (x[: args.n_train], y[: args.n_train]), (x[args.n_train :], y[args.n_train :])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sgd_pass(model, train, args.batch_size, opt)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    res: dict[str, Any] = {
        "workload": {"model": f"ResNet-9 width {args.width}", "params": n_params, "n_train": args.n_train,
                     "n_query": args.n_query, "batch_size": args.batch_size},
        "environment": {"device": name, "torch": torch.__version__, "python": sys.version.split()[0]},
    }  # fmt: skip
    print(f"ResNet-9 w={args.width}: {n_params:,} parameters on {name}")
    res["matmul_tflops"] = matmul_rates(device, 512 if args.quick else 8192, args.repeats)
    fwd_bwd = timed(lambda: sgd_pass(model, train, args.batch_size), device, args.repeats)[0]
    res["forward_backward_per_s"] = args.n_train / fwd_bwd
    print(f"matmul TFLOP/s {res['matmul_tflops']}; fwd+bwd {res['forward_backward_per_s']:,.0f} ex/s")  # fmt: skip
    runs, splits = cases(model, train, queries, args)
    res["rows"] = time_cases(runs, device, args.repeats)
    flops = 2 * args.n_query * args.n_train * n_params
    for label, split in splits.items():
        parts = split()
        tflops = flops / parts["scoring"] / 1e12
        rate = res["matmul_tflops"].get("tf32" if label.startswith("tf32") else "fp32", math.nan)
        res.setdefault("datatrace_split", {})[label] = {**parts, "scoring_tflops": tflops,
                                                        "fraction_of_matmul_rate": tflops / rate}  # fmt: skip
    if "datatrace" in args.libraries.split(","):
        res["float32_vs_float64"] = float64_check(model, train, queries, args.width)
    print_gpu_table(res)
    harness.write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
