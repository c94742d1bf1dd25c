"""How long the views take to open in headless Chromium, and how large their pages are, for long texts.

    python benchmarks/view_render.py [--sizes 512 4096] [--layers 6] [--heads 12] [--repeats 3] [--out FILE.md]

Builds a synthetic MiniLM-shaped result per N (tests/test_views.synthetic_result: attn_w and attn_n with per-head
maps, attnresln_n; one random map expanded over layers and heads so that N = 4096 fits in memory) and renders
each configuration below with its default options (automatic top-k). Measured per configuration:
    build s    kobattr.views.render in Python (top-k selection, thumbnails, encoding)
    page MB    the standalone page written by save_html
    render ms  Chromium: from navigation start until the view has drawn (data-ready set), best of --repeats;
               reading the page, decoding the data and building the first window of 64 tokens
    click ms   clicking a token of the first window until the next frame, best of --repeats
Chromium is Debian's /usr/bin/chromium driven by Playwright, headless, one page at a time.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_views import synthetic_result  # noqa: E402 (one synthetic result for the tests and this benchmark)
from test_views_browser import LAUNCH_ARGS  # noqa: E402

from kobattr import views  # noqa: E402

# (label, view, options): the default views, and the head view of one layer (what a long text is usually read with)
CONFIGURATIONS = [
    ("tokens", "tokens", {}),
    ("head, last layer", "head", {"layer": -1}),
    ("head, all layers", "head", {}),
    ("model", "model", {}),
]
# set data-ready's time as the view draws: a MutationObserver from before the page's own script runs
RECORD_READY = """new MutationObserver((changes, observer) => {
    if (document.querySelector('.kv-root[data-ready]')) { window.__readyAt = performance.now(); observer.disconnect(); }
}).observe(document, {attributes: true, subtree: true, attributeFilter: ['data-ready']});"""
CLICK = """async (selector) => {
    const token = document.querySelector(selector), start = performance.now();
    token.dispatchEvent(new MouseEvent('click', {bubbles: true}));
    await new Promise(resolve => requestAnimationFrame(() => requestAnimationFrame(resolve)));
    return performance.now() - start;
}"""
TOKEN = {"tokens": ".kv-sentence .kv-row[data-index='10']", "head": "text.kv-row[data-index='10']",
         "model": "canvas.kv-thumb"}


def measure(browser, path: Path, view: str, repeats: int) -> tuple[float, float]:
    """(best render ms, best click ms) of the page at ``path``."""
    renders, clicks = [], []
    for _ in range(repeats):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.add_init_script(RECORD_READY)
        page.goto(path.as_uri())
        page.wait_for_function("window.__readyAt !== undefined", timeout=60_000)
        renders.append(page.evaluate("window.__readyAt"))
        clicks.append(page.evaluate(CLICK, TOKEN[view]))
        page.close()
    return min(renders), min(clicks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 4096], help="token counts (default: 512 4096)")
    parser.add_argument("--layers", type=int, default=6, help="layers (default: 6, as MiniLM)")
    parser.add_argument("--heads", type=int, default=12, help="heads (default: 12, as MiniLM)")
    parser.add_argument("--repeats", type=int, default=3, help="page loads per configuration (default: 3)")
    parser.add_argument("--out", help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    header = "| view | N | maps | top-k | build s | page MB | render ms | click ms |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
        version = browser.version
        for n in args.sizes:
            result = synthetic_result(n, layers=args.layers, heads=args.heads, shared=True)
            for label, view, options in CONFIGURATIONS:
                start = time.perf_counter()
                fragment = views.render(result, view, **options)
                build = time.perf_counter() - start
                path = Path(folder) / f"{view}_{n}.html"
                path.write_text(views.page(fragment, label), encoding="utf-8")
                data = views.data.select(result, view, **options)
                k = views.data.automatic_top_k(None, len(data.panels), n, n)
                render_ms, click_ms = measure(browser, path, view, args.repeats)
                line = (f"| {label} | {n} | {len(data.panels)} | {k} | {build:.2f} | "
                        f"{path.stat().st_size / 2**20:.2f} | {render_ms:.0f} | {click_ms:.0f} |")
                lines.append(line)
                print(line, flush=True)
        browser.close()
    if args.out:
        command = "python benchmarks/view_render.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        text = (f"# View render times\n\n`{command.strip()}`\n\n"
                f"Headless Chromium {version} (Debian's /usr/bin/chromium, Playwright), Python "
                f"{platform.python_version()}, {platform.machine()} with {_cpus()} CPU cores. Synthetic MiniLM-shaped "
                f"result: {args.layers} layers, "
                f"{args.heads} heads, attn_w and attn_n per head, attnresln_n; default options (automatic top-k), "
                f"best of {args.repeats} page loads.\n\n" + "\n".join(lines) + "\n")
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
