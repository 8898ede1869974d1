"""``datatrace featurize``, ``score`` and ``report``: attribution from the command line, for
your own trained model (nothing is retrained) or an experiment config.

    datatrace score --model mypkg.models:build --checkpoints 'ckpts/*.pt' \\
        --train train.npz --queries test.npz [--method tracin] [--top-k 10] [--out top.csv]
    datatrace report --model ... --train ... --queries ... [--suspected noisy.txt] --out r.html
    datatrace featurize CONFIG.toml --store DIR [--method tracin] [--projection-dim K]

What the inputs may be: :mod:`datatrace.app.inputs`. A config (``datatrace evaluate``'s TOML)
gives the same keys (``[model] factory``, ``[data] train``...); flags override it. A config
without ``[model] factory`` is the built-in experiment: its model is trained once and cached
in the config's ``out`` folder (reused while the settings match).

``featurize`` and ``score`` run unchanged under ``torchrun --nproc_per_node=N`` (and across
machines with ``--nnodes``, a rendezvous endpoint and a store directory on a filesystem
every machine mounts): the training set's chunks are split across the ranks, the full
matrix's blocks too, and the results equal a single process's.
"""

from __future__ import annotations

import csv
import importlib
import re
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..core import distributed
from ..core.data import ExampleSource
from ..core.errors import ConfigError, DataError
from ..methods.engine import FittedGradientAttributor
from .config import SCHEMA, load_config
from .experiment import build_experiment
from .inputs import Inputs, is_function_spec, own_inputs
from .registry import REGISTRY, MethodEntry, MethodOptions, entry


def resolve_inputs(args: Any, need_queries: bool) -> Inputs:
    """The model, checkpoints and data of the command line and/or config (flags win)."""
    cfg = load_config(args.config) if args.config is not None else None
    base = Path(args.config).resolve().parent if args.config is not None else None
    m = cfg["model"] if cfg is not None else SCHEMA["model"]
    d = cfg["data"] if cfg is not None else SCHEMA["data"]

    def pick(flag: Any, key: str, section: dict[str, Any]) -> Any:
        """A flag (paths made absolute: relative to the current folder) or the config's
        value (relative to the config's folder: the loaders' ``base``)."""
        if flag is not None:
            return flag if is_function_spec(str(flag)) else str(Path(flag).absolute())
        return section[key] or None

    model = args.model or m["factory"] or None
    given = [f for f in ("train", "queries", "checkpoints", "task") if getattr(args, f)]
    if model is None:
        if given:
            raise ConfigError(
                f"--{given[0]} goes with --model 'module:function' (your model's factory)"
            )
        if cfg is None:
            raise ConfigError(
                "name your model and data (--model module:function --train DATA "
                "[--queries DATA] [--checkpoints GLOB]) or give a config TOML"
            )
        exp = build_experiment(cfg, cache=Path(cfg[""]["out"]))  # -v logs the reuse
        return Inputs(exp.task, exp.checkpoints, exp.train, exp.queries, exp.description)
    train = pick(args.train, "train", d)
    if train is None:
        raise ConfigError("--model needs --train (your training data; see datatrace --help)")
    queries = pick(args.queries, "queries", d)
    if need_queries and queries is None:
        raise ConfigError(f"datatrace {args.command} needs --queries (the examples to explain)")
    lr = args.lr if args.lr is not None else (m["lr"] or None)
    return own_inputs(
        model=model,
        train=train,
        queries=queries,
        task=args.task or m["task"] or None,
        checkpoints=pick(args.checkpoints, "checkpoints", m),
        lr=lr,
        strip_prefix=args.strip_prefix or m["strip_prefix"] or None,
        base=base,
    )


def _method(args: Any, cfg_methods: dict[str, Any] | None) -> tuple[MethodEntry, Any]:
    method_entry = entry(args.method)  # before any work: an unknown name fails at once
    feature_dtype = None if args.feature_dtype is None else getattr(torch, args.feature_dtype)
    options = MethodOptions.from_config(cfg_methods or {})
    if method_entry.first_order:
        options = replace(
            options, projection_dim=args.projection_dim, feature_dtype=feature_dtype, tf32=args.tf32
        )
    elif args.projection_dim is not None or feature_dtype is not None or args.tf32:
        first = ", ".join(n for n, e in REGISTRY.items() if e.first_order)
        raise ConfigError(f"--projection-dim, --feature-dtype and --tf32 apply to {first} only")
    return method_entry, method_entry.build(options)


