"""write_report: one self-contained HTML file for images, text or table rows, every string
escaped, the detection numbers those of datatrace.metrics, the normalised view right."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import datatrace as dt
from datatrace.app import detection, report
from datatrace.app.detection import detection_summary
from datatrace.app.rendering import ExampleView, image_uri, png_bytes, to_pixels
from datatrace.app.report import SECTIONS, proponent_shares, write_report
from datatrace.metrics import detection_auc, found_at


class _Page(HTMLParser):
    """Every tag's attributes, the text, and the ids of sections."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.attrs: list[tuple[str, str, str]] = []
        self.text: list[str] = []
        self.tags: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]

    def handle_data(self, data):
        self.text.append(data)


def _check_self_contained(path, images: bool = True) -> _Page:
    html = path.read_text(encoding="utf-8")
    page = _Page(html)
    links = [v for _, k, v in page.attrs if k in ("src", "href", "srcset", "action", "data")]
    assert bool(links) == images and all(v.startswith("data:") for v in links), links
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(page.tags)
    assert "url(" not in html and "@import" not in html
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    ids = [v for t, k, v in page.attrs if t == "section" and k == "id"]
    assert ids == list(SECTIONS)
    return page


def _scores(n_query: int, n_train: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_query, n_train, generator=torch.Generator().manual_seed(seed))


def _decode_png(uri: str) -> np.ndarray:
    from matplotlib.image import imread

    assert uri.startswith("data:image/png;base64,")
    return imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")


def test_png_writer_round_trips_gray_rgb_and_rgba():
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 7), (5, 7, 3), (5, 7, 4)]:
        pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        back = _decode_png("data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode())
        np.testing.assert_array_equal((back * 255).round().astype(np.uint8), pixels.numpy())


def test_images_are_scaled_to_the_display_size_and_range():
    digit = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 63  # in [0, 1]: kept
    px = to_pixels(digit)
    assert px.shape == (64, 64) and int(px[0, 0]) == 0 and int(px[-1, -1]) == 255
    assert int(px[0, 8]) == round(1 / 63 * 255)  # nearest-neighbour: 8 pixels per cell
    normalised = torch.randn(3, 200, 100) * 2  # (C, H, W), mean/std-normalised: min-max
    px = to_pixels(normalised)
    assert px.shape == (96, 48, 3) and int(px.min()) >= 0
    hwc = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8)
    assert to_pixels(hwc).shape == (64, 64, 3)
    torch.testing.assert_close(to_pixels(hwc)[::2, ::2], hwc)


@pytest.mark.parametrize("layout", ["BHW", "BCHW", "BHWC-uint8", "dataset", "loader"])
def test_image_reports_embed_every_image(tmp_path, layout):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 6, 6, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    images = {"BHW": x, "BHWC-uint8": (x[..., None].expand(-1, -1, -1, 3) * 255).to(torch.uint8)}
    shown = images.get(layout, x[:, None])
    train: object = {
        "dataset": TensorDataset(shown, y),
        "loader": DataLoader(TensorDataset(shown, y), batch_size=5),
    }.get(layout, (shown, y))
    queries = (x[:2], y[:2])
    S = _scores(2, 12)
    path = write_report(tmp_path / "r.html", scores=S, train=train, queries=queries, top=3)
    page = _check_self_contained(path)
    imgs = [v for t, k, v in page.attrs if t == "img" and k == "src"]
    # per query: the query, 3 proponents and 3 opponents (no normalised view without
    # self-influence); no self-influence section images
    assert len(imgs) == 2 * (1 + 3 + 3)
    first_pro = int(torch.argmax(S[0]))
    assert imgs[1] == image_uri(shown[first_pro])
    text = "".join(page.text)
    assert f"#{first_pro} · label {int(y[first_pro])}" in text
    assert "pass self_influence=" in text and "Pass suspected=" in text


def test_a_loader_over_a_subset_shows_the_sampled_examples(tmp_path):
    x = torch.rand(10, 4, 4)
    y = torch.arange(10)
    chosen = [1, 4, 7]
    loader = DataLoader(TensorDataset(x, y), sampler=SubsetRandomSampler(chosen))
    view = ExampleView(loader, "train")
    assert len(view) == 3 and [view.label(i) for i in range(3)] == ["1", "4", "7"]
    S = torch.tensor([[0.1, 0.9, -0.5]])
    path = write_report(tmp_path / "r.html", scores=S, train=loader, queries=(x[:1], y[:1]), top=1)
    assert "#1 · label 4" in "".join(_Page(path.read_text()).text)  # row 1 = dataset index 4


