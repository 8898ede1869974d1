"""The README's demo figures are written from the demo's output by a script, so they
cannot drift: a fresh full demo leaves README.md and its figure unchanged."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("readme_figures", ROOT / "scripts/readme_figures.py")
assert spec is not None and spec.loader is not None
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

SUMMARY = {
    "test_accuracy": 0.95454,
    "detection": {
        "TracIn self-influence": {"0.05": 0.5, "0.10": 0.9357, "0.20": 1.0, "auc": 0.94912},
        "final-model loss": {"0.05": 0.5, "0.10": 0.8429, "0.20": 0.9857, "auc": 0.9411},
        "random (expected)": {"0.05": 0.05, "0.10": 0.1, "0.20": 0.2, "auc": 0.5},
        "best possible": {"0.05": 0.5, "0.10": 1.0, "0.20": 1.0, "auc": 0.95},
    },
}


def _fake_repo(tmp_path: Path) -> tuple[Path, Path]:
    root, demo = tmp_path / "repo", tmp_path / "demo"
    root.mkdir()
    demo.mkdir()
    (root / "README.md").write_text(
        f"# x\n\nbefore\n\n{figures.START}\nold table\n{figures.END}\n\nafter\n"
    )
    (demo / "summary.json").write_text(json.dumps(SUMMARY))
    (demo / "mislabel_detection.svg").write_text("<svg>curve</svg>\n")
    return root, demo


def test_script_writes_the_table_and_figure_then_reports_them_current(tmp_path, capsys):
    root, demo = _fake_repo(tmp_path)
    args = [str(demo), "--root", str(root)]
    assert figures.main([*args, "--check"]) == 1  # stale before
    assert figures.main(args) == 0
    readme = (root / "README.md").read_text()
    assert readme.startswith("# x\n\nbefore\n\n") and readme.endswith("\n\nafter\n")
    assert "| TracIn self-influence | 50% | 94% | 100% | 0.949 |" in readme
    assert "| final-model loss | 50% | 84% | 99% | 0.941 |" in readme
    assert "| best possible | 50% | 100% | 100% | 0.950 |" in readme
    assert "test accuracy" in readme.lower() and "95.5%" in readme
    assert (root / figures.FIGURE).read_text() == "<svg>curve</svg>\n"
    assert figures.main([*args, "--check"]) == 0  # idempotent
    (demo / "mislabel_detection.svg").write_text("<svg>other</svg>\n")
    assert figures.main([*args, "--check"]) == 1
    assert "out of date" in capsys.readouterr().out


def test_the_readme_holds_the_markers_and_the_figure_exists():
    readme = (ROOT / "README.md").read_text()
    assert readme.count(figures.START) == 1 and readme.count(figures.END) == 1
    assert str(figures.FIGURE) in readme and (ROOT / figures.FIGURE).is_file()


@pytest.mark.slow
def test_a_fresh_demo_leaves_the_readme_unchanged(tmp_path):
    """The full default demo (about a minute): its figures are the README's, byte for byte."""
    from datatrace.app.demo import DemoConfig, run

    run(DemoConfig(out=tmp_path / "demo", progress=False))
    root = tmp_path / "repo"
    (root / figures.FIGURE.parent).mkdir(parents=True)
    shutil.copy(ROOT / "README.md", root / "README.md")
    shutil.copy(ROOT / figures.FIGURE, root / figures.FIGURE)
    assert figures.main([str(tmp_path / "demo"), "--root", str(root), "--check"]) == 0
    assert figures.main([str(tmp_path / "demo"), "--root", str(root)]) == 0
    assert (root / "README.md").read_bytes() == (ROOT / "README.md").read_bytes()
    assert (root / figures.FIGURE).read_bytes() == (ROOT / figures.FIGURE).read_bytes()
