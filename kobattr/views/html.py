"""HTML of the views: fragments for notebooks, standalone pages, the notebook summary and the `kobattr view` folder."""

from __future__ import annotations

import html
import json
import math
import secrets
from pathlib import Path
from typing import Optional, Sequence

from ..io import atomic_write
from ..result import Attribution, Seq2SeqAttribution
from .assets import CSS, JS
from .data import PARTS, VIEWS, automatic_top_k, display_name, payload, select
from .templating import embeddable_json, fill_template

_FRAGMENT = """<div class="kv-root kv-{{VIEW}}" id="{{ROOT}}">
<style>{{STYLE}}</style>
<div class="kv-title">{{TITLE}}</div>
<p class="kv-note" data-k="{{K}}" data-n="{{N}}">{{NOTE}}</p>
<p class="kv-nojs">This view needs JavaScript (in Jupyter: trust the notebook and run the cell again).</p>
<div class="kv-controls"></div>
<div class="kv-body"></div>
<script type="application/json" class="kv-data">{{DATA}}</script>
<script>{{SCRIPT}}</script>
</div>"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="kobattr">
<title>{{TITLE}}</title>
</head>
<body>
{{BODY}}
</body>
</html>
"""

_HELP = {
    "tokens": "Click a token: each row is one layer, every token shaded by how much it contributes to the chosen one "
              "(row i of that layer's map). Hover a token for its value.",
    "head": "Lines join each query token (left) to the tokens it reads (right), one colour per head; click a token to "
            "see only its lines, click a head to hide or show it.",
    "model": "Every layer and head of each method (per-head methods as a layer x head grid, layer-level methods as a "
             "strip of layers).",
}


def _unique_id(kind: str) -> str:
    """An id no other view has, in this notebook or any other output on the page (also after a kernel restart)."""
    return f"kobattr-{kind}-{secrets.token_hex(8)}"


def _default_title(selection) -> str:
    model = "/".join(Path(selection.result.model_name).parts[-2:]) or "kobattr"  # a checkpoint's path: its end
    part = f" \u00b7 {selection.part}" if selection.part else ""
    return f"{model}{part} \u00b7 {selection.view} view \u00b7 text {selection.batch}"


def render(result: Attribution, view: str = "tokens", *, part: Optional[str] = None, method=None, layer=None,
           heads=None, batch: int = 0, top_k: Optional[int] = None, title: Optional[str] = None) -> str:
    """One view of ``result`` as a self-contained HTML fragment (a <div> with its style, data and script).

    view: "tokens" (click a token, see what every token contributes to it, per layer), "head" (lines between query
    and key tokens for the heads of a layer, one panel per method, attn_w and attn_n side by side) or "model" (every
    layer x head as a small map, layer-level methods as a strip; click one to open it).
    part: for an encoder-decoder result, "decoder" (default: the decoder's self-attention), "encoder" or "cross"
    (target rows, source columns). method: a name or names (default: every method of the part; the head view: the
    per-head ones). layer: model layer index(es) of result.layers, negative from the end (default: all; the head
    view opens at the last). heads: head index(es) of the per-head maps (default: all). batch: which text.
    top_k: entries embedded per query row (default: every entry up to 64 tokens, else the 20 largest, fewer when a
    page would hold over a million). Raises ValueError with a sentence for anything it cannot show.
    """
    selection = select(result, view, part=part, method=method, layer=layer, heads=heads, batch=batch)
    data = payload(selection, top_k)
    columns, k = len(selection.column_positions), data["k"]
    note = ("Every entry of each row is shown" if k == columns else
            f"Showing the top {k} of {columns} entries per row (largest magnitude) and each row's total")
    root = _unique_id("view")
    return fill_template(_FRAGMENT, {
        "VIEW": view, "ROOT": root, "STYLE": CSS, "K": str(k), "N": str(columns),
        "TITLE": html.escape(title if title is not None else _default_title(selection)),
        "NOTE": html.escape(f"{note}. {_HELP[view]}"),
        "DATA": embeddable_json(json.dumps(data, ensure_ascii=False, allow_nan=False)),
        "SCRIPT": fill_template(JS, {"ROOT": root}),
    })


def page(body: str, title: str) -> str:
    """A standalone HTML document around view fragments."""
    return fill_template(_PAGE, {"TITLE": html.escape(title), "BODY": body})


