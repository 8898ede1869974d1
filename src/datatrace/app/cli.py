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
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's)"
    )
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
        ("featurize", "compute the training features into a store (torchrun-aware)"),
        ("score", "top-k proponents/opponents (and optionally the full matrix)"),
        ("report", "an HTML report: top proponents/opponents, self-influence, Grad-Cos view"),
    ):
        cmd = sub.add_parser(
            name,
            help=text,
            description=f"{text}. Your own model (nothing is trained): --model, "
            "--checkpoints, --train, --queries; or an experiment TOML (the same keys in "
            "[model] and [data]; flags override it).",
            epilog=INPUTS_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_input_options(cmd)
        cmd.add_argument(
            "--store",
            type=Path,
            required=name == "featurize",
            default=None,
            help="feature store directory (reused when its settings match)"
            + ("" if name == "featurize" else "; default: temporary"),
        )
        cmd.add_argument(
            "--method",
            default="tracin",
            help=f"one of: {', '.join(REGISTRY)} (default: tracin)",
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
        cmd.add_argument(
            "--overwrite",
            action="store_true",
            help="replace a store written with other settings (instead of an error)",
        )
        if name == "score":
            cmd.add_argument("--top-k", type=int, default=10)
            cmd.add_argument("--opponents", action="store_true")
            cmd.add_argument(
                "--matrix", type=Path, default=None, help="write S to this .npy (dt.load_scores)"
            )
            cmd.add_argument("--out", type=Path, default=None, help="top-k as CSV")
        if name == "report":
            cmd.add_argument(
                "--out", type=Path, default=Path("datatrace-report.html"), help="the HTML file"
            )
            cmd.add_argument(
                "--suspected",
                type=Path,
                default=None,
                help="text file of training indices believed mislabelled (found-vs-inspected "
                "curve)",
            )
            cmd.add_argument(
                "--decode", default=None, help="tokenizer folder: show token ids as text"
            )
            cmd.add_argument(
                "--render",
                choices=("image", "text", "table"),
                default=None,
                help="how examples are shown (default: inferred from the data)",
            )
            cmd.add_argument("--top", type=int, default=5, help="examples per query and list")
            cmd.add_argument("--title", default="datatrace report")
    return parser


INPUTS_HELP = """inputs:
  --model pkg.module:build      a function returning your nn.Module (or file.py:build)
  --task pkg.module:make        make(model) -> a datatrace task (default: classification)
  --checkpoints 'ckpts/*.pt'    checkpoint files in natural order; learning rates from
                                their optimizer state, or --lr (default: the model's weights)
  --train / --queries DATA      pkg.module:function returning a Dataset or tensors; a
                                .npz / .pt / .safetensors file with x and y (or inputs and
                                labels; other keys: a dict batch such as input_ids,
                                attention_mask, labels); or a folder of images (.npy, or
                                PNG/JPEG with Pillow) with labels.csv (filename,label)
"""


def _add_input_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "config", type=Path, nargs="?", default=None, help="an experiment TOML (optional)"
    )
    group = cmd.add_argument_group("your model and data (see below)")
    group.add_argument("--model", default=None, metavar="MODULE:FUNCTION")
    group.add_argument("--task", default=None, metavar="MODULE:FUNCTION")
    group.add_argument("--checkpoints", default=None, metavar="GLOB")
    group.add_argument("--lr", type=float, default=None, help="every checkpoint's weight")
    group.add_argument("--strip-prefix", default=None, help="e.g. 'model.' (Lightning)")
    group.add_argument("--train", default=None, metavar="DATA")
    group.add_argument("--queries", default=None, metavar="DATA")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            print("datatrace: error: --threads must be >= 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
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
        elif args.command == "report":
            from .commands import report_main

            return report_main(args, argv)
        elif args.command == "evaluate":
            from .evaluate import main as evaluate_main

            return evaluate_main(str(args.config), None if args.out is None else str(args.out))
    except DatatraceError as exc:
        print(f"datatrace: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave: one line, not a traceback
        print(f"datatrace: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"datatrace {version('datatrace')}"
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "datatrace (not installed)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