def test_text_from_token_ids_with_decode_drops_padding(tmp_path):
    vocab = ["[PAD]", "the", "cat", "sat", "<b>bold</b>", "dog"]
    ids = torch.tensor([[1, 2, 3, 0], [1, 5, 4, 0], [1, 2, 0, 0]])
    mask = (ids != 0).long()
    train = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0])}
    S = torch.tensor([[0.5, -2.0, 1.0]])
    path = write_report(
        tmp_path / "r.html",
        scores=S,
        train=train,
        queries={k: v[:1] for k, v in train.items()},
        decode=lambda toks: " ".join(vocab[t] for t in toks),
        top=1,
    )
    page = _check_self_contained(path, images=False)
    html = path.read_text()
    blocks = re.findall(r"<blockquote>(.*?)</blockquote>", html)
    # query, its proponent (#2), its opponent (#1): padding removed by the attention mask
    assert blocks == ["the cat sat", "the cat", "the dog &lt;b&gt;bold&lt;/b&gt;"]
    assert "<b>bold" not in html and "[PAD]" not in html
    assert "shown as text examples" in "".join(page.text)


def test_text_columns_and_hostile_strings_are_escaped(tmp_path):
    evil = "<script>alert('x')</script> & \"quotes\""
    train = {"text": ["fine", evil, "also fine"], "label": ["pos", "<i>neg</i>", "pos"]}
    S = torch.tensor([[0.0, 3.0, -1.0]])
    path = write_report(
        tmp_path / "r.html",
        scores=S,
        train=train,
        queries={"text": ["a query </section>"], "label": ["pos"]},
        self_influence=torch.tensor([1.0, 4.0, 2.0]),
        method="<img src=x onerror=alert(1)>",
        rerun="datatrace report --queries '<q>' && echo </pre>",
        title="<title>t</title>",
        top=1,
    )
    page = _check_self_contained(path, images=False)
    html = path.read_text()
    assert "<script" not in html and "<i>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;" in html
    text = "".join(page.text)
    assert evil in text and "label <i>neg</i>" in text and "a query </section>" in text
    assert "datatrace report --queries '<q>' && echo </pre>" in text  # the rerun code, intact
    assert "<title>t</title>" in text


