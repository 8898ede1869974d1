#!/usr/bin/env python
"""TracIn and Grad-Dot, exact: datatrace vs captum ``TracInCP`` and dattri ``TracInAttributor``.

    python bench/bench_tracin.py [--quick] [--repeats N] [--workloads small,large]
    python bench/bench_tracin.py --workloads resnet9 --device cuda \\
        --libraries datatrace,datatrace-tf32,datatrace-bf16,captum,dattri,vmap   # GPU anchor

Every library scores the same model, data and checkpoints exactly (float32, every
parameter); agreement is the Pearson correlation with datatrace's matrix (FAIL below 0.999;
the tf32/bf16 variants and captum on ResNet-9, which leaves out batch norm, are not the
same quantity). Workloads, timing and peer settings: bench/README.md.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from typing import Any

import harness
import torch
from peers import captum_peer, dattri_peer
from torch import nn
from workloads import (
    Workload,
    augmented_digits_workload,
    batches,
    resnet9_workload,
    small_mlp_workload,
)

import datatrace as dt

PEARSON_MIN = 0.999
ROW_WORKLOAD = {"small": "digits-mlp", "large": "digits-cnn", "resnet9": "resnet9"}
DATATRACE = {
    "datatrace": {},
    "datatrace-tf32": {"tf32": True},
    "datatrace-bf16": {"feature_dtype": torch.bfloat16},
}
API = {("datatrace", "TracIn"): "dt.TracIn", ("datatrace", "GradDot"): "dt.GradDot",
       ("captum", "TracIn"): "TracInCP", ("captum", "GradDot"): "TracInCP(last, lr=1)",
       ("dattri", "TracIn"): "TracInAttributor", ("dattri", "GradDot"): "TracInAttributor(last, w=1)",
       ("vmap", "GradDot"): "vmap(grad) + matmul per block"}  # fmt: skip


def tracin_workload(name: str, quick: bool, device: torch.device) -> Workload:
    if name == "small":
        return small_mlp_workload()
    if name == "large":
        return augmented_digits_workload(2_000, 200) if quick else augmented_digits_workload()
    if name == "resnet9":  # 1.65M parameters, 5,000 x 500 (quick: width 4, 64 x 8)
        return (
            resnet9_workload(64, 8, 4, device)
            if quick
            else resnet9_workload(5_000, 500, 32, device)
        )
    raise ValueError(f"unknown workload {name!r} (choose from small, large, resnet9)")


def selected(wl: Workload, method: str) -> list[tuple[dict, float]]:
    """TracIn: every checkpoint weighted by its learning rate; Grad-Dot: the last, weight 1."""
    return wl.ckpts if method == "TracIn" else [(wl.ckpts[-1][0], 1.0)]


def vmap_loop(model: nn.Module, train: tuple, test: tuple, batch: int) -> torch.Tensor:
    """The plain baseline: ``vmap(grad)`` per-example gradients, query gradients held,
    training gradients block by block, one matmul per block (Grad-Dot)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            torch.func.functional_call(model, (p, buffers), (x[None],)), y[None]
        )

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    flat = lambda x, y: torch.cat([v.flatten(1) for v in per_example(params, x, y).values()], 1)  # noqa: E731
    q = torch.cat([flat(x, y) for x, y in batches(test, batch)])
    return torch.cat([q @ flat(x, y).T for x, y in batches(train, batch)], dim=1)


def tracin_run(lib: str, wl: Workload, method: str, bs: int, files: dict) -> tuple:
    """(S, times): datatrace's fit + attribute (also apart); a peer's whole API call."""
    device = wl.train[0].device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model = copy.deepcopy(wl.model)
    if lib in DATATRACE:
        ckpts = [dt.Checkpoint.from_state_dict(sd, weight=lr) for sd, lr in wl.ckpts]
        attributor = (dt.TracIn if method == "TracIn" else dt.GradDot)(**DATATRACE[lib])
        big = (
            {"block_size": wl.n_train, "max_memory_bytes": 80 << 30}
            if device.type == "cuda"
            else {}
        )
        S, t, fitted = harness.fit_attribute(attributor, dt.ClassificationTask(model), ckpts, wl.train,
                                             wl.test, batch_size=bs, sync=sync, **big)  # fmt: skip
        del fitted  # removes the temporary feature store (not timed)
        return S, t
    clock = harness.Clock(sync)
    if lib == "captum":
        S = captum_peer.tracincp(model, wl.train, wl.test, files[wl.name, method], batch_size=bs)
    elif lib == "dattri":
        S = dattri_peer.tracin(model, selected(wl, method), wl.train, wl.test, bs)
    else:
        S = vmap_loop(model, wl.train, wl.test, bs)
    return S, clock.lap()


