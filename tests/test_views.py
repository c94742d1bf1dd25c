"""kobattr.views without a browser: what a page embeds equals the result's numbers (top-k per row, exact floats),
page size of a 4096-token result, the notebook summary, show() in and out of a notebook, save_html, `kobattr view`,
and a sentence for every input a view refuses. tests/test_views_browser.py drives the same pages in Chromium."""

import base64
import dataclasses
import functools
import json
import os
import re
import sys
import types
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import kobattr
from kobattr import views
from kobattr.cli import main as cli_main
from kobattr.result import Attribution

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXTS = ["The cat sat on the mat.", "Norms, not weights </script><b>!"]
MINILM_METHODS = ["attn_w", "attn_n", "attnresln_n"]
DATA = re.compile(r'<script type="application/json" class="kv-data">(.*?)</script>', re.S)
TYPES = {"u1": "<u1", "u2": "<u2", "u4": "<u4", "f4": "<f4", "f8": "<f8"}


def synthetic_result(n, layers=2, heads=3, texts=1, seed=0, shared=False, pad=0) -> Attribution:
    """An Attribution of random maps without a model: attn_w rows sum to 1, attn_n and attnresln_n are norms.
    shared: every map is one random (n, n) map, scaled per method and expanded (not copied) over layers, texts and
    heads, so that a 4096-token result with heads fits in memory. pad: the last ``pad`` tokens of text 0 are padding."""
    generator = torch.Generator().manual_seed(seed)
    if shared:
        base = torch.rand(n, n, generator=generator)
        base /= base.sum(-1, keepdim=True)

    def random_maps(*lead, scale=1.0):
        if shared:
            return (scale * base).expand(*lead, n, n)
        maps = torch.rand(*lead, n, n, generator=generator)
        return scale * maps / maps.sum(-1, keepdim=True)

    methods = ("attn_w", "attn_n", "attnresln_n")
    scales = {"attn_w": 1.0, "attn_n": 7.5, "attnresln_n": 0.3}
    mask = torch.ones(texts, n, dtype=torch.bool)
    if pad:
        mask[0, n - pad:] = False
    return Attribution(
        methods=methods, layers=tuple(range(layers)),
        maps={m: random_maps(layers, texts, scale=scales[m]) for m in methods},
        ratios={m: torch.rand(layers, texts, n, generator=generator) for m in methods},
        value_norms=torch.rand(layers, texts, heads, n, generator=generator),
        bias_norms={m: torch.zeros(layers, texts, n) for m in methods},
        completeness={m: torch.zeros(layers, texts) for m in methods},
        tokens=[[f"t{i}" for i in range(n)] for _ in range(texts)], attention_mask=mask,
        head_maps={m: random_maps(layers, texts, heads, scale=scales[m]) for m in ("attn_w", "attn_n")},
        model_name="synthetic")


@functools.cache
def minilm_analysis() -> Attribution:
    """MiniLM on two short texts (the second one token longer, so text 0 is padded), per-head maps included; one
    analysis for this file and tests/test_views_browser.py."""
    from kobattr.models import load_default_model

    model, tokenizer = load_default_model()
    return kobattr.analyze(model, TEXTS, tokenizer=tokenizer, methods=MINILM_METHODS, heads=True, backend="torch")


@pytest.fixture(scope="module")
def minilm_result():
    return minilm_analysis()


def embedded(fragment: str) -> dict:
    """The view's data with its base64 arrays decoded to numpy."""
    (text,) = DATA.findall(fragment)
    data = json.loads(text)
    entries = data["entries"]

    def decode(b64, kind):
        return np.frombuffer(base64.b64decode(b64), dtype=TYPES[kind])

    rows, k = len(data["rows"]), data["k"]
    data["index"] = decode(entries["index"], entries["indexType"]).reshape(len(data["panels"]), rows, k)
    data["value"] = decode(entries["value"], entries["valueType"]).reshape(len(data["panels"]), rows, k)
    data["total"] = decode(entries["total"], entries["valueType"]).reshape(len(data["panels"]), rows)
    data["kept"] = [None if b is None else decode(b, entries["valueType"]) for b in entries["kept"]]
    if "thumbnails" in data:
        data["pixels"] = decode(data["thumbnails"]["pixels"], "u1")
    return data


