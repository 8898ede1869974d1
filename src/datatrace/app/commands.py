"""``datatrace featurize`` and ``datatrace score``: the attribution of an experiment config
(the model, data and queries of ``datatrace evaluate``'s TOML) from the command line, into a
feature store that ``torchrun`` ranks fill together.

    datatrace featurize CONFIG.toml --store DIR [--method tracin] [--projection-dim K]
    datatrace score CONFIG.toml --store DIR [--top-k 10] [--matrix S.npy] [--out top.csv]

Both run unchanged under ``torchrun --nproc_per_node=N`` (and across machines with
``--nnodes``, a rendezvous endpoint and a store directory on a filesystem every machine
mounts): the training set's chunks are split across the ranks, the full matrix's blocks
too, and the results equal a single process's.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..core import distributed
from ..core.errors import ConfigError
from ..methods.engine import FittedGradientAttributor
from .config import load_config
from .experiment import build_experiment
from .registry import REGISTRY, MethodOptions, entry


def _fit(args: Any) -> tuple[FittedGradientAttributor, Any, float]:
    cfg = load_config(args.config)
    name = args.method
    method_entry = entry(name)  # before any training: an unknown name fails at once
    feature_dtype = None if args.feature_dtype is None else getattr(torch, args.feature_dtype)
    options = MethodOptions.from_config(cfg["methods"])
    if method_entry.first_order:
        options = replace(
            options, projection_dim=args.projection_dim, feature_dtype=feature_dtype, tf32=args.tf32
        )
    elif args.projection_dim is not None or feature_dtype is not None or args.tf32:
        first = ", ".join(n for n, e in REGISTRY.items() if e.first_order)
        raise ConfigError(f"--projection-dim, --feature-dtype and --tf32 apply to {first} only")
    method = method_entry.build(options)
    device = distributed.resolve_device(args.device)
    exp = build_experiment(cfg)
    exp.task.model.to(device)
    ckpts = exp.checkpoints if method_entry.trajectory else exp.checkpoints[-1:]
    t0 = time.perf_counter()
    fitted = method.fit(
        exp.task, ckpts, exp.train, store=args.store, batch_size=args.batch_size, progress=None
    )
    return fitted, exp, time.perf_counter() - t0


def featurize_main(args: Any) -> int:
    fitted, _, seconds = _fit(args)
    if distributed.world()[0] == 0:
        print(
            f"features of {fitted.n_train} training examples in {args.store} "
            f"({seconds:.2f} s, {distributed.world()[1]} process(es))",
            file=sys.stderr,
        )
    return 0


def score_main(args: Any) -> int:
    fitted, exp, _ = _fit(args)
    rank = distributed.world()[0]
    if args.matrix is not None:
        path = fitted.attribute_to_file(exp.queries, args.matrix)
        if rank == 0:
            print(
                f"wrote the {len(exp.queries[0])} x {fitted.n_train} scores to {path}",
                file=sys.stderr,
            )
    values, indices = fitted.top_k(exp.queries, k=args.top_k, opponents=args.opponents)
    if rank != 0:
        return 0
    rows = [
        {"query": j, "rank": r + 1, "train_index": int(indices[j, r]), "score": float(values[j, r])}
        for j in range(values.shape[0])
        for r in range(values.shape[1])
    ]
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["query", "rank", "train_index", "score"])
            w.writeheader()
            w.writerows(rows)
        print(
            f"wrote top-{args.top_k} {'opponents' if args.opponents else 'proponents'} to {out}",
            file=sys.stderr,
        )
    else:
        for j in range(min(values.shape[0], 5)):
            best = ", ".join(
                f"{int(i)} ({float(v):+.3g})" for v, i in zip(values[j], indices[j], strict=True)
            )
            print(f"query {j}: {best}")
    return 0
