"""The HTML report: :func:`write_report` for any model and data, used by ``datatrace
report`` and ``datatrace demo``.

One self-contained file: images are PNG ``data:`` URIs, plots SVG ``data:`` URIs, no
scripts, no links to other files or hosts, so the file can be mailed or copied anywhere.
Sections (each an ``<section id=...>``, see :data:`SECTIONS`): a summary; why a
normalised view stands beside the raw one; the top proponents and opponents of each query
in both views; the training data ranked by self-influence; how many suspected examples
are found against how much is inspected; what to do next.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import ConfigError, DataError
from .detection import detection_section
from .page import ExampleCards, write_html
from .rendering import (
    RENDER_KINDS,
    ExampleView,
    infer_render,
)

SECTIONS = {
    "summary": "Summary",
    "normalised-view": "Two views: raw and normalised scores",
    "top-examples": "Top proponents and opponents of each query",
    "self-influence": "Training examples ranked by self-influence",
    "detection": "Suspected examples found against the fraction inspected",
    "next-steps": "What to do next",
}
MAX_QUERIES = 50  # queries shown (the scores of all of them are the caller's to keep)
SELF_INFLUENCE_SHOWN = 30
#: "large gradient": in the top tenth of the training data by self-influence
LARGE_GRADIENT_SHARE = 0.10
WHY_NORMALISED = (
    "Raw scores such as TracIn, Grad-Dot or influence functions are dot products of a "
    "query's gradient with each training example's gradient, so training examples with "
    "large gradients (often mislabelled or atypical ones, which the model fits last) come "
    "out as top proponents or opponents of almost every query. A normalised score such as "
    "Grad-Cos (the cosine between the two gradients) ranks by direction alone and shows "
    "the training examples most like each query. Read the raw view for what moved the "
    "model most, the normalised view for what the query resembles."
)


def write_report(
    path: str | Path,
    *,
    scores: Any,
    train: Any,
    queries: Any,
    self_influence: Any = None,
    normalised_scores: Any = None,
    render: str | None = None,
    decode: Callable[..., str] | None = None,
    suspected: Any = None,
    method: str = "",
    rerun: str = "",
    title: str = "datatrace report",
    top: int = 5,
) -> Path:
    """Write an HTML report of attribution scores as one self-contained file.

    Args:
        path: the ``.html`` file to write (an existing folder: ``report.html`` in it).
        scores: (n_query, n_train) scores, e.g. ``fitted.attribute(queries)``; positive =
            proponent.
        train: the training data as given to ``fit`` (tensors, a dict, a Dataset or a
            DataLoader), or any data with the same examples in the same order that shows
            them better (e.g. images reshaped to (H, W), a text column).
        queries: the queries, likewise.
        self_influence: (n_train,), e.g. ``fitted.self_influence()``: ranks the training
            data (large = suspicious) and, without ``normalised_scores``, normalises.
        normalised_scores: (n_query, n_train) scores of a normalised method (e.g.
            ``dt.GradCos()``), shown beside the raw ones. Without them the normalised view
            divides each raw score by the square root of the training example's
            self-influence (for one checkpoint of Grad-Dot or TracIn this ranks each query's
            training examples exactly as Grad-Cos does).
        render: ``"image"``, ``"text"`` or ``"table"``; ``None``: inferred from the first
            training example ((H, W), (C, H, W) or (H, W, C) arrays are images, strings or
            token ids (``input_ids``, or integers with ``decode``) are text, feature
            vectors and dicts of scalar columns are table rows).
        decode: turns a list of token ids into text (e.g. ``tokenizer.decode``).
        suspected: bool (n_train,) or a list of training indices suspected mislabelled:
            marked in red, and the found-vs-inspected curve of the self-influence ranking
            is drawn (needs ``self_influence``).
        method: the raw scores' method name, for headings (e.g. ``"TracIn"``).
        rerun: the code or command that reproduces the report, shown under "what to do
            next".
        title: the page title.
        top: proponents and opponents shown per query.

    Returns:
        The path written.

    Raises:
        ConfigError: a bad setting (``render``, ``top``, ``suspected`` without
            ``self_influence``).
        DataError: scores or data of the wrong shape, or non-finite scores.
    """
    S = _matrix(scores, "scores")
    n_query, n_train = S.shape
    train_view, query_view = ExampleView(train, "train"), ExampleView(queries, "queries")
    if len(train_view) != n_train or len(query_view) != n_query:
        raise DataError(
            f"scores are {tuple(S.shape)} (n_query, n_train) but train has "
            f"{len(train_view)} examples and queries {len(query_view)}"
        )
    if not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be a positive integer, got {top!r}")
    self_inf = None if self_influence is None else _vector(self_influence, n_train)
    sus = _suspected(suspected, n_train)
    if sus is not None and self_inf is None:
        raise ConfigError(
            "suspected= needs self_influence= (e.g. fitted.self_influence()): the examples "
            "are found by ranking the training data by self-influence"
        )
    if render is not None and render not in RENDER_KINDS:
        raise ConfigError(f"render must be one of {list(RENDER_KINDS)} or None, got {render!r}")
    method = method or "raw scores"
    norm, norm_label, norm_note = _normalised_view(S, normalised_scores, self_inf, method)
    kind = render or infer_render(
        train_view.content(0), decode, bool(train_view.frame_columns), train_view.holds_token_ids
    )
    shower = ExampleCards(kind, decode, sus)
    body = [
        _section("summary", _summary(method, n_train, n_query, kind, sus)),
        _section(
            "normalised-view",
            _why_normalised(S, norm, norm_label, norm_note, self_inf, sus, method, top),
        ),
        _section(
            "top-examples",
            _top_examples(S, norm, norm_label, method, train_view, query_view, shower, top),
        ),
        _section("self-influence", _self_influence(self_inf, train_view, shower)),
        _section("detection", detection_section(self_inf, sus)),
        _section("next-steps", _next_steps(rerun, method, sus is not None)),
    ]
    out = Path(path)
    if out.is_dir():
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_html(out, title, body)
    return out


def _matrix(value: Any, name: str) -> torch.Tensor:
    t = _tensor(value, name).double()
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise DataError(
            f"{name} must be a non-empty (n_query, n_train) matrix, got {tuple(t.shape)}"
        )
    return t


def _tensor(value: Any, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    t = t.detach().cpu()
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise DataError(f"{name} contain NaN or inf; a report of them would mislead")
    return t


def _vector(value: Any, n: int) -> torch.Tensor:
    t = _tensor(value, "self_influence").double().flatten()
    if t.numel() != n:
        raise DataError(f"self_influence has {t.numel()} values for {n} training examples")
    return t


def _suspected(value: Any, n: int) -> torch.Tensor | None:
    if value is None:
        return None
    t = _tensor(value, "suspected")
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise DataError(f"suspected is a mask of shape {tuple(t.shape)}; need ({n},)")
        mask = t
    elif not t.is_floating_point() and t.dim() == 1:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise DataError(f"suspected holds indices outside [0, {n})")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[t.long()] = True
    else:
        raise DataError("suspected must be a bool mask over the training data or its indices")
    if not bool(mask.any()):
        raise DataError("suspected marks no training example")
    return mask


def _normalised_view(
    S: torch.Tensor, given: Any, self_inf: torch.Tensor | None, method: str
) -> tuple[torch.Tensor | None, str, str]:
    """(normalised scores or None, their heading, a sentence saying what they are)."""
    if given is not None:
        N = _matrix(given, "normalised_scores")
        if N.shape != S.shape:
            raise DataError(f"normalised_scores are {tuple(N.shape)}, the scores {tuple(S.shape)}")
        return (
            N,
            "normalised",
            "The normalised view shows the normalised scores given (e.g. Grad-Cos).",
        )
    if method.replace("-", "").replace(" ", "").lower() == "gradcos":
        return None, "", f"{method} scores are already normalised: there is one view."
    if self_inf is not None and bool((self_inf > 0).all()):
        N = S / self_inf.sqrt()[None, :]
        return (
            N,
            "normalised (÷ √self-influence)",
            (
                "No normalised scores were given, so the normalised view divides each raw score "
                "by the square root of the training example's self-influence: for Grad-Dot or "
                "one checkpoint of TracIn this ranks each query's training examples exactly as "
                "Grad-Cos does; over several checkpoints it is an approximation."
            ),
        )
    return (
        None,
        "",
        (
            "No normalised view: pass normalised_scores= (e.g. "
            "dt.GradCos().fit(task, checkpoints[-1:], train).attribute(queries)), or a positive "
            "self_influence= to normalise by."
        ),
    )


def proponent_shares(
    S: torch.Tensor, self_inf: torch.Tensor, suspected: torch.Tensor | None, top: int
) -> dict[str, float]:
    """Over the shown queries' top proponents: the share in the top tenth of the training
    data by self-influence (``"large"``) and the share suspected (``"suspected"``)."""
    n_train = S.shape[1]
    k = min(top, n_train)
    idx = _order(S[:MAX_QUERIES], descending=True)[:, :k].flatten()
    n_large = max(1, round(LARGE_GRADIENT_SHARE * n_train))
    large = torch.zeros(n_train, dtype=torch.bool)
    large[_order(self_inf[None, :], descending=True)[0, :n_large]] = True
    out = {"large": float(large[idx].double().mean())}
    if suspected is not None:
        out["suspected"] = float(suspected[idx].double().mean())
    return out


def _order(S: torch.Tensor, descending: bool) -> torch.Tensor:
    """Column indices of each row sorted by score (ties: lowest index first)."""
    return torch.sort(S, dim=1, descending=descending, stable=True).indices


def _why_normalised(
    S: torch.Tensor,
    norm: torch.Tensor | None,
    norm_label: str,
    note: str,
    self_inf: torch.Tensor | None,
    sus: torch.Tensor | None,
    method: str,
    top: int,
) -> str:
    parts = [f"<p>{html.escape(WHY_NORMALISED)}</p>", f"<p>{html.escape(note)}</p>"]
    if norm is not None and self_inf is not None:
        raw, nrm = (
            proponent_shares(S, self_inf, sus, top),
            proponent_shares(norm, self_inf, sus, top),
        )
        text = (
            f"Measured here: of the top {min(top, S.shape[1])} proponents of the queries "
            f"shown, {raw['large']:.0%} under {method} and {nrm['large']:.0%} under the "
            f"{norm_label} view are among the {LARGE_GRADIENT_SHARE:.0%} of training "
            f"examples with the largest self-influence"
        )
        if sus is not None:
            text += f"; {raw['suspected']:.0%} and {nrm['suspected']:.0%} are suspected"
        parts.append(f"<p class='measured'>{html.escape(text)}.</p>")
    return "".join(parts)


def _top_examples(
    S: torch.Tensor,
    norm: torch.Tensor | None,
    norm_label: str,
    method: str,
    train: ExampleView,
    queries: ExampleView,
    shower: ExampleCards,
    top: int,
) -> str:
    n_query = S.shape[0]
    k = min(top, S.shape[1])
    views = [(method, S)] + ([(norm_label, norm)] if norm is not None else [])
    orders = [(_order(V[:MAX_QUERIES], True)[:, :k], _order(V[:MAX_QUERIES], False)[:, :k])
              for _, V in views]  # fmt: skip
    parts = []
    if n_query > MAX_QUERIES:
        parts.append(f"<p>Showing the first {MAX_QUERIES} of {n_query} queries.</p>")
    for q in range(min(n_query, MAX_QUERIES)):
        blocks = []
        for (label, V), (pro, opp) in zip(views, orders, strict=True):
            if shower.kind == "table":
                entries = [("proponent", int(i), float(V[q, i])) for i in pro[q]]
                entries += [("opponent", int(i), float(V[q, i])) for i in opp[q]]
                content = shower.rows(train, entries)
            else:
                content = "".join(
                    "<div class='strip'>"
                    f"<span class='role'>{role}</span>"
                    + "".join(
                        shower.card(train, int(i), f"{float(V[q, i]):+.3g}", True) for i in idx[q]
                    )
                    + "</div>"
                    for role, idx in (("proponents", pro), ("opponents", opp))
                )
            blocks.append(f"<div class='view'><h4>{html.escape(label)}</h4>{content}</div>")
        query = (
            shower.rows(queries, [("query", q, None)])
            if shower.kind == "table"
            else shower.card(queries, q, "", False)
        )
        parts.append(
            f"<div class='query' id='query-{q}'><h3>Query {q}</h3>{query}"
            f"<div class='views'>{''.join(blocks)}</div></div>"
        )
    return "".join(parts)


def _self_influence(self_inf: torch.Tensor | None, train: ExampleView, shower: ExampleCards) -> str:
    if self_inf is None:
        return (
            "<p>Not computed: pass self_influence= (e.g. fitted.self_influence()) to rank the "
            "training data; examples with the largest self-influence are the first to "
            "inspect for wrong labels.</p>"
        )
    order = _order(self_inf[None, :], descending=True)[0, :SELF_INFLUENCE_SHOWN].tolist()
    intro = (
        f"<p>The {len(order)} training examples with the largest self-influence (the score "
        "of each example with itself: large when the model needed a large step to fit it), "
        "largest first.</p>"
    )
    if shower.kind == "table":
        return intro + shower.rows(train, [("rank", i, float(self_inf[i])) for i in order])
    cards = "".join(shower.card(train, i, f"{float(self_inf[i]):.3g}", True) for i in order)
    return intro + f"<div class='strip'>{cards}</div>"


def _next_steps(rerun: str, method: str, has_suspected: bool) -> str:
    code = rerun or (
        "import datatrace as dt\n"
        "from datatrace.app.report import write_report\n\n"
        "fitted = dt.TracIn().fit(task, checkpoints, train)\n"
        'write_report("report.html", scores=fitted.attribute(queries), train=train,\n'
        "             queries=queries, self_influence=fitted.self_influence(),\n"
        "             normalised_scores=dt.GradCos().fit(task, checkpoints[-1:], train)"
        ".attribute(queries),\n"
        '             method="TracIn")\n'
    )
    steps = [
        "Look at the training examples at the top of the self-influence ranking: fix the "
        "labels that are wrong, drop the examples that do not belong, and retrain.",
        "Compare the retrained model's accuracy with this one's on held-out data; a gain "
        "says the removed or fixed examples were harming it.",
        f"Check a few {method} scores against retraining without the example "
        "(dt.truth.leave_one_out) before acting on them at scale.",
    ]
    if not has_suspected:
        steps.append(
            "To measure how well the ranking finds bad labels, flip a few labels on purpose "
            "and pass their indices as suspected=."
        )
    items = "".join(f"<li>{html.escape(s)}</li>" for s in steps)
    return (
        f"<ol>{items}</ol><p>Code to rerun this report:</p>"
        f"<pre><code>{html.escape(code)}</code></pre>"
    )


def _summary(method: str, n_train: int, n_query: int, kind: str, sus: torch.Tensor | None) -> str:
    text = (
        f"Scores: {method}, {n_query} queries × {n_train} training examples, shown as "
        f"{kind} {'rows' if kind == 'table' else 'examples'}. A positive score marks a "
        "proponent (training on the example lowered the query's loss), a negative one an "
        "opponent."
    )
    if sus is not None:
        text += f" {int(sus.sum())} training examples are marked suspected (red)."
    return f"<p>{html.escape(text)}</p>"


def _section(key: str, content: str) -> str:
    return f"<section id='{key}'><h2>{html.escape(SECTIONS[key])}</h2>{content}</section>"