def panel_map(result, data, p, batch):
    """The result's (R, C) map of panel p of a view: rows and columns as the page lists them."""
    method_index, layer_index, head = data["panels"][p]
    method = data["methods"][method_index]["name"]
    layer = result.layers.index(data["layers"][layer_index])
    full = result.maps[method][layer, batch] if head < 0 else result.head_maps[method][layer, batch, head]
    return full[data["rowIndex"]][:, data["columnIndex"]]


# ------------------------------------------------------------------------------------------ embedded data
@pytest.mark.parametrize("view", views.VIEWS)
def test_every_entry_of_a_short_text_is_embedded_exactly(minilm_result, view):
    res, batch = minilm_result, 0
    n = int(res.attention_mask[batch].sum())
    data = embedded(views.render(res, view, batch=batch))
    assert data["rows"] == res.tokens[batch][:n] and data["rowIndex"] == list(range(n)) and data["k"] == n
    expected_panels = {"tokens": len(MINILM_METHODS) * 6, "head": 2 * 6 * 12, "model": 2 * 6 * 12 + 6}[view]
    assert len(data["panels"]) == expected_panels
    for p in range(len(data["panels"])):
        matrix = panel_map(res, data, p, batch)
        assert (data["index"][p] == np.arange(n)).all()  # every column, in order
        np.testing.assert_array_equal(data["value"][p], matrix.numpy())  # bit-exact float32
        np.testing.assert_allclose(data["total"][p], matrix.double().sum(-1).numpy(), rtol=1e-7)  # float32 of it


def test_padding_is_left_out_and_views_pick_methods_layers_heads(minilm_result):
    res = minilm_result
    short = int(res.attention_mask[0].sum())
    assert short < res.attention_mask.shape[1]  # text 0 is padded in this batch
    data = embedded(views.render(res, "head", method="attn_n", layer=[-1, 2], heads=[5, 0], batch=0))
    assert len(data["rows"]) == len(data["columns"]) == short
    assert [m["name"] for m in data["methods"]] == ["attn_n"] and data["layers"] == [5, 2] and data["heads"] == [5, 0]
    assert data["panels"] == [[0, 0, 5], [0, 0, 0], [0, 1, 5], [0, 1, 0]]
    for p, (_, layer_index, head) in enumerate(data["panels"]):
        layer = data["layers"][layer_index]
        expected = res.head_maps["attn_n"][layer, 0, head, :short, :short]
        np.testing.assert_array_equal(data["value"][p], expected.numpy())
    # a layer-level method in the head view is one panel per layer (head -1)
    data = embedded(views.render(res, "head", method=["attn_w", "attnresln_n"], layer=0, heads=3))
    assert data["panels"] == [[0, 0, 3], [1, 0, -1]]
    np.testing.assert_array_equal(data["value"][1], res.maps["attnresln_n"][0, 0, :short, :short].numpy())


def test_long_texts_embed_the_top_k_entries_of_each_row():
    res = synthetic_result(200, layers=2, heads=2, seed=3)
    data = embedded(views.render(res, "tokens", method="attn_n", top_k=7))
    assert data["k"] == 7
    for p in range(2):
        matrix = panel_map(res, data, p, 0)
        expected = matrix.abs().topk(7, dim=-1)
        # the embedded columns are each row's 7 largest |values| (random maps: no ties), their values exact
        np.testing.assert_array_equal(np.sort(data["index"][p], -1), np.sort(expected.indices.numpy(), -1))
        np.testing.assert_array_equal(data["value"][p], matrix.gather(-1, torch.from_numpy(
            data["index"][p].astype(np.int64))).numpy())
        np.testing.assert_allclose(data["total"][p], matrix.double().sum(-1).numpy(), rtol=1e-7)
    fragment = views.render(res, "tokens", method="attn_n")
    assert embedded(fragment)["k"] == views.DEFAULT_TOP_K  # automatic: 20 of 200
    assert 'data-k="20" data-n="200">Showing the top 20 of 200 entries per row' in fragment


def test_automatic_top_k_keeps_pages_small():
    top_k = views.data.automatic_top_k
    assert top_k(None, panels=100, rows=64, columns=64) == 64  # short texts: everything
    assert top_k(None, panels=3, rows=1000, columns=1000) == 20
    # 8 MiB of base64 = 6 MiB of numbers: 64 bytes per row for 24 maps of 4096 rows, 4 for the total, 6 per entry
    assert top_k(None, panels=24, rows=4096, columns=4096) == 10
    assert top_k(None, panels=24, rows=4096, columns=4096, entry_bytes=10, row_bytes=8) == 5  # float64 maps
    assert top_k(None, panels=144, rows=4096, columns=4096) == 1  # never fewer than one
    assert top_k(500, panels=24, rows=4096, columns=300) == 300  # never more than the columns


