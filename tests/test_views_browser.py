"""The views in a real browser: Debian's chromium driven by Playwright (no browser download). Each test opens a page
written from a real result, clicks tokens, heads and maps, and checks that every value the page shows (data-value,
String(x) of the embedded number) equals the result's tensor entry exactly; a screenshot of each view goes to the
test's tmp_path. Without chromium or playwright the tests skip, except under CI (CI=true), where they fail."""

import os
import shutil

import pytest
from test_views import MINILM_METHODS, minilm_analysis, synthetic_result

from kobattr import views

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]
EDGES = "els => els.map(e => [e.dataset.head, e.dataset.row, e.dataset.column, e.dataset.value])"


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}, and under CI (CI=true) the browser tests must run, not skip.")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright; it drives the system's chromium)")
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(executable):
        _unavailable("Debian's chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser):
    """open_page(path or html) -> a page with every view on it rendered; fails the test on any script error."""
    opened = []

    def open_(source):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        if isinstance(source, str):
            page.set_content(source)
        else:
            page.goto(source.as_uri())
        page.wait_for_function("[...document.querySelectorAll('.kv-root')].every(r => r.dataset.ready)")
        opened.append((page, errors))
        return page

    yield open_
    for page, errors in opened:
        page.close()
        assert errors == [], errors


@pytest.fixture(scope="module")
def minilm_result():
    return minilm_analysis()


def screenshot(page, path):
    page.screenshot(path=path, full_page=True)
    assert path.stat().st_size > 1000


def length(result, batch):
    return int(result.attention_mask[batch].sum())


def test_tokens_view_shows_every_layers_row_of_the_clicked_token(minilm_result, open_page, tmp_path):
    res, b = minilm_result, 1
    n = length(res, b)
    page = open_page(res.save_html(tmp_path / "tokens.html", view="tokens", batch=b))
    for m, method in enumerate(MINILM_METHODS):
        if m:
            page.select_option(".kv-method", str(m))
        i = 3 + m  # another token for each method
        page.click(f".kv-sentence .kv-row[data-index='{i}']")
        assert page.get_attribute(".kv-sentence .kv-selected", "data-index") == str(i)
        rows = page.eval_on_selector_all("tr.kv-layer", """rows => rows.map(r => [r.dataset.layer,
            r.querySelector('.kv-ratio').dataset.value, r.querySelector('.kv-total').dataset.value,
            [...r.querySelectorAll('.kv-cell')].map(c => [c.dataset.index, c.dataset.value])])""")
        assert [int(layer) for layer, *_ in rows] == list(res.layers)
        for layer, ratio, total, cells in rows:
            li = res.layers.index(int(layer))
            assert [int(j) for j, _ in cells] == list(range(n))
            assert [float(v) for _, v in cells] == res.maps[method][li, b, i, :n].tolist()  # exact float32 values
            assert float(ratio) == float(res.ratios[method][li, b, i])
            # summed in float64, embedded as float32
            assert float(total) == pytest.approx(float(res.maps[method][li, b, i, :n].double().sum()), rel=1e-7)
        screenshot(page, tmp_path / f"tokens_{method}.png")


def test_head_view_lines_are_the_head_maps_of_the_chosen_layer(minilm_result, open_page, tmp_path):
    res, b = minilm_result, 0
    n, H = length(res, b), res.head_maps["attn_w"].shape[2]
    page = open_page(res.save_html(tmp_path / "head.html", view="head", layer=[2, 3], batch=b))
    assert page.locator(".kv-panel[data-method='attn_w'] line.kv-edge").count() == H * n * n  # every head and row
    page.click(".kv-head[data-head='5']")  # hide head 5
    i = 3
    page.click(f".kv-panel[data-method='attn_n'] text.kv-row[data-index='{i}']")
    for layer in (3, 2):  # opens at the last embedded layer
        if layer == 2:
            page.select_option(".kv-layer", "0")
        for method in ("attn_w", "attn_n"):
            panel = f".kv-panel[data-method='{method}']"
            lines = page.eval_on_selector_all(f"{panel} line.kv-edge", EDGES)
            assert sorted((int(h), int(j)) for h, _, j, _ in lines) == [(h, j) for h in range(H) if h != 5
                                                                         for j in range(n)]
            scale = 1.0 if method == "attn_w" else float(res.head_maps[method][layer, b, :, :n, :n].abs().max())
            opacities = page.eval_on_selector_all(f"{panel} line.kv-edge", "els => els.map(e => "
                                                  "e.getAttribute('stroke-opacity'))")
            for (h, row, j, value), opacity in zip(lines, opacities):
                assert int(row) == i and float(value) == float(res.head_maps[method][layer, b, int(h), i, int(j)])
                assert float(opacity) == min(1.0, abs(float(value)) / scale)  # weights as they are, norms scaled
    screenshot(page, tmp_path / "head_focused.png")
    page.click(".kv-head[data-head='5']")  # head 5 back
    column = 2
    page.click(f".kv-panel[data-method='attn_w'] text.kv-column[data-index='{column}']")  # lines into a key token
    lines = page.eval_on_selector_all(".kv-panel[data-method='attn_w'] line.kv-edge", EDGES)
    assert sorted((int(h), int(r)) for h, r, _, _ in lines) == [(h, r) for h in range(H) for r in range(n)]
    for h, r, j, value in lines:
        assert int(j) == column and float(value) == float(res.head_maps["attn_w"][2, b, int(h), int(r), column])
    screenshot(page, tmp_path / "head_column.png")


def test_model_view_opens_a_head_and_a_layer_level_map(minilm_result, open_page, tmp_path):
    res, b = minilm_result, 1
    n = length(res, b)
    page = open_page(res.save_html(tmp_path / "model.html", view="model", batch=b))
    assert page.locator(".kv-grid[data-method='attn_n'] canvas.kv-thumb").count() == 6 * 12
    assert page.locator(".kv-grid[data-method='attnresln_n'] canvas.kv-thumb").count() == 6  # a strip of layers
    page.click("canvas.kv-thumb[data-method='attn_n'][data-layer='4'][data-head='7']")
    detail = page.locator(".kv-detail")
    assert [detail.get_attribute(a) for a in ("data-method", "data-layer", "data-head")] == ["attn_n", "4", "7"]
    i = 5
    page.click(f".kv-detail text.kv-row[data-index='{i}']")
    lines = page.eval_on_selector_all(".kv-detail line.kv-edge", EDGES)
    assert [int(j) for _, _, j, _ in lines] == list(range(n))
    assert [float(v) for *_, v in lines] == res.head_maps["attn_n"][4, b, 7, i, :n].tolist()
    screenshot(page, tmp_path / "model_head.png")
    page.click("canvas.kv-thumb[data-method='attnresln_n'][data-layer='2']")
    column = 1
    page.click(f".kv-detail text.kv-column[data-index='{column}']")
    lines = page.eval_on_selector_all(".kv-detail line.kv-edge", EDGES)
    assert {h for h, *_ in lines} == {"-1"} and [int(r) for _, r, _, _ in lines] == list(range(n))
    assert [float(v) for *_, v in lines] == res.maps["attnresln_n"][2, b, :n, column].tolist()
    screenshot(page, tmp_path / "model_layer.png")


def test_views_in_one_notebook_do_not_clash_however_it_runs_their_scripts(minilm_result, open_page):
    """Two head views of different layers on one page: as a page holds them, as JupyterLab inserts an output
    (innerHTML, then each script re-created in place) and as the classic Notebook does (scripts run before the
    output is attached)."""
    res = minilm_result
    first, second = views.render(res, "head", layer=1), views.render(res, "head", layer=4)
    lab, classic = views.render(res, "head", layer=0), views.render(res, "tokens")
    page = open_page(views.page(first + second, "two views"))
    page.evaluate("""([lab, classic]) => {
        const host = document.createElement("div");
        host.innerHTML = lab;  // JupyterLab: re-create each script where it was
        host.querySelectorAll("script").forEach(old => {
            const script = document.createElement("script");
            [...old.attributes].forEach(a => script.setAttribute(a.name, a.value));
            script.textContent = old.textContent;
            old.replaceWith(script);
        });
        document.body.appendChild(host);
        const output = document.createElement("div");
        output.innerHTML = classic;  // the classic Notebook: run the code now, attach the output later
        output.querySelectorAll("script:not([type])").forEach(old => {
            const script = document.createElement("script");
            script.textContent = old.textContent;
            document.head.appendChild(script).remove();
        });
        setTimeout(() => document.body.appendChild(output), 120);
    }""", [lab, classic])
    page.wait_for_function("document.querySelectorAll('.kv-root[data-ready]').length === 4")
    roots = page.locator(".kv-root")
    ids = [roots.nth(k).get_attribute("id") for k in range(4)]
    assert len(set(ids)) == 4
    n = length(res, 0)
    page.click(f"#{ids[0]} .kv-panel[data-method='attn_w'] text.kv-row[data-index='2']")
    for root, layer, focused in ((ids[0], 1, True), (ids[1], 4, False), (ids[2], 0, False)):
        lines = page.eval_on_selector_all(f"#{root} .kv-panel[data-method='attn_w'] line.kv-edge", EDGES)
        assert len(lines) == (12 * n if focused else 12 * n * n)  # a click in one view leaves the others alone
        for h, r, j, value in lines[:50]:
            assert float(value) == float(res.head_maps["attn_w"][layer, 0, int(h), int(r), int(j)])
    page.click(f"#{ids[3]} .kv-sentence .kv-row[data-index='1']")
    assert page.locator(f"#{ids[3]} tr.kv-layer").count() == 6


def test_range_selector_and_top_k_of_a_long_text(open_page, tmp_path):
    res = synthetic_result(200, layers=2, heads=2, seed=5)
    page = open_page(res.save_html(tmp_path / "range.html", view="tokens", method="attn_n"))
    note = page.locator(".kv-note")
    assert (note.get_attribute("data-k"), note.get_attribute("data-n")) == ("20", "200")
    assert "Showing the top 20 of 200 entries per row" in note.inner_text()
    shown = page.eval_on_selector_all(".kv-sentence .kv-row", "els => els.map(e => Number(e.dataset.index))")
    assert shown == list(range(64))
    page.fill(".kv-from", "100")
    page.dispatch_event(".kv-from", "change")
    shown = page.eval_on_selector_all(".kv-sentence .kv-row", "els => els.map(e => Number(e.dataset.index))")
    assert shown == list(range(100, 164))
    i = 120
    page.click(f".kv-sentence .kv-row[data-index='{i}']")  # leaving the field fires its change event once more
    assert page.get_attribute(".kv-sentence .kv-selected", "data-index") == str(i)
    rows = page.eval_on_selector_all("tr.kv-layer", """rows => rows.map(r => [
        r.querySelector('.kv-total').dataset.value,
        [...r.querySelectorAll('.kv-cell')].map(c => [Number(c.dataset.index), c.dataset.value ?? null])])""")
    for layer, (total, cells) in enumerate(rows):
        row = res.maps["attn_n"][layer, 0, i]
        top = set(row.abs().topk(20).indices.tolist())
        assert [j for j, _ in cells] == list(range(100, 164))
        assert {j for j, v in cells if v is not None} == top & set(range(100, 164))  # the others are not embedded
        for j, value in cells:
            if value is not None:
                assert float(value) == float(row[j])
        assert float(total) == pytest.approx(float(row.double().sum()), rel=1e-7)  # the whole row's total
    page.click(".kv-next")
    shown = page.eval_on_selector_all(".kv-sentence .kv-row", "els => els.map(e => Number(e.dataset.index))")
    assert shown == list(range(164, 200))
    screenshot(page, tmp_path / "range.png")


@pytest.fixture(scope="module")
def seq2seq_result():
    from test_seq2seq import tiny_seq2seq
    from test_seq2seq_api import SOURCES, TARGETS, word_tokenizer

    import kobattr

    return kobattr.analyze(tiny_seq2seq("marian"), SOURCES[:2], targets=TARGETS[:2], tokenizer=word_tokenizer(),
                           methods="all", heads=True, backend="torch")


def test_cross_view_of_a_seq2seq_result(seq2seq_result, open_page, tmp_path):
    res, b = seq2seq_result, 1  # the shorter pair: padded sources and targets
    assert not res.source_mask[b].all() and not res.attention_mask[b].all()
    s = int(res.source_mask[b].sum())
    page = open_page(res.save_html(tmp_path / "cross_head.html", view="head", part="cross", layer=-1, batch=b))
    panel = ".kv-panel[data-method='cross_attn_n']"
    sources = page.eval_on_selector_all(f"{panel} text.kv-column", "els => els.map(e => e.textContent)")
    assert sources == res.source_tokens[b][:s]
    i = 2
    page.click(f"{panel} text.kv-row[data-index='{i}']")
    lines = page.eval_on_selector_all(f"{panel} line.kv-edge", EDGES)
    heads = res.head_maps["cross_attn_n"].shape[2]
    assert sorted((int(h), int(j)) for h, _, j, _ in lines) == [(h, j) for h in range(heads) for j in range(s)]
    for h, r, j, value in lines:
        assert int(r) == i and float(value) == float(res.head_maps["cross_attn_n"][1, b, int(h), i, int(j)])
    screenshot(page, tmp_path / "cross_head.png")

    page = open_page(res.save_html(tmp_path / "cross_tokens.html", view="tokens", part="cross", batch=b,
                                   method="cross_attnres_n"))
    page.click(f".kv-sentence .kv-row[data-index='{i}']")
    rows = page.eval_on_selector_all("tr.kv-layer", """rows => rows.map(r => [
        [...r.querySelectorAll('.kv-cell:not(.kv-kept)')].map(c => c.dataset.value),
        r.querySelector('.kv-kept').dataset.value])""")
    for layer, (cells, kept) in enumerate(rows):
        full = res.maps["cross_attnres_n"][layer, b, i]
        assert [float(v) for v in cells] == full[:s].tolist()
        assert float(kept) == float(full[-1])  # what the target position keeps, shown apart from the sources
    screenshot(page, tmp_path / "cross_tokens.png")


def test_a_4096_token_page_opens_and_answers_a_click(open_page, tmp_path):
    """Not a timing (benchmarks/view_render.py measures those): the page of a 4096-token result renders and the
    first window's tokens show their embedded top-k values."""
    res = synthetic_result(4096, layers=1, heads=2, shared=True)
    page = open_page(res.save_html(tmp_path / "long.html", view="head", heads=1))
    page.click(".kv-panel[data-method='attn_w'] text.kv-row[data-index='10']")
    lines = page.eval_on_selector_all(".kv-panel[data-method='attn_w'] line.kv-edge", EDGES)
    row = res.head_maps["attn_w"][0, 0, 1, 10]
    top = row.abs().topk(20).indices.tolist()
    assert sorted(int(j) for *_, j, _ in lines) == sorted(j for j in top if j < 64)  # the first window: tokens 0-63
    assert all(float(v) == float(row[int(j)]) for *_, j, v in lines)


HOSTILE = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(1)>",
           "</script><script>window.kobattrInjected = 1</script>", "<img src=x onerror=\"window.kobattrInjected = 2\">",
           "<!--", "]]>{{DATA}}&amp;"]