def test_tables_of_features_and_of_named_columns(tmp_path):
    x = torch.tensor([[1.5, -2.0], [0.25, 3.0], [7.0, 8.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    S = torch.tensor([[1.0, -1.0, 0.5]])
    path = write_report(tmp_path / "a.html", scores=S, train=(x, y), queries=(x[:1], y[:1]), top=1)
    html = path.read_text()
    _check_self_contained(path, images=False)
    assert "<th>x0</th><th>x1</th>" in html and "<img" not in html.split("id='detection'")[0]
    # the proponent (#0) and opponent (#1) rows, with their features and labels
    assert "<td>proponent</td><td>0</td><td>+1</td><td>0</td><td>1.5</td><td>-2</td>" in html
    assert "<td>opponent</td><td>1</td><td>-1</td><td>1</td><td>0.25</td><td>3</td>" in html
    frame = {"age": torch.tensor([30, 41, 52]), "income <$>": x[:, 0], "label": y}
    path = write_report(
        tmp_path / "b.html",
        scores=S,
        train=frame,
        queries={k: v[:1] for k, v in frame.items()},
        top=1,
    )
    html = path.read_text()
    assert "<th>age</th><th>income &lt;$&gt;</th>" in html and "<th>label</th>" in html
    assert "<td>proponent</td><td>0</td><td>+1</td><td>0</td><td>30</td><td>1.5</td>" in html


def test_detection_numbers_are_those_of_the_metrics(tmp_path):
    n = 20
    self_inf = torch.linspace(2.0, 0.1, n)  # example i is ranked i-th
    suspected = torch.zeros(n, dtype=torch.bool)
    suspected[[0, 2, 5, 15]] = True  # found after inspecting 1, 3, 6 and 16 examples
    rows = detection_summary(self_inf, suspected)
    assert rows["self-influence"][:3] == [0.25, 0.25, 0.50]  # at 1, 2 and 4 inspected
    assert rows["self-influence"][:3] == found_at(self_inf, suspected, detection.FRACTIONS)
    auc = detection_auc(self_inf, suspected)
    assert rows["self-influence"][3] == auc
    # trapezoid area of the step curve: hits after 1, 3, 6, 16 of 20 inspected
    steps = [0, 1, 1, 2, 2, 2, 3] + [3] * 9 + [4] * 5
    expected = sum((steps[i] + steps[i + 1]) / 2 for i in range(n)) / (4 * n)
    assert auc == pytest.approx(expected, abs=1e-12)
    assert rows["best possible"] == [0.25, 0.5, 1.0, 0.9]
    assert rows["random (expected)"] == [0.05, 0.10, 0.20, 0.5]
    x = torch.rand(n, 3)
    path = write_report(
        tmp_path / "r.html",
        scores=_scores(2, n),
        train=(x, torch.zeros(n, dtype=torch.long)),
        queries=(x[:2], torch.zeros(2, dtype=torch.long)),
        self_influence=self_inf,
        suspected=[0, 2, 5, 15],  # indices work as well as a mask
    )
    html = path.read_text()
    _check_self_contained(path)
    section = html.split("id='detection'")[1]
    assert (
        "<tr><td>self-influence</td><td>25%</td><td>25%</td><td>50%</td>"
        f"<td>{auc:.3f}</td></tr>" in section
    )
    best = "<tr><td>best possible</td><td>25%</td><td>50%</td><td>100%</td><td>0.900</td>"
    assert best in section
    svg = re.search(r'src="data:image/svg\+xml;base64,([^"]+)"', section)
    assert svg is not None and b"<polyline" in base64.b64decode(svg.group(1))
    assert html.count("suspected</figcaption>") + html.count("(suspected)") >= 1


def test_normalised_fallback_ranks_like_grad_cos(mlp_data):
    """Without normalised scores, raw ÷ √self-influence: for Grad-Dot this is |q| × the
    cosine, so each query's ranking of the training data equals Grad-Cos's."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ck = [dt.Checkpoint.from_module(model)]
    dot = dt.GradDot().fit(task, ck, (x, y), progress=False)
    S, self_inf = dot.attribute((x[:4], y[:4])), dot.self_influence()
    cos = dt.GradCos().fit(task, ck, (x, y), progress=False).attribute((x[:4], y[:4]))
    N, _, note = report._normalised_view(S.double(), None, self_inf.double(), "Grad-Dot")
    assert N is not None and "square root" in note
    ratio = N / cos.double()  # constant per query: |q|
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-9, atol=0)
    assert torch.equal(N.argsort(dim=1), cos.double().argsort(dim=1))


def test_large_gradient_examples_dominate_raw_proponents_not_normalised_ones(tmp_path):
    """One training example with a 50× gradient is every query's top raw proponent; the
    normalised view puts the examples pointing the query's way first."""
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(40, 8, generator=g, dtype=torch.float64)
    grads[7] = 50 * grads[:, :].mean(0) / grads.mean(0).norm()  # large, roughly shared
    queries = grads[:5] + 0.1 * torch.randn(5, 8, generator=g, dtype=torch.float64)
    S = queries @ grads.T
    self_inf = (grads * grads).sum(1)
    shares = proponent_shares(S, self_inf, None, top=1)
    N = S / self_inf.sqrt()
    assert int((S.argmax(1) == 7).sum()) >= 4
    assert shares["large"] >= 0.8
    assert torch.equal(N.argmax(1), torch.arange(5))  # each query's own neighbour
    assert proponent_shares(N, self_inf, None, top=1)["large"] <= 0.2
    x = torch.rand(40, 2)
    path = write_report(
        tmp_path / "r.html",
        scores=S,
        train=(x, torch.zeros(40)),
        queries=(x[:5], torch.zeros(5)),
        self_influence=self_inf,
        method="Grad-Dot",
        top=1,
    )
    text = "".join(_Page(path.read_text()).text)
    assert f"{shares['large']:.0%} under Grad-Dot" in text
    assert "large gradients" in text and "Grad-Cos" in text


def test_given_normalised_scores_are_shown_beside_the_raw_ones(tmp_path):
    x = torch.rand(6, 4, 4)
    S = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    N = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 0.9]])
    path = write_report(
        tmp_path / "r.html",
        scores=S,
        normalised_scores=N,
        train=(x, torch.arange(6)),
        queries=(x[:1], torch.arange(1)),
        method="TracIn",
        top=1,
    )
    html = path.read_text()
    views = re.findall(r"<div class='view'><h4>(.*?)</h4>(.*?)</div></div>", html)
    caps = [re.findall(r"<figcaption>(#\d+)", body) for _, body in views]
    assert [v[0] for v in views] == ["TracIn", "normalised"]
    assert caps == [["#0", "#5"], ["#5", "#0"]]  # (proponent, opponent) per view


