"""The ``datatrace`` command (a thin layer over the library)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import DatatraceError
from .registry import REGISTRY


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datatrace", description="Training data attribution for PyTorch."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is cached where")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="find flipped labels in scikit-learn's digits with TracIn")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, flips and training")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("datatrace-demo"),
        help="output folder (default: ./datatrace-demo)",
    )
    demo.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev = sub.add_parser(
        "evaluate",
        help="compare attribution methods with gold standards (further training, LOO, LDS)",
        description="Run the methods x gold standards described in a TOML config; writes "
        "results.json, results.csv and agreement.png and prints a table. Keys and defaults: "
        "datatrace.app.config.SCHEMA; an example: examples/wei2024-digits.toml. A config is a "
        "program: data.entry = 'module:function' imports and runs your code (only run "
        "configs you trust).",
    )
    ev.add_argument("config", type=Path, help="the experiment's TOML file")
    ev.add_argument("--out", type=Path, default=None, help="output folder (overrides config)")
    for name, text in (
        ("featurize", "compute a config's training features into a store (torchrun-aware)"),
        ("score", "top-k proponents/opponents (and optionally the full matrix) from a store"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("config", type=Path, help="an experiment TOML (as for evaluate)")
        cmd.add_argument("--store", type=Path, required=True, help="feature store directory")
        cmd.add_argument(
            "--method", default="tracin", help=f"one of: {', '.join(REGISTRY)} (default: tracin)"
        )
        cmd.add_argument("--projection-dim", type=int, default=None)
        cmd.add_argument("--batch-size", type=int, default=256)
        cmd.add_argument(
            "--device",
            default="auto",
            help="auto (CUDA when available, cuda:LOCAL_RANK under torchrun), cpu, cuda:N",
        )
        cmd.add_argument(
            "--feature-dtype",
            choices=("float32", "bfloat16"),
            default=None,
            help="keep features in bfloat16 (half the store; error bound in the README)",
        )
        cmd.add_argument(
            "--tf32", action="store_true", help="score with TF32 matmuls on CUDA (see README)"
        )
        if name == "score":
            cmd.add_argument("--top-k", type=int, default=10)
            cmd.add_argument("--opponents", action="store_true")
            cmd.add_argument("--matrix", type=Path, default=None, help="write S to this .npy")
            cmd.add_argument("--out", type=Path, default=None, help="top-k as CSV")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.command == "demo":
            from .demo import DemoConfig, run

            run(
                DemoConfig(
                    seed=args.seed,
                    out=args.out,
                    quick=args.quick,
                    progress=False if args.no_progress else None,
                )
            )
        elif args.command in ("featurize", "score"):
            from .commands import featurize_main, score_main

            return (featurize_main if args.command == "featurize" else score_main)(args)
        elif args.command == "evaluate":
            from .evaluate import main as evaluate_main

            return evaluate_main(str(args.config), None if args.out is None else str(args.out))
    except DatatraceError as exc:
        print(f"datatrace: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