def test_a_4096_token_page_stays_under_10_mb():
    """The largest default page: the head view of 2 per-head methods x 2 layers x 4 heads = 16 maps of 4096 rows,
    where the automatic top-k (15 per row) fills the entry budget."""
    res = synthetic_result(4096, layers=2, heads=4, shared=True)
    fragment = views.render(res, "head")
    data = embedded(fragment)
    assert data["k"] == 15 and len(data["panels"]) == 16
    assert len(fragment.encode("utf-8")) < 10 * 2**20
    p = len(data["panels"]) - 1
    matrix = panel_map(res, data, p, 0)
    np.testing.assert_array_equal(np.sort(data["value"][p][-1]), np.sort(matrix[-1].topk(15).values.numpy()))


def test_model_view_thumbnails_are_max_pooled_maps(minilm_result):
    res = minilm_result
    data = embedded(views.render(res, "model", method="attnresln_n", batch=1))
    n = len(data["rows"])
    assert data["thumbnails"]["shape"] == [n, n]  # short texts: one pixel per entry
    pixels = data["pixels"].reshape(len(data["panels"]), n, n)
    for p in range(len(data["panels"])):
        matrix = panel_map(res, data, p, 1)
        np.testing.assert_array_equal(pixels[p], (255 * matrix / matrix.max()).round().to(torch.uint8).numpy())


def test_cross_and_decoder_parts_of_a_seq2seq_result(seq2seq_result):
    res = seq2seq_result
    b = 1
    t, s = int(res.attention_mask[b].sum()), int(res.source_mask[b].sum())
    data = embedded(views.render(res, "tokens", part="cross", batch=b))
    assert data["rows"] == res.tokens[b][:t] and data["columns"] == res.source_tokens[b][:s]
    assert data["square"] is False
    for p, (m, layer_index, _) in enumerate(data["panels"]):
        method = data["methods"][m]["name"]
        full = res.maps[method][layer_index, b, :t]
        np.testing.assert_array_equal(data["value"][p], full[:, :s].numpy())
        if method in ("cross_attnres_n", "cross_attnresln_n", "cross_alti"):  # the kept column is no source token
            np.testing.assert_array_equal(data["kept"][p], full[:, -1].numpy())
        else:
            assert data["kept"][p] is None
    data = embedded(views.render(res, "head", part="cross", layer=-1, batch=b))
    assert [m["name"] for m in data["methods"]] == ["cross_attn_w", "cross_attn_n"]
    for p, (m, _, head) in enumerate(data["panels"]):
        expected = res.head_maps[data["methods"][m]["name"]][1, b, head, :t, :s]
        np.testing.assert_array_equal(data["value"][p], expected.numpy())
    data = embedded(views.render(res, "tokens", part="decoder"))
    assert {m["name"] for m in data["methods"]} == {"attn_w", "attnres_w", "attn_n", "attnres_n", "attnresln_n",
                                                    "alti"}
    data = embedded(views.render(res, "model", part="encoder"))
    assert data["rows"] == res.encoder.tokens[0][:int(res.encoder.attention_mask[0].sum())]


@pytest.fixture(scope="module")
def seq2seq_result():
    """A tiny random Marian with a word tokenizer on two sentence pairs, per-head maps and the encoder included."""
    from test_seq2seq import tiny_seq2seq
    from test_seq2seq_api import SOURCES, TARGETS, word_tokenizer

    return kobattr.analyze(tiny_seq2seq("marian"), SOURCES[:2], targets=TARGETS[:2], tokenizer=word_tokenizer(),
                           methods="all", heads=True, backend="torch")


# ------------------------------------------------------------------------------------------ HTML
class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.ids, self.open = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag not in ("meta", "br", "input"):  # void elements have no end tag
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):  # <line ... />: opened and closed at once
        self.handle_starttag(tag, attrs)
        if tag not in ("meta", "br", "input"):
            self.open.pop()

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()


def parse(document: str) -> _Tags:
    parser = _Tags()
    parser.feed(document)
    parser.close()
    assert parser.open == [], f"unclosed tags {parser.open}"
    return parser