def save_html(result: Attribution, path, view: str = "tokens", **options) -> Path:
    """Write one view (options as :func:`render`) as a standalone HTML page at ``path``; returns the path."""
    path = Path(path)
    fragment = render(result, view, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    title = options.get("title") or f"kobattr {view} view"
    atomic_write(path, lambda tmp: tmp.write_text(page(fragment, title), encoding="utf-8"))
    return path


def _kernel_shell():
    """The IPython shell of a notebook kernel (Jupyter, VS Code, Colab), or None: a terminal IPython cannot show
    HTML, and IPython is no dependency of kobattr."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell if getattr(shell, "kernel", None) is not None else None


def show(result: Attribution, view: str = "tokens", **options) -> Optional[Path]:
    """Display one view (options as :func:`render`) in the notebook; outside a notebook kernel write it as a page
    to a temporary file, say where, and return that path."""
    fragment = render(result, view, **options)
    if _kernel_shell() is not None:
        from IPython.display import HTML, display

        display(HTML(fragment))
        return None
    import tempfile

    path = Path(tempfile.gettempdir()) / f"{_unique_id(view)}.html"
    path.write_text(page(fragment, options.get("title") or f"kobattr {view} view"), encoding="utf-8")
    print(f"kobattr: not in a notebook, so the {view} view was written to {path}; open it in a browser.")
    return path


# ----------------------------------------------------------------------------------- notebook summary
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")
_SUMMARY_STYLE = """.kv-summary { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 0.9em; }
.kv-summary table { border-collapse: collapse; margin: 0.3em 0; }
.kv-summary th, .kv-summary td { padding: 1px 8px; text-align: right; border-bottom: 1px solid #e4e4e4; }
.kv-summary .kv-sections { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
.kv-summary .kv-hint { color: #555; }"""


def _ratio_section(result: Attribution, heading: str) -> str:
    """The mean mixing ratio (%) by layer of each method that has one: a table (exact values in data-value) and a
    small SVG line plot."""
    methods = [m for m in result.methods if m in result.ratios]
    if not methods:
        return f"<div><b>{html.escape(heading)}</b><p>no mixing ratios (methods {', '.join(result.methods)}).</p></div>"
    means = {m: [float(v) for v in result.mean_ratio(m)] for m in methods}
    head = "".join(f'<th title="{html.escape(m)}">{html.escape(display_name(m))}</th>' for m in methods)
    body = []
    for li, layer in enumerate(result.layers):
        cells = "".join(f'<td data-method="{html.escape(m)}" data-layer="{layer}" data-value="{means[m][li]!r}">'
                        + ("n/a" if math.isnan(means[m][li]) else f"{100 * means[m][li]:.1f}%") + "</td>"
                        for m in methods)
        body.append(f"<tr><th>{layer + 1}</th>{cells}</tr>")
    table = f"<table><tr><th>layer</th>{head}</tr>{''.join(body)}</table>"
    width, height, left, bottom = 280, 150, 34, 22
    count = len(result.layers)

    def x(li):
        return left + (width - left - 8) * (li / (count - 1) if count > 1 else 0.5)

    def y(fraction):
        return (height - bottom) * (1 - fraction) + 4

    parts = [f'<svg class="kv-plot" width="{width}" height="{height + 14 * len(methods)}" role="img" '
             f'aria-label="mean context-mixing ratio by layer">',
             f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - 4}" y2="{y(0):.1f}" stroke="#999"/>',
             f'<line x1="{left}" y1="{y(0):.1f}" x2="{left}" y2="{y(1):.1f}" stroke="#999"/>']
    for percent in (0, 50, 100):
        parts.append(f'<text x="{left - 4}" y="{y(percent / 100) + 4:.1f}" text-anchor="end" font-size="10">'
                     f'{percent}%</text>')
    for li, layer in enumerate(result.layers):
        parts.append(f'<text x="{x(li):.1f}" y="{height - 6}" text-anchor="middle" font-size="10">{layer + 1}</text>')
    for n, m in enumerate(methods):
        color = _PALETTE[n % len(_PALETTE)]
        points = " ".join(f"{x(li):.1f},{y(v):.1f}" for li, v in enumerate(means[m]) if not math.isnan(v))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}">'
                     f'<title>{html.escape(m)}</title></polyline>')
        parts.append(f'<text x="{left}" y="{height + 12 + 14 * n}" font-size="10" fill="{color}">'
                     f'\u2014 {html.escape(display_name(m))}</text>')
    parts.append("</svg>")
    return (f"<div><b>{html.escape(heading)}</b> mean context-mixing ratio by layer (layers counted from 1)"
            f"{table}</div><div>{''.join(parts)}</div>")


def summary_html(result: Attribution) -> str:
    """The notebook summary of a result (its _repr_html_): what it holds, its mixing ratios as a table and a small
    plot, and how to open the views. Plain HTML and SVG, no script: it shows in untrusted notebooks too."""
    root = _unique_id("summary")
    sections = [_ratio_section(result, "decoder" if isinstance(result, Seq2SeqAttribution) else "")]
    if isinstance(result, Seq2SeqAttribution) and result.encoder is not None:
        sections.append(_ratio_section(result.encoder, "encoder"))
    hint = ('result.show("tokens" | "head" | "model"' + (', part="decoder" | "encoder" | "cross"'
                                                         if isinstance(result, Seq2SeqAttribution) else "")
            + ") opens a view; result.save_html(path, view=...) writes one as a page.")
    return (f'<div class="kv-summary" id="{root}"><style>{_SUMMARY_STYLE}</style>'
            f"<p>{html.escape(repr(result))}</p>"
            f'<div class="kv-sections">{"".join(sections)}</div>'
            f'<p class="kv-hint">{html.escape(hint)}</p></div>')


# ----------------------------------------------------------------------------------- kobattr view FOLDER
def write_folder(result: Attribution, out, views: Optional[Sequence[str]] = None, parts: Optional[Sequence[str]] = None,
                 batches: Optional[Sequence[int]] = None, **options) -> Path:
    """Write views of ``result`` as standalone pages into the folder ``out`` and an index.html that summarises the
    result and links them; returns the index's path. views / parts / batches: which (default: every view, every part,
    every text); a (part, view) that cannot show ``options`` (the head view without per-head maps, a method of
    another part) is left out, and when none can, the first one's ValueError is raised. Options as :func:`render`.
    Files of the same names are replaced; nothing else in ``out`` is touched."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder for the pages (it is created if missing).")
    B = result.attention_mask.shape[0]
    batches = list(range(B)) if batches is None else list(batches)
    if not batches:
        raise ValueError("batches is empty; name at least one text, or leave it out for all.")
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < B:
            raise ValueError(f"text {b!r} does not exist; the result holds {B} text(s) (0..{B - 1}).")
    if parts is None:
        parts = [p for p in PARTS if p != "encoder" or result.encoder is not None] \
            if isinstance(result, Seq2SeqAttribution) else [None]
    chosen = {name: options[name] for name in ("method", "layer", "heads") if name in options}
    wanted, refusals = [], []
    for part in parts:
        for view in (VIEWS if views is None else views):
            try:
                select(result, view, part=part, batch=batches[0], **chosen)
            except ValueError as err:
                refusals.append(err)
                continue
            wanted.append((part, view))
    if not wanted:
        raise refusals[0]
    automatic_top_k(options.get("top_k"), 1, 1, 1)  # a bad top_k is refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    links = []
    for b in batches:
        items = []
        for part, view in wanted:
            name = f"text{b:03d}_{part + '_' if part else ''}{view}.html"
            save_html(result, out / name, view, part=part, batch=b, **options)
            items.append(f'<a href="{html.escape(name)}">{html.escape(f"{part} {view}" if part else view)}</a>')
        tokens = [t for t, v in zip(result.tokens[b], result.attention_mask[b].tolist()) if v]
        preview = html.escape(" ".join(tokens[:24]) + (" ..." if len(tokens) > 24 else ""))
        links.append(f"<li>text {b}: {' | '.join(items)}<br><small>{preview}</small></li>")
    body = summary_html(result) + f"<ul>{''.join(links)}</ul>"
    index = out / "index.html"
    title = f"kobattr: {result.model_name or 'result'}"
    atomic_write(index, lambda tmp: tmp.write_text(page(body, title), encoding="utf-8"))
    return index