def test_many_queries_are_capped_and_said_so(tmp_path):
    n_query = report.MAX_QUERIES + 3
    x = torch.rand(n_query, 3)
    path = write_report(
        tmp_path,  # a folder: report.html inside it
        scores=_scores(n_query, n_query),
        train=(x, torch.zeros(n_query)),
        queries=(x, torch.zeros(n_query)),
        top=1,
    )
    assert path == tmp_path / "report.html"
    html = path.read_text()
    assert f"Showing the first {report.MAX_QUERIES} of {n_query} queries" in html
    assert html.count("class='query'") == report.MAX_QUERIES


def test_bad_inputs_are_clear_errors(tmp_path):
    x, y = torch.rand(4, 3), torch.zeros(4, dtype=torch.long)
    ok = {"train": (x, y), "queries": (x[:2], y[:2])}
    out = tmp_path / "r.html"
    with pytest.raises(dt.DataError, match=r"scores are \(2, 3\).*train has 4"):
        write_report(out, scores=torch.zeros(2, 3), **ok)
    with pytest.raises(dt.DataError, match="NaN"):
        write_report(out, scores=torch.full((2, 4), float("nan")), **ok)
    with pytest.raises(dt.ConfigError, match="needs self_influence"):
        write_report(out, scores=torch.zeros(2, 4), suspected=[1], **ok)
    with pytest.raises(dt.ConfigError, match="render must be one of"):
        write_report(out, scores=torch.zeros(2, 4), render="video", **ok)
    with pytest.raises(dt.ConfigError, match="top must be"):
        write_report(out, scores=torch.zeros(2, 4), top=0, **ok)
    with pytest.raises(dt.DataError, match="self_influence has 3 values"):
        write_report(out, scores=torch.zeros(2, 4), self_influence=torch.ones(3), **ok)
    with pytest.raises(dt.DataError, match="marks no training example"):
        write_report(
            out, scores=torch.zeros(2, 4), self_influence=torch.ones(4),
            suspected=torch.zeros(4, dtype=torch.bool), **ok,
        )  # fmt: skip
    with pytest.raises(dt.ConfigError, match="pass render="):
        write_report(
            out, scores=torch.zeros(2, 4), train=(torch.rand(4, 5, 6, 7), y),
            queries=(torch.rand(2, 5, 6, 7), y[:2]),
        )  # fmt: skip
    assert not out.exists()


def test_token_ids_without_decode_show_as_ids_and_wide_rows_are_capped(tmp_path):
    ids = torch.tensor([[5, 6, 0], [7, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([1, 0])}
    path = write_report(tmp_path / "a.html", scores=torch.tensor([[1.0, -1.0]]), train=batch,
                        queries={k: v[1:] for k, v in batch.items()}, top=1)  # fmt: skip
    assert re.findall(r"<blockquote>(.*?)</blockquote>", path.read_text()) == ["7", "5 6", "7"]
    wide = torch.rand(3, 100)
    path = write_report(tmp_path / "b.html", scores=torch.ones(1, 3), train=(wide, torch.zeros(3)),
                        queries=(wide[:1], torch.zeros(1)), top=1)  # fmt: skip
    html = path.read_text()
    assert "<th>x39</th><th>…</th>" in html and "<th>x40</th>" not in html
    assert "<td>(+60 more)</td>" in html


class _Column:
    def __init__(self, values):
        self.values = values

    def to_numpy(self):
        return np.asarray(self.values)


class _FrameLike:
    """What the report reads of a pandas DataFrame (pandas is not a dependency)."""

    def __init__(self, data: dict):
        self.data, self.columns, self.iloc = data, list(data), object()

    def __getitem__(self, key):
        return _Column(self.data[key])


def test_a_data_frame_shows_as_named_table_rows(tmp_path):
    frame = _FrameLike({"age": [30, 41, 52], "city": ["Oslo", "<Rome>", "Lima"],
                        "label": [0, 1, 1]})  # fmt: skip
    view = ExampleView(frame, "train")
    assert view.label(1) == "1" and view.table_columns(1) == [("age", "41"), ("city", "<Rome>")]
    queries = _FrameLike({"age": [33], "city": ["Kyiv"], "label": [0]})
    path = write_report(tmp_path / "r.html", scores=torch.tensor([[0.0, 2.0, -1.0]]),
                        train=frame, queries=queries, top=1)  # fmt: skip
    html = path.read_text()
    assert "<th>age</th><th>city</th>" in html
    row = "<td>proponent</td><td>1</td><td>+2</td><td>1</td><td>41</td><td>&lt;Rome&gt;</td>"
    assert row in html