def tracin_row(c: harness.Cell, ref: harness.Cell) -> dict[str, Any]:
    """Pearson of the first run's scores with datatrace's (the scores are deterministic)."""
    same = bool(c.scores and ref.scores) and c.scores[0].shape == ref.scores[0].shape
    r = harness.pearson(c.scores[0], ref.scores[0]) if same else float("nan")
    r = 1.0 if c is ref and same else r
    gpu = {"peak_gpu_gb": max(c.runs["peak_gpu_gb"])} if "peak_gpu_gb" in c.runs else {}
    return harness.row(
        workload=ROW_WORKLOAD[c.workload], method=c.method.lower(), library=c.library,
        seconds=c.median(), peak_mem_gb=max(c.runs["peak_mem_gb"]) if c.runs else None,
        agreement=r, agreement_with="datatrace float32 (same definition, Pearson of S)",
        note="; ".join(([c.error] if c.error else []) + ([] if r > PEARSON_MIN else ["FAIL"])),
        api=API.get((c.library, c.method), c.library), **gpu,
        rel_err=harness.max_rel_err(c.scores[0], ref.scores[0]) if same else None,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = harness.arg_parser(__doc__, "datatrace,captum,dattri")
    ap.add_argument(
        "--workloads", default="small,large", help="comma-separated: small,large,resnet9"
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = harness.parse_args(ap, argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    libs = ["datatrace"] + [x for x in harness.libraries(ap, args.libraries, [*DATATRACE, "captum", "dattri", "vmap"])
                            if x != "datatrace"]  # fmt: skip
    device = torch.device(args.device)
    env = harness.environment(("captum", "dattri"), dtype="float32", batch_size=args.batch_size,
                              repeats=args.repeats, quick=args.quick, device=str(device))  # fmt: skip
    workloads = {n: tracin_workload(n, args.quick, device) for n in args.workloads.split(",")}
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="bench-tracin-") as tmp:
        files = {(wl.name, m): captum_peer.save_checkpoints(selected(wl, m), tmp, f"{wl.name}-{m}")
                 for wl in workloads.values() for m in ("TracIn", "GradDot")}  # fmt: skip
        for wl in workloads.values():  # one workload, one method at a time
            print("workload", wl.describe(), flush=True)
            for method in ("TracIn", "GradDot") if len(wl.ckpts) > 1 else ("GradDot",):
                cells = [harness.Cell(wl.name, method, lib) for lib in libs
                         if lib != "vmap" or method == "GradDot"]  # fmt: skip
                warm = wl.subset(min(256, wl.n_train), min(32, wl.n_test))
                for c in cells:  # lazy init, imports, vmap/hook set-up, allocator
                    tracin_run(c.library, warm, method, args.batch_size, files)

                def run(c: harness.Cell, _: int) -> tuple:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    S, t = tracin_run(c.library, wl, c.method, args.batch_size, files)
                    gpu = (
                        {"peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9}
                        if device.type == "cuda"
                        else {}
                    )
                    return S.cpu(), {**t, **gpu}

                harness.time_cells(cells, args.repeats, harness.in_process(args.max_wait, run))
                rows += [tracin_row(c, cells[0]) for c in cells]
                records += [c.record() for c in cells]
    if failed := [r for r in rows if "FAIL" in r["note"]]:
        print(f"\nFAIL: {len(failed)} cell(s) below Pearson {PEARSON_MIN} vs datatrace")
    harness.print_rows(rows)
    harness.write_json(args.json, {"environment": env, "pearson_min": PEARSON_MIN, "cells": records, "rows": rows,
                                   "workloads": [wl.describe() for wl in workloads.values()]})  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