def assert_offline(document: str) -> None:
    """No resource from elsewhere: no src, href or CSS url to another host, no <link>, no fetching script."""
    for tag, attrs in parse(document).tags:
        assert tag != "link", attrs
        for name in ("src", "href", "action", "data"):
            value = attrs.get(name) or ""
            assert not re.match(r"\s*(https?:)?//", value), (tag, name, value)
    assert not re.search(r"url\(|@import|fetch\(|XMLHttpRequest|import\(", document)


def test_repr_html_is_offline_html_with_unique_ids_and_the_mean_ratios(minilm_result):
    first, second = minilm_result._repr_html_(), minilm_result._repr_html_()
    document = f"<!DOCTYPE html><html><body>{first}{second}</body></html>"
    assert_offline(document)
    tags = parse(document)
    assert len(tags.ids) == 2 and len(set(tags.ids)) == 2
    cells = [attrs for tag, attrs in parse(first).tags if tag == "td" and "data-value" in attrs]
    assert len(cells) == 6 * len(MINILM_METHODS)
    for cell in cells:
        layer = minilm_result.layers.index(int(cell["data-layer"]))
        assert float(cell["data-value"]) == float(minilm_result.mean_ratio(cell["data-method"])[layer])
    assert "<script" not in first  # shows in untrusted notebooks too
    assert "<svg" in first and first.count("<polyline") == len(MINILM_METHODS)


def test_two_views_in_one_document_have_unique_ids(minilm_result):
    document = "".join(views.render(minilm_result, view) for view in ("head", "head", "tokens"))
    tags = parse(document)
    assert len(tags.ids) == 3 and len(set(tags.ids)) == 3
    for root in tags.ids:  # each script finds its own view by its id
        assert document.count(f'"{root}"') == 2


@pytest.mark.parametrize("view", views.VIEWS)
def test_views_are_injection_safe_and_offline(view):
    res = synthetic_result(4)
    res.tokens = [["</script><b>x", "{{DATA}}", "<!--", "a&amp;b"]]
    page = views.page(views.render(res, view, title="<i>t</i>"), "<i>t</i>")
    assert_offline(page)
    assert "<b>" not in page and "<!--" not in page and "<i>t</i>" not in page and "&lt;i&gt;t&lt;/i&gt;" in page
    assert page.count("<script") == page.count("</script>") == 2
    assert embedded(page)["rows"] == res.tokens[0]  # the JSON gives the tokens back as they were


def test_save_html_writes_each_view_as_a_standalone_page(minilm_result, tmp_path):
    for view in views.VIEWS:
        path = minilm_result.save_html(tmp_path / "pages" / f"{view}.html", view=view, layer=-1)
        page = path.read_text(encoding="utf-8")
        assert page.startswith("<!DOCTYPE html>") and f'class="kv-root kv-{view}"' in page
        assert embedded(page)["layers"] == [5]
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == ["head.html", "model.html", "tokens.html"]


def test_show_displays_in_a_notebook_kernel_and_writes_a_page_elsewhere(minilm_result, monkeypatch, capsys):
    shown = []
    kernel_shell = types.SimpleNamespace(kernel=object())
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: kernel_shell
    display = types.ModuleType("IPython.display")
    display.HTML = lambda text: ("HTML", text)
    display.display = shown.append
    monkeypatch.setitem(sys.modules, "IPython", fake)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    assert minilm_result.show("head", layer=0) is None
    ((kind, fragment),) = shown
    assert kind == "HTML" and fragment.startswith('<div class="kv-root kv-head"')

    fake.get_ipython = lambda: None  # IPython installed, but no kernel: a plain script
    path = minilm_result.show("tokens")
    assert path.is_file() and embedded(path.read_text(encoding="utf-8"))["view"] == "tokens"
    assert capsys.readouterr().out.strip() == (f"kobattr: not in a notebook, so the tokens view was written to {path}; "
                                               "open it in a browser.")
    path.unlink()


