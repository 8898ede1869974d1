"""mkdocs hook: ``<!-- include-script: PATH -->`` becomes the script at PATH (relative to
the repository) in a code block, or a note that the script is not in this checkout.

For a worked example written in another branch of work: the page builds (with
``--strict``) before the script lands, and shows it as soon as it does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
PATTERN = re.compile(r"<!-- include-script: ([\w./-]+) -->")


def render(markdown: str, root: Path = ROOT) -> str:
    def include(match: re.Match[str]) -> str:
        path = root / match.group(1)
        if not path.is_file():
            return f"*(`{match.group(1)}` is not in this checkout of the repository.)*"
        return f"```python\n{path.read_text(encoding='utf-8').rstrip()}\n```"

    return PATTERN.sub(include, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return render(markdown)