def _fit(
    args: Any, need_queries: bool, inputs: Inputs | None = None
) -> tuple[FittedGradientAttributor, Inputs, float]:
    cfg_methods = load_config(args.config)["methods"] if args.config is not None else None
    method_entry, method = _method(args, cfg_methods)
    device = distributed.resolve_device(args.device)
    inputs = inputs if inputs is not None else resolve_inputs(args, need_queries)
    inputs.task.model.to(device)
    ckpts = inputs.checkpoints if method_entry.trajectory else inputs.checkpoints[-1:]
    t0 = time.perf_counter()
    fitted = method.fit(
        inputs.task,
        ckpts,
        inputs.train,
        store=args.store,
        batch_size=args.batch_size,
        progress=None,
        overwrite=args.overwrite,
    )
    return fitted, inputs, time.perf_counter() - t0


def featurize_main(args: Any) -> int:
    fitted, _, seconds = _fit(args, need_queries=False)
    if distributed.world()[0] == 0:
        print(
            f"features of {fitted.n_train} training examples in {args.store} "
            f"({seconds:.2f} s, {distributed.world()[1]} process(es))",
            file=sys.stderr,
        )
    return 0


def score_main(args: Any) -> int:
    fitted, inputs, _ = _fit(args, need_queries=True)
    rank = distributed.world()[0]
    n_query = len(ExampleSource(inputs.queries, "queries"))
    if args.matrix is not None:
        path = fitted.attribute_to_file(inputs.queries, args.matrix)
        if rank == 0:
            print(
                f"wrote the {n_query} x {fitted.n_train} scores to {path} "
                "(read them back with dt.load_scores)",
                file=sys.stderr,
            )
    values, indices = fitted.top_k(inputs.queries, k=args.top_k, opponents=args.opponents)
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
        shown = min(values.shape[0], 5)
        for j in range(shown):
            best = ", ".join(
                f"{int(i)} ({float(v):+.3g})" for v, i in zip(values[j], indices[j], strict=True)
            )
            print(f"query {j}: {best}")
        if shown < values.shape[0]:
            print(f"showing {shown} of {values.shape[0]} queries (all of them with --out FILE.csv)")
    return 0


# -- report ------------------------------------------------------------------------------------


def read_suspected(path: Path, n_train: int) -> torch.Tensor:
    """Training indices listed in a text file (separated by spaces, commas or lines; ``#``
    starts a comment)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise DataError(f"--suspected: cannot read {str(path)!r} ({exc.strerror})") from None
    words = re.split(r"[\s,]+", re.sub(r"#.*", "", text).strip())
    words = [w for w in words if w]
    bad = [w for w in words if not re.fullmatch(r"\d+", w)]
    if bad:
        raise DataError(f"--suspected {str(path)!r}: {bad[:3]} are not training indices")
    out = torch.tensor([int(w) for w in words], dtype=torch.long)
    if out.numel() and int(out.max()) >= n_train:
        raise DataError(
            f"--suspected {str(path)!r}: index {int(out.max())} is outside the training "
            f"data (n_train = {n_train})"
        )
    return out


def load_decode(folder: str) -> Any:
    """A Hugging Face tokenizer's ``decode`` from a local folder (no downloads)."""
    if not Path(folder).is_dir():
        raise ConfigError(f"--decode: no such tokenizer folder {folder!r}")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except ImportError:
        raise ConfigError("--decode needs transformers (pip install transformers)") from None
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ConfigError(f"--decode {folder!r}: {text[0] if text else exc!r}") from None

    def decode(ids: Any) -> str:
        return str(tok.decode(ids, skip_special_tokens=True))

    return decode


def report_main(args: Any, argv: list[str]) -> int:
    """Scores, self-influence and a Grad-Cos view of the queries; one HTML file."""
    entry(args.method)  # an unknown name fails before any work
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    decode = None if args.decode is None else load_decode(args.decode)
    inputs = resolve_inputs(args, need_queries=True)
    n_train = len(ExampleSource(inputs.train, "training data"))
    suspected = None if args.suspected is None else read_suspected(args.suspected, n_train)
    fitted, inputs, _ = _fit(args, need_queries=True, inputs=inputs)
    scores = fitted.attribute(inputs.queries)
    self_influence = fitted.self_influence()
    normalised = None
    if not fitted.method.normalize:
        # proponents under unnormalised scores are dominated by large-gradient (often
        # mislabelled) examples: the report shows the cosine view beside them
        from ..methods.recipes import GradCos

        cos = GradCos().fit(
            inputs.task,
            inputs.checkpoints[-1:],
            inputs.train,
            batch_size=args.batch_size,
            progress=None,
        )
        normalised = cos.attribute(inputs.queries)
    if distributed.world()[0] != 0:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = importlib.import_module(".report", __package__)
    path = report.write_report(
        out,
        scores=scores.detach().cpu(),
        train=inputs.train,
        queries=inputs.queries,
        self_influence=self_influence.detach().cpu(),
        normalised_scores=None if normalised is None else normalised.detach().cpu(),
        render=args.render,
        decode=decode,
        suspected=suspected,
        method=args.method,
        rerun=shlex.join(["datatrace", *argv]),
        title=args.title,
        top=args.top,
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0
