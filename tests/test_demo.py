"""The demo runs end to end and finds the flipped labels far better than chance."""

from __future__ import annotations

import json
import subprocess
import sys

from datatrace.app.cli import main
from datatrace.app.demo import DemoConfig, run


def test_quick_demo_finds_flipped_labels(tmp_path, capsys):
    result = run(DemoConfig(out=tmp_path / "demo", quick=True, progress=False))
    det = result["detection"]
    tracin = det["TracIn self-influence"]
    # 10% of labels flipped: random inspection of 10% finds 10%; TracIn must find far more
    assert tracin["0.10"] >= 0.6, det
    assert tracin["0.20"] >= 0.85, det
    assert tracin["auc"] >= 0.85
    assert det["random (expected)"]["0.10"] == 0.10
    assert result["test_accuracy"] > 0.8
    out = tmp_path / "demo"
    html = (out / "report.html").read_text()
    # 4 queries with 5 proponents and 5 opponents in two views (TracIn, Grad-Cos), the
    # 30 training images of the self-influence ranking, the curve: all inline
    assert html.count('src="data:image/png;base64,') == 4 * 21 + 30
    assert html.count('src="data:image/svg+xml;base64,') == 1
    assert html.count("src=") == 4 * 21 + 30 + 1  # no relative link: copy the file anywhere
    saved = json.loads((out / "summary.json").read_text())
    assert saved == {"test_accuracy": result["test_accuracy"], "detection": det}
    assert "<polyline" in (out / "mislabel_detection.svg").read_text()
    assert (out / "mislabel_detection.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "checkpoints").glob("*.safetensors"))) >= 4
    printed = capsys.readouterr().out
    assert "proponents:" in printed and "opponents:" in printed and "AUC" in printed


def test_demo_is_deterministic_and_cli_reuses_the_store(tmp_path, capsys):
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "a")]) == 0
    second = capsys.readouterr().out
    strip = [ln for ln in first.splitlines() if not ln.startswith("report:")]
    assert strip == [ln for ln in second.splitlines() if not ln.startswith("report:")]


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "datatrace", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--seed" in out and "--quick" in out and "--out" in out
