"""The documentation cannot drift: the CLI reference is the parser's own help, every public
name has an API entry, every page is in the navigation, and the worked examples the pages
include are the tested scripts."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import datatrace as dt

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"


def _hook():
    path = DOCS / "hooks" / "cli_reference.py"
    spec = importlib.util.spec_from_file_location("cli_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_what_help_prints():
    hook = _hook()
    texts = hook.help_texts()
    assert "datatrace" in texts and "datatrace demo" in texts and len(texts) >= 4
    env = {**os.environ, "COLUMNS": hook.WIDTH}
    for command, text in texts.items():
        argv = [sys.executable, "-m", "datatrace", *command.split()[1:], "--help"]
        printed = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
        assert printed.stdout == text, command
    page = hook.on_page_markdown((DOCS / "cli.md").read_text(), None, None, None)
    assert hook.MARKER not in page
    for command, text in texts.items():
        assert f"## `{command}`" in page and text.rstrip() in page


def test_every_public_name_has_an_api_entry():
    api = (DOCS / "api.md").read_text()
    entries = set(re.findall(r"^::: ([\w.]+)$", api, flags=re.M))
    homes = {f"{dt._HOME[n]}.{n}" for n in dt._HOME}
    modules = {dt._MODULES[n] for n in dt._MODULES}
    assert homes | modules <= entries, sorted((homes | modules) - entries)
    assert set(dt.__all__) - {"__version__"} == set(dt._HOME) | set(dt._MODULES)
    assert "datatrace.app.report.write_report" in entries


def test_every_page_is_in_the_navigation_and_every_include_exists():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    listed = set(re.findall(r":\s+([\w/.-]+\.md)\s*$", nav, flags=re.M))
    assert pages == listed
    for page in DOCS.rglob("*.md"):
        for include in re.findall(r'--8<-- "([^"]+)"', page.read_text()):
            assert (ROOT / include).is_file(), (page, include)
    examples = (DOCS / "examples" / "own-cnn.md").read_text()
    assert '--8<-- "examples/own_cnn_checkpoints.py"' in examples
    tabular = (DOCS / "examples" / "mislabelled-tabular.md").read_text()
    assert '--8<-- "examples/mislabelled_tabular.py"' in tabular


def test_optional_script_includes(tmp_path):
    path = DOCS / "hooks" / "optional_include.py"
    spec = importlib.util.spec_from_file_location("optional_include", path)
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "a.py").write_text("print('<hi>')\n")
    page = "x\n<!-- include-script: ex/a.py -->\ny <!-- include-script: ex/missing.py -->"
    out = hook.render(page, tmp_path)
    assert out == (
        "x\n```python\nprint('<hi>')\n```\n"
        "y *(`ex/missing.py` is not in this checkout of the repository.)*"
    )
