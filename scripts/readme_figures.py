"""Write the README's demo figures from a ``datatrace demo`` output folder.

The README's demo table (flipped labels found at 5/10/20% inspected, AUC, test accuracy)
sits between the markers ``<!-- demo-results:start -->`` and ``<!-- demo-results:end -->``
and is written from the demo's ``summary.json``; the curve it shows,
``docs/img/demo-detection.svg``, is the demo's ``mislabel_detection.svg``. Neither is
edited by hand, so they cannot drift from what the demo prints.

    datatrace demo --out datatrace-demo           # default seed, full size
    python scripts/readme_figures.py datatrace-demo
    python scripts/readme_figures.py datatrace-demo --check   # exit 1 if out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
FIGURE = Path("docs/img/demo-detection.svg")
ROWS = ("TracIn self-influence", "final-model loss", "random (expected)", "best possible")
FRACTIONS = ("0.05", "0.10", "0.20")


def demo_table(summary: dict) -> str:
    """The markdown between the markers, from the demo's ``summary.json``."""
    det = summary["detection"]
    lines = [
        START,
        "| ranking | found @ 5% | @ 10% | @ 20% | AUC |",
        "|---|---|---|---|---|",
    ]
    for name in ROWS:
        row = det[name]
        cells = [f"{row[f]:.0%}" for f in FRACTIONS] + [f"{row['auc']:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Test accuracy of the MLP trained on the noisy labels: {summary['test_accuracy']:.1%}.",
        "",
        f"![Flipped labels found against the fraction of training data inspected]({FIGURE})",
        END,
    ]
    return "\n".join(lines)


def updated(readme: str, summary: dict) -> str:
    if readme.count(START) != 1 or readme.count(END) != 1:
        raise SystemExit(f"README must hold {START} and {END} once each")
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return head + demo_table(summary) + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("demo_out", type=Path, help="the folder `datatrace demo --out` wrote")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (README.md)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    summary = json.loads((args.demo_out / "summary.json").read_text())
    svg = (args.demo_out / "mislabel_detection.svg").read_text(encoding="utf-8")
    readme_path, figure_path = args.root / "README.md", args.root / FIGURE
    readme = readme_path.read_text(encoding="utf-8")
    new_readme = updated(readme, summary)
    old_svg = figure_path.read_text(encoding="utf-8") if figure_path.exists() else None
    stale = [p for p, same in ((readme_path, new_readme == readme), (figure_path, svg == old_svg))
             if not same]  # fmt: skip
    if args.check:
        for p in stale:
            print(f"out of date: {p} (run python scripts/readme_figures.py {args.demo_out})")
        return 1 if stale else 0
    readme_path.write_text(new_readme, encoding="utf-8")
    figure_path.parent.mkdir(parents=True, exist_ok=True)
    figure_path.write_text(svg, encoding="utf-8")
    print("updated: " + (", ".join(map(str, stale)) if stale else "nothing (already current)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
