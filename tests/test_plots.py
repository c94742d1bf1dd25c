"""kobattr.plots: PNGs that read back as images, labels and data that match the input, safe HTML."""

import io
import json
import re

import matplotlib.image
import numpy as np
import pytest
import torch

from kobattr import plots

TOKENS = ["<s>", "The", "Ġcat", r"$\q$", "</script><b>x", "."]  # "$\q$" is invalid mathtext
DATA_SCRIPT = re.compile(r'<script type="application/json" id="kobattr-data">(.*?)</script>', re.S)


def attention_like(layers: int, n: int, seed: int = 0) -> np.ndarray:
    """(L, N, N) causal rows that sum to 1, like attention weights."""
    logits = np.random.default_rng(seed).normal(size=(layers, n, n))
    logits[:, np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] = -np.inf
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def assert_png(path, min_side=200):
    assert path.stat().st_size > 0
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= min_side, image.shape
    assert image[..., :3].std() > 0  # something was drawn, not a blank canvas


def tick_texts(labels):
    return [label.get_text() for label in labels]


def test_heatmap_png_with_token_labels(tmp_path):
    matrix = torch.tensor(attention_like(1, len(TOKENS))[0], dtype=torch.float32)
    figure = plots.heatmap(matrix, TOKENS, path=tmp_path / "map.png", title="layer 3 - attnresln_n")
    assert_png(tmp_path / "map.png")
    ax = figure.axes[0]
    assert tick_texts(ax.get_xticklabels()) == TOKENS
    assert tick_texts(ax.get_yticklabels()) == TOKENS
    assert ax.get_title() == "layer 3 - attnresln_n"
    assert len(figure.axes) == 2  # the map and its colorbar


def test_heatmap_rows_subset_and_existing_axes(tmp_path):
    from matplotlib.figure import Figure

    ax = Figure(figsize=(6, 3)).add_subplot()
    matrix = attention_like(1, len(TOKENS))[0][[2, 4]]
    figure = plots.heatmap(matrix, TOKENS, ax=ax, row_tokens=[TOKENS[2], TOKENS[4]])
    assert figure is ax.figure
    assert tick_texts(ax.get_yticklabels()) == [TOKENS[2], TOKENS[4]]
    figure.savefig(io.BytesIO(), format="png")  # r"$\q$" must draw as text, not fail as mathtext


def test_heatmap_hides_labels_for_many_tokens():
    n = plots.MAX_LABELLED_TOKENS + 1
    figure = plots.heatmap(np.eye(n), [f"t{i}" for i in range(n)])
    assert figure.axes[0].get_xticklabels() == [] and figure.axes[0].get_yticklabels() == []


def test_heatmap_shortens_long_and_invisible_tokens():
    tokens = ["a" * 40, "\n", " "]
    labels = tick_texts(plots.heatmap(np.eye(3), tokens).axes[0].get_xticklabels())
    assert labels[0] == "a" * (plots.MAX_LABEL_CHARS - 1) + "…"
    assert labels[1:] == ["\\n", "␣"]


def test_heatmap_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="tokens has 3 tokens but the map has 4 columns"):
        plots.heatmap(np.eye(4), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"2-D \(R, N\)"):
        plots.heatmap(np.ones((2, 4, 4)), ["a", "b", "c", "d"])


def test_layer_grid(tmp_path):
    maps = {"attn_w": attention_like(3, len(TOKENS)), "attn_n": torch.tensor(2 * attention_like(3, len(TOKENS), 1))}
    figure = plots.layer_grid(maps, TOKENS, tmp_path / "grid.png", layers=[1, 3])
    assert_png(tmp_path / "grid.png")
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["layer 1 - attn_w", "layer 3 - attn_w", "layer 1 - attn_n", "layer 3 - attn_n"]
    bottom_left = next(ax for ax in figure.axes if ax.get_title() == "layer 1 - attn_n")
    assert tick_texts(bottom_left.get_xticklabels()) == TOKENS


def test_layer_grid_rejects_bad_choices(tmp_path):
    maps = {"attn_w": attention_like(2, 3)}
    with pytest.raises(ValueError, match="numbered from 1"):
        plots.layer_grid(maps, ["a", "b", "c"], tmp_path / "g.png", layers=[0])
    with pytest.raises(ValueError, match="not in maps"):
        plots.layer_grid(maps, ["a", "b", "c"], tmp_path / "g.png", methods=["attn_n"])
    with pytest.raises(ValueError, match="all methods must share L and N"):
        plots.layer_grid({**maps, "attn_n": attention_like(3, 3)}, ["a", "b", "c"], tmp_path / "g.png")


