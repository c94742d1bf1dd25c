"""heads.html, the head view of `kobattr heads` (kobattr.views.headview, kobattr.analyses.heads.write_head_view):
the page embeds exactly the results file, and in Chromium (the fixture pattern of test_views_browser.py) every grid cell, side-panel value and MDS point
is the results file's number. One results dict per module, from kobattr's real analyses on a tiny masked-LM BERT
with MiniLM's tokenizer over the shipped CoNLL-U and CorefUD samples."""

import copy
import json
import re

import pytest
import torch

from kobattr.analyses import clustering, coref, gradient, heads
from kobattr.views import headview

PWN = "</script><script>window.pwned=1</script>"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """write_report's folder for a tiny BertForMaskedLM with every per-head part (gradient, coreference, clustering)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from kobattr.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=160, attn_implementation="eager")
    model = BertForMaskedLM(config).eval()
    sentences = heads.read_conllu(heads.sample_conllu_path(), limit=4)
    texts = [s.text for s in sentences]
    results = heads.head_statistics(model, tokenizer, sentences=sentences, backend="torch", verify=0)
    results["coreference"] = coref.coreference_heads(model, tokenizer, coref.read_corefud(coref.sample_coref_path()),
                                                     backend="torch", verify=0)
    results["clustering"] = clustering.add_mds(clustering.head_distances(model, tokenizer, texts, backend="torch",
                                                                         verify=0))
    results["gradient"] = gradient.gradient_importance(model, tokenizer, texts)
    out = tmp_path_factory.mktemp("heads")
    written = heads.write_report(results, out)
    assert heads.HEAD_VIEW in written
    return out


@pytest.fixture(scope="module")
def results(run_dir):
    return json.loads((run_dir / "results.json").read_text(encoding="utf-8"))


def embedded(page_html: str) -> dict:
    """The JSON inside the page's <script type="application/json">, parsed back."""
    match = re.search(r'<script type="application/json" class="kv-data">(.*?)</script>', page_html, re.S)
    return json.loads(match.group(1))


def at(results, path):
    for key in path:
        results = results[key]
    return results


def test_page_embeds_exactly_the_results_file(run_dir, results):
    data = embedded((run_dir / "heads.html").read_text(encoding="utf-8"))
    assert data["results"] == results
    stats = data["statistics"]
    assert stats == heads.head_view_statistics(results)
    assert headview.render(results, stats) == (run_dir / "heads.html").read_text(encoding="utf-8")
    labels = [(s["group"], s["label"]) for s in stats]
    assert len(set(labels)) == len(labels)  # (the gradient run's mean alpha is also a no-op statistic's label)
    # every per-head part is offered: section 8, gradient (quantity x category), coreference (per mention type)
    groups = {s["group"] for s in stats}
    assert groups == {"head statistics", "no-op evidence", "gradient importance", "coreference"}
    n_grad = sum(len(v) for v in results["gradient"]["per_head"].values())
    assert sum(s["group"] == "gradient importance" for s in stats) == n_grad
    assert sum(s["group"] == "coreference" for s in stats) == len(results["coreference"]["accuracy"]["weights"])
    for s in stats:
        layers = at(results, s["layers"])
        for path in s["paths"].values():
            grid = at(results, path)
            assert len(grid) == len(layers) and all(len(row) == 4 for row in grid), s["label"]


def test_a_results_dict_without_per_head_statistics_is_refused():
    with pytest.raises(ValueError, match="no per-head statistic"):
        heads.write_head_view({"model": {"name": "x"}}, "unused.html")


# ------------------------------------------------------------------------------------- in Chromium
from test_views_browser import browser  # noqa: E402,F401  (the one chromium fixture: skips, or fails under CI)


@pytest.fixture
def open_page(browser):
    """open_page(path or html) -> the rendered page; fails the test on any script error."""
    opened = []

    def open_(source):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        if isinstance(source, str):
            page.set_content(source)
        else:
            page.goto(source.as_uri())
        page.wait_for_function("document.querySelector('.kv-root').dataset.ready === 'true'")
        opened.append((page, errors))
        return page

    yield open_
    for page, errors in opened:
        page.close()
        assert errors == [], errors


CELLS = "els => els.map(e => [Number(e.dataset.layer), Number(e.dataset.head), e.dataset.value])"


def expected_cells(results, layers, grid):
    return [(layer, h + 1, "" if v is None else v) for layer, row in zip(layers, grid) for h, v in enumerate(row)]


def shown_cells(page, selector):
    return [(layer, head, float(v) if v != "" else "") for layer, head, v in
            page.eval_on_selector_all(selector, CELLS)]


