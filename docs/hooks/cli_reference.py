"""mkdocs hook: the CLI reference page is the argparse parser's own help.

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; at build time it is replaced
by ``datatrace --help`` and every subcommand's ``--help``, formatted at a fixed width from
``datatrace.app.cli.build_parser()``, so the page cannot drift from the command.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- cli-reference -->"
WIDTH = "96"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def help_texts() -> dict[str, str]:
    """``{"datatrace": help, "datatrace demo": help, ...}`` as ``--help`` prints them at
    ``COLUMNS=96``."""
    from datatrace.app.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH  # argparse wraps to the terminal width it reads here
    try:
        parser = build_parser()
        texts = {"datatrace": parser.format_help()}
        for name, sub in _subcommands(parser).items():
            texts[f"datatrace {name}"] = sub.format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return texts


def cli_reference() -> str:
    parts = []
    for command, text in help_texts().items():
        parts.append(f"## `{command}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