@pytest.mark.parametrize("view", views.VIEWS)
def test_hostile_tokens_run_no_script_and_show_literally(browser, tmp_path, view):
    """Each hostile text is one token of the result (built directly, so that no tokenizer splits it); it reaches the
    page inside the <script> JSON block and in the DOM, and the `kobattr view` index as the model's name and a token
    preview. No dialog opens, no injected script or handler runs, and the text shows as it is."""
    res = synthetic_result(len(HOSTILE), layers=1, heads=2, seed=3)
    res.tokens = [list(HOSTILE)]
    res.model_name = HOSTILE[1]
    index = views.write_folder(res, tmp_path / "folder", views=[view], title=HOSTILE[0])
    for path in (tmp_path / "folder" / f"text000_{view}.html", index):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        dialogs, errors = [], []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(path.as_uri())
        page.wait_for_timeout(300)  # an <img onerror> would have fired by now: the image cannot load
        assert dialogs == [] and page.evaluate("typeof window.kobattrInjected") == "undefined"
        if path != index:
            page.wait_for_function("[...document.querySelectorAll('.kv-root')].every(r => r.dataset.ready)",
                                   timeout=15000)
            assert page.locator(".kv-title").inner_text() == HOSTILE[0]
            if view == "tokens":
                assert page.eval_on_selector_all(".kv-sentence .kv-row", "els => els.map(e => e.textContent)") == HOSTILE
                page.click(".kv-sentence .kv-row[data-index='1']")  # the layer table names the tokens again
            elif view == "head":
                assert page.eval_on_selector_all(".kv-panel[data-method='attn_w'] text.kv-row",
                                                 "els => els.map(e => e.textContent)") == HOSTILE
            else:  # the model view names the tokens in the map it opens
                page.click("canvas.kv-thumb >> nth=0")
                text = page.eval_on_selector(".kv-root", "e => e.textContent")
                assert all(token in text for token in HOSTILE)
        else:
            body = page.inner_text("body")
            assert HOSTILE[1] in body and " ".join(HOSTILE) in body
        page.wait_for_timeout(300)
        assert dialogs == [] and errors == []
        assert page.evaluate("typeof window.kobattrInjected") == "undefined"
        assert page.evaluate("document.querySelectorAll('img').length") == 0
        assert page.evaluate("document.scripts.length") == (0 if path == index else 2)
        page.close()
