"""Reports opened in a real browser: headless Chromium (Debian's ``chromium-headless-shell``
or ``chromium``) driven by playwright. No console errors, no broken images, no request
for anything but the file itself, every section present; a screenshot of each page is
saved under ``tests/artifacts/`` (its path is printed).

Run with ``python -m pytest -m browser`` (``.ci/run`` does; the default run deselects
these). The browser is never downloaded: set ``DATATRACE_CHROMIUM`` to its binary, or
install it with ``apt-get install chromium-headless-shell``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from datatrace.app.demo import DemoConfig, run
from datatrace.app.report import SECTIONS, write_report

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).parent / "artifacts"
CANDIDATES = (
    "chromium-headless-shell",
    "chromium",
    "/usr/lib/chromium/chromium-headless-shell",
    "/usr/lib/chromium/chromium",
)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def _chromium() -> str:
    env = os.environ.get("DATATRACE_CHROMIUM")
    found = [env] if env else [shutil.which(c) for c in CANDIDATES]
    for path in found:
        if path and Path(path).is_file():
            return path
    pytest.fail(
        "no Chromium found: apt-get install -y chromium-headless-shell (or chromium), or "
        "set DATATRACE_CHROMIUM to the browser's binary"
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=ARGS)
        yield b
        b.close()


def _inspect(browser: Any, path: Path, name: str) -> dict[str, Any]:
    """Open ``path``; return what a person would see go wrong, and save a screenshot."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"failed: {r.url[:80]}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    result = {
        "errors": errors,
        "fetched": [u for u in requests if not u.startswith("data:")],
        "images": page.evaluate("document.images.length"),
        "broken": page.evaluate(
            "[...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)"
        ),
        "sections": page.evaluate(
            "[...document.querySelectorAll('section')].map(s => "
            "[s.id, s.querySelector('h2').textContent, s.innerText.length])"
        ),
        "scripts": page.evaluate("document.scripts.length"),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    return result


def _check(result: dict[str, Any], path: Path, min_images: int) -> None:
    assert result["errors"] == []
    assert result["fetched"] == [path.resolve().as_uri()]  # the page itself, nothing else
    assert result["broken"] == [] and result["images"] >= min_images
    assert [(k, h) for k, h, _ in result["sections"]] == list(SECTIONS.items())
    assert all(n > len(h) + 20 for _, h, n in result["sections"])  # each has content
    assert result["scripts"] == 0


def test_demo_report_in_a_browser_even_when_copied_alone(browser, tmp_path):
    run(DemoConfig(out=tmp_path / "demo", quick=True, progress=False))
    lone = tmp_path / "elsewhere" / "report.html"  # the file alone, mailed or copied
    lone.parent.mkdir()
    shutil.copy(tmp_path / "demo" / "report.html", lone)
    result = _inspect(browser, lone, "demo-report")
    _check(result, lone, min_images=4 * 21 + 30 + 1)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images[:300] / 16.0, dtype=torch.float32), torch.tensor(d.target[:300])


@pytest.mark.parametrize("kind", ["image", "text", "table"])
def test_write_report_output_in_a_browser(browser, tmp_path, kind):
    x, y = _digits()
    n_train, n_query = 200, 6
    feats = x.flatten(1)
    S = feats[n_train : n_train + n_query] @ feats[:n_train].T  # a similarity as scores
    self_inf = (feats[:n_train] ** 2).sum(1)
    suspected = torch.zeros(n_train, dtype=torch.bool)
    suspected[self_inf.argsort(descending=True)[:10:2]] = True
    data: dict[str, Any] = {
        "image": lambda i, j: (x[i:j], y[i:j]),
        "text": lambda i, j: {
            "text": [f"digit <{int(v)}> & friends " * 3 for v in y[i:j]],
            "labels": y[i:j],
        },
        "table": lambda i, j: (feats[i:j, 20:36], y[i:j]),
    }
    make = data[kind]
    path = write_report(
        tmp_path / f"{kind}.html",
        scores=S,
        train=make(0, n_train),
        queries=make(n_train, n_train + n_query),
        self_influence=self_inf,
        suspected=suspected,
        method="Grad-Dot",
        rerun="datatrace report --model m:build --checkpoints 'ckpts/*.pt'",
    )
    result = _inspect(browser, path, f"write-report-{kind}")
    images = {"image": n_query * 21 + 30 + 1, "text": 1, "table": 1}[kind]
    _check(result, path, min_images=images)


def test_cli_report_on_your_own_model_in_a_browser(browser, tmp_path, monkeypatch):
    """``datatrace report`` on a user's model file, checkpoints on disk and .npz data (the
    project of tests/test_cli.py), opened as a person would."""
    from test_cli import _own, _project

    from datatrace.app.cli import main

    _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "noisy.txt").write_text("3, 7\n12\n")
    out = tmp_path / "report" / "report.html"
    argv = ["report", *_own(tmp_path), "--suspected", "noisy.txt", "--out", str(out)]
    assert main(argv) == 0
    result = _inspect(browser, out, "cli-report")
    _check(result, out, min_images=1)