def test_mixing_ratio_plot(tmp_path):
    ratios = {"attnres_n": torch.linspace(0.1, 0.4, 6), "attnresln_n": np.linspace(0.05, 0.2, 6)}
    spread = {"attnres_n": np.stack([np.linspace(0.05, 0.3, 6), np.linspace(0.2, 0.5, 6)], axis=1)}
    figure = plots.mixing_ratio_plot(ratios, path=tmp_path / "ratio.png", title="mixing", spread=spread)
    assert_png(tmp_path / "ratio.png")
    ax = figure.axes[0]
    for line, values in zip(ax.lines, ratios.values()):
        np.testing.assert_allclose(line.get_xdata(), np.arange(1, 7))
        np.testing.assert_allclose(line.get_ydata(), 100 * np.asarray(values, dtype=np.float64))
    assert [text.get_text() for text in ax.get_legend().get_texts()] == list(ratios)
    assert ax.get_ylim() == (0, 100)
    assert len(ax.collections) == 1  # one shaded band, for the method given a spread


def test_mixing_ratio_plot_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"must be 1-D \(L,\)"):
        plots.mixing_ratio_plot({"a": np.ones((3, 2))})
    with pytest.raises(ValueError, match=r"spread\['a'\] must have shape \(3, 2\)"):
        plots.mixing_ratio_plot({"a": np.ones(3)}, spread={"a": np.ones((3, 3))})


def read_report(path):
    page = path.read_text(encoding="utf-8")
    (data_text,) = DATA_SCRIPT.findall(page)
    return page, json.loads(data_text)


def test_html_report_embeds_data(tmp_path):
    maps = {"attn_w": attention_like(3, len(TOKENS)),
            "attn_n": torch.tensor(123.456 * attention_like(3, len(TOKENS), 1))}
    ratios = {"attnres_n": np.random.default_rng(2).uniform(size=(3, len(TOKENS)))}
    path = plots.html_report(maps, TOKENS, tmp_path / "report.html", title="demo", ratios=ratios)
    page, data = read_report(path)
    assert data["tokens"] == TOKENS and data["methods"] == ["attn_w", "attn_n"]
    for method, values in maps.items():
        np.testing.assert_allclose(np.array(data["maps"][method]), np.asarray(values), rtol=5e-4, atol=1e-12)
    np.testing.assert_allclose(np.array(data["ratios"]["attnres_n"]), ratios["attnres_n"], rtol=5e-4)
    assert "<title>demo</title>" in page


def test_html_report_is_injection_safe_and_self_contained(tmp_path):
    path = plots.html_report({"attn_w": attention_like(1, len(TOKENS))}, TOKENS, tmp_path / "r.html",
                             title="<i>t</i>")
    page, data = read_report(path)
    assert data["tokens"][4] == "</script><b>x"
    assert "<b>x" not in page and "<i>t</i>" not in page
    assert "&lt;i&gt;t&lt;/i&gt;" in page
    assert page.count("<script") == page.count("</script>") == 2
    assert "src=" not in page and "<link" not in page and "http" not in page


def test_html_report_writes_nan_as_null(tmp_path):
    maps = {"attn_n": np.array([[[1.0, np.nan], [np.inf, 2.0]]])}
    _, data = read_report(plots.html_report(maps, ["a", "b"], tmp_path / "r.html"))
    assert data["maps"]["attn_n"] == [[[1, None], [None, 2]]]


def test_html_report_rejects_bad_shapes(tmp_path):
    maps = {"attn_w": attention_like(2, 3)}
    with pytest.raises(ValueError, match="tokens has 2 tokens but the map has 3 columns"):
        plots.html_report(maps, ["a", "b"], tmp_path / "r.html")
    with pytest.raises(ValueError, match=r"ratios\['x'\] must have shape \(L, N\) = \(2, 3\)"):
        plots.html_report(maps, ["a", "b", "c"], tmp_path / "r.html", ratios={"x": np.ones(3)})


def test_html_report_of_rectangular_maps_labels_rows_and_columns(tmp_path):
    """Cross maps (L, T, C): rows are the target tokens, columns the source tokens (and the kept column)."""
    import json

    maps = {"cross_attn_n": torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)}
    page = plots.html_report(maps, ["t0", "t1", "t2"], tmp_path / "cross.html",
                             column_tokens=["s0", "s1", "s2", "[kept]"]).read_text(encoding="utf-8")
    data = json.loads(page.split('id="kobattr-data">')[1].split("</script>")[0])
    assert data["tokens"] == ["t0", "t1", "t2"] and data["columns"] == ["s0", "s1", "s2", "[kept]"]
    assert data["square"] is False and data["maps"]["cross_attn_n"][1][2] == [20, 21, 22, 23]
    with pytest.raises(ValueError, match="column_tokens has 3 tokens but the map has 4 columns"):
        plots.html_report(maps, ["t0", "t1", "t2"], tmp_path / "bad.html", column_tokens=["s0", "s1", "s2"])