# ------------------------------------------------------------------------------------------ refusals
def test_views_refuse_what_they_cannot_show_with_a_sentence(minilm_result, seq2seq_result):
    res = minilm_result
    cases = [
        (dict(view="graph"), r"unknown view 'graph'; choose tokens, head, model\."),
        (dict(method="atbff"), r"method 'atbff' is not among the methods of this result: attn_w, attn_n, "
                               r"attnresln_n\."),
        (dict(layer=7), r"layer 7 was not analysed; the result holds layers \[0, 1, 2, 3, 4, 5\]"),
        (dict(layer=[]), r"layer must be one int or a non-empty list of them, got \[\]\."),
        (dict(view="head", heads=12), r"head 12 does not exist; the layers have 12 heads \(0\.\.11\)\."),
        (dict(heads=0), r"heads= chooses heads of per-head maps.*the tokens view shows layer-level maps"),
        (dict(batch=2), r"batch must be the index of one of the result's 2 text\(s\) \(0\.\.1\), got 2\."),
        (dict(top_k=0), r"top_k must be a positive number of entries per row, got 0\."),
        (dict(part="cross"), r"part='cross' is for encoder-decoder results"),
    ]
    for options, message in cases:
        options = {"view": "tokens", **options}
        with pytest.raises(ValueError, match=message):
            views.render(res, options.pop("view"), **options)
    no_heads = synthetic_result(5)
    no_heads.head_maps = {}
    with pytest.raises(ValueError, match=r"the head view needs per-head maps.*analyze\(\.\.\., heads=True\)"):
        views.render(no_heads, "head")
    with pytest.raises(ValueError, match=r"unknown part 'source'; an encoder-decoder result has parts encoder, "):
        views.render(seq2seq_result, "tokens", part="source")
    with pytest.raises(ValueError, match=r"method 'decoder_layer' is not among the methods of the decoder maps: "
                                         r"attn_w, attnres_w, attn_n, attnres_n, attnresln_n, alti\."):
        views.render(seq2seq_result, "tokens", method="decoder_layer")
    with pytest.raises(ValueError, match=r"is contracted .* analyze without contract=\."):
        views.render(dataclasses.replace(synthetic_result(4), contracted=True), "tokens")


# ------------------------------------------------------------------------------------------ kobattr view
def test_cli_view_writes_an_index_and_every_view(minilm_result, tmp_path, capsys):
    saved = minilm_result.save(tmp_path / "run" / "attribution")
    assert cli_main(["view", str(saved)]) == 0
    out = tmp_path / "run" / "attribution_view"
    index = out / "index.html"
    assert capsys.readouterr().out.strip() == f"wrote {index}"
    pages = sorted(f"text{b:03d}_{view}.html" for b in range(2) for view in views.VIEWS)
    assert sorted(p.name for p in out.iterdir()) == sorted(pages + ["index.html"])
    links = [attrs["href"] for tag, attrs in parse(index.read_text(encoding="utf-8")).tags if tag == "a"]
    assert sorted(links) == pages
    data = embedded((out / "text001_head.html").read_text(encoding="utf-8"))
    np.testing.assert_array_equal(data["value"][0], minilm_result.head_maps["attn_w"][0, 1, 0].numpy())

    assert cli_main(["view", str(saved), "--out", str(tmp_path / "one"), "--view", "head", "--method", "attn_n",
                     "--layer", "-1", "--heads", "2", "--batch", "1", "--top-k", "3"]) == 0
    (page,) = [p for p in (tmp_path / "one").iterdir() if p.name != "index.html"]
    assert page.name == "text001_head.html"
    data = embedded(page.read_text(encoding="utf-8"))
    assert data["k"] == 3 and data["layers"] == [5] and data["heads"] == [2]


def test_cli_view_of_a_seq2seq_result_writes_each_part(seq2seq_result, tmp_path, capsys):
    saved = seq2seq_result.save(tmp_path / "pairs")
    assert cli_main(["view", str(saved), "--out", str(tmp_path / "site"), "--batch", "0"]) == 0
    names = sorted(p.name for p in (tmp_path / "site").iterdir())
    assert names == sorted(["index.html"] + [f"text000_{part}_{view}.html" for part in ("encoder", "decoder", "cross")
                                             for view in views.VIEWS])


def test_cli_view_refuses_bad_input_in_one_line(tmp_path, capsys, minilm_result):
    assert cli_main(["view", str(tmp_path / "missing.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == (f"kobattr view: error: {tmp_path / 'missing.safetensors'} does not "
                                               "exist (Attribution.save writes <name>.safetensors).")
    saved = minilm_result.save(tmp_path / "r")
    assert cli_main(["view", str(saved), "--layer", "9"]) == 2
    assert capsys.readouterr().err.startswith("kobattr view: error: layer 9 was not analysed")