def test_every_statistic_shows_its_grid_and_the_toggle_switches_weights_and_norms(run_dir, results, open_page):
    page = open_page(run_dir / "heads.html")
    stats = embedded((run_dir / "heads.html").read_text(encoding="utf-8"))["statistics"]
    for index, stat in enumerate(stats):
        page.select_option(".kv-stat", str(index))
        layers = at(results, stat["layers"])
        kinds = list(stat["paths"])
        assert page.is_disabled(".kv-kind") == (kinds == ["value"])
        for kind in kinds:
            if kind != "value":
                page.select_option(".kv-kind", kind)
            assert page.get_attribute(".kv-heatmap", "data-kind") == kind
            cells = shown_cells(page, "td.kv-hcell")
            assert len(cells) == len(layers) * 4
            assert cells == expected_cells(results, layers, at(results, stat["paths"][kind])), (stat["label"], kind)
    # the weights and norms grids of a statistic differ, so the toggle is seen to switch
    page.select_option(".kv-stat", "0")
    page.select_option(".kv-kind", "weights")
    weights = shown_cells(page, "td.kv-hcell")
    page.select_option(".kv-kind", "norms")
    assert shown_cells(page, "td.kv-hcell") != weights
    assert page.get_attribute("td.kv-hcell", "title").startswith("layer 1, head 1: ")


def test_clicking_a_head_shows_all_its_values_weights_and_norms_side_by_side(run_dir, results, open_page, tmp_path):
    page = open_page(run_dir / "heads.html")
    stats = embedded((run_dir / "heads.html").read_text(encoding="utf-8"))["statistics"]
    layer, head = 2, 3
    page.click(f"td.kv-hcell[data-layer='{layer}'][data-head='{head}']")
    assert page.text_content(".kv-picked-title") == f"layer {layer}, head {head}"
    assert page.get_attribute("td.kv-hcell.kv-picked", "data-layer") == str(layer)
    rows = page.eval_on_selector_all("table.kv-values tr[data-stat]", """rows => rows.map(r => [r.dataset.stat,
        [...r.querySelectorAll('td')].map(c => [c.dataset.kind, c.dataset.value])])""")
    assert [r[0] for r in rows] == [s["id"] for s in stats]
    for (sid, values), stat in zip(rows, stats):
        li = at(results, stat["layers"]).index(layer)
        want = [(k, at(results, p)[li][head - 1]) for k, p in stat["paths"].items()]
        assert [(k, float(v) if v != "" else None) for k, v in values] == want, stat["label"]
    # the relations whose best head (weights) it is
    dep = results["dependency"]["weights"]
    rel, best = next(iter(dep.items()))
    page.click(f"td.kv-hcell[data-layer='{best['dep_to_head']['layer']}'][data-head='{best['dep_to_head']['head']}']")
    assert f"{rel} (dep to head, weights" in page.text_content(".kv-best")
    page.screenshot(path=tmp_path / "heads.png", full_page=True)


def test_mds_scatter_has_every_head_and_shares_the_selection(run_dir, results, open_page):
    page = open_page(run_dir / "heads.html")
    part = results["clustering"]
    for kind in part["kinds"]:
        page.select_option(".kv-mds-kind", kind)
        points = page.eval_on_selector_all("svg.kv-mds circle", """els => els.map(e => [Number(e.dataset.layer),
            Number(e.dataset.head), Number(e.dataset.x), Number(e.dataset.y), e.dataset.label])""")
        assert len(points) == len(part["layers"]) * part["heads"] == 12
        assert [p[2:4] for p in points] == part["mds"][kind]
        assert [p[4] for p in points] == part["labels"] == [f"{a}-{b}" for a, b, *_ in points]
        fills = page.eval_on_selector_all("svg.kv-mds circle", "els => els.map(e => e.getAttribute('fill'))")
        assert len(set(fills)) == len(part["layers"])  # one colour per layer
    page.click("svg.kv-mds circle[data-layer='3'][data-head='2']")
    assert page.text_content(".kv-picked-title") == "layer 3, head 2"
    assert page.get_attribute("td.kv-hcell.kv-picked", "data-head") == "2"
    assert page.get_attribute("svg.kv-mds circle.kv-picked", "data-layer") == "3"


def test_text_from_the_results_cannot_run_script_and_shows_literally(results, open_page, tmp_path):
    evil = copy.deepcopy(results)
    evil["model"]["name"] = PWN
    rel = next(iter(evil["dependency"]["weights"]))
    for kind in ("weights", "norms"):
        evil["dependency"][kind] = {PWN: evil["dependency"][kind][rel]}
    evil["clustering"]["labels"][0] = PWN
    path = heads.write_head_view(evil, tmp_path / "evil.html")
    assert embedded(path.read_text(encoding="utf-8"))["results"] == evil
    page = open_page(path)
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.title() == f"kobattr heads: {PWN}"
    assert page.text_content(".kv-title") == f"kobattr heads: {PWN}"
    best = evil["dependency"]["weights"][PWN]["dep_to_head"]
    page.click(f"td.kv-hcell[data-layer='{best['layer']}'][data-head='{best['head']}']")
    assert f"{PWN} (dep to head, weights" in page.text_content(".kv-best")
    assert page.get_attribute("svg.kv-mds circle", "data-label") == PWN
    assert page.text_content("svg.kv-mds circle title") == f"head {PWN} (layer-head)"
    assert page.evaluate("typeof window.pwned") == "undefined"
