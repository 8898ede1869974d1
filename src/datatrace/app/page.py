"""One self-contained HTML page: the report's style sheet, the cards and table rows that
show examples, and the writer (images inline, no scripts, no outside fetches)."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .rendering import ExampleView, image_uri, text_of

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
section{margin:2em 0}
figure.ex{display:inline-block;vertical-align:top;margin:1px;text-align:center;
  border:3px solid transparent;min-width:80px}
figure.ex img{width:72px;image-rendering:pixelated}
figure.sus{border-color:#c0392b}
figure.ex blockquote{margin:0;padding:4px;width:220px;text-align:left;white-space:pre-wrap;
  background:#f6f6f6;font-size:12px}
figcaption{font-size:10px;color:#444}
.views{display:flex;gap:16px;flex-wrap:wrap}.view{flex:1;min-width:320px}
.strip{display:flex;align-items:flex-start;gap:2px;flex-wrap:wrap;margin:4px 0}
.role{width:70px;font-size:12px;color:#555;padding-top:8px}
.query{border-top:1px solid #ddd;padding:8px 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.5em 0;font-size:12px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
tr.sus td{background:#fbe3e0}
pre{background:#f6f6f6;padding:8px;overflow-x:auto}
"""


def write_html(path: Path, title: str, body: Sequence[str]) -> None:
    """Write a self-contained HTML page (images inline, no scripts)."""
    doc = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path.write_text(doc, encoding="utf-8")


class ExampleCards:
    """Renders examples of one kind, caching each training image's PNG."""

    def __init__(
        self, kind: str, decode: Callable[..., str] | None, suspected: torch.Tensor | None
    ) -> None:
        self.kind, self.decode, self.suspected = kind, decode, suspected
        self._uris: dict[tuple[int, int], str] = {}

    def card(self, view: ExampleView, i: int, detail: str, is_train: bool) -> str:
        """One example: its image or text, then "#i · label L" and ``detail`` below."""
        sus = is_train and self.suspected is not None and bool(self.suspected[i])
        label = view.label(i)
        head = f"#{i}" + (f" · label {label}" if label is not None else "")
        if sus:
            detail += (" · " if detail else "") + "suspected"
        cls = "ex sus" if sus else "ex"
        if self.kind == "image":
            key = (id(view), i)
            if key not in self._uris:
                self._uris[key] = image_uri(view.content(i))
            alt = f"{view.name} example {i}"
            inner = f'<img src="{self._uris[key]}" alt="{html.escape(alt)}">'
        else:
            text = html.escape(text_of(view.content(i), self.decode))
            inner = f"<blockquote>{text}</blockquote>"
        cap = html.escape(head) + (f"<br>{html.escape(detail)}" if detail else "")
        return f'<figure class="{cls}">{inner}<figcaption>{cap}</figcaption></figure>'

    def rows(self, view: ExampleView, entries: Sequence[tuple[str, int, float | None]]) -> str:
        """Table rows: (role, index, score) per entry, then the example's columns."""
        cols = view.table_columns(entries[0][1])
        head = ["", "#", "score", "label", *(name for name, _ in cols)]
        rows = []
        for role, i, score in entries:
            sus = view.name == "train" and self.suspected is not None and bool(self.suspected[i])
            cells = [
                role + (" (suspected)" if sus else ""),
                str(i),
                "" if score is None else f"{score:+.4g}",
                view.label(i) or "",
                *(v for _, v in view.table_columns(i)),
            ]
            tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            rows.append(f"<tr class='sus'>{tds}</tr>" if sus else f"<tr>{tds}</tr>")
        ths = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        return f"<div class='scroll'><table><tr>{ths}</tr>{''.join(rows)}</table></div>"
