"""Plots of token-wise attribution maps: PNG heatmaps, mixing-ratio curves and an interactive HTML report.

Shape vocabulary: L layers, N tokens, R query rows. A map's row i is the query (output) token and its
column j the source token, so ``map[i, j]`` is how much token j contributes to token i.
Layers are numbered 1..L wherever they are shown or chosen, as in the papers' figures.

Everything takes torch tensors or anything numpy can read. Figures are built on
``matplotlib.figure.Figure`` directly, never through pyplot, so no display or backend choice is
needed (they render with Agg) and a notebook user's backend is left alone.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from .views.templating import embeddable_json, fill_template

MAX_LABELLED_TOKENS = 128  # above this many tokens, tick labels are hidden: they could not be read anyway
MIN_LABEL_FONTSIZE = 3.5  # points; smaller labels are hidden rather than printed as an unreadable smear
MAX_LABEL_FONTSIZE = 10.0
MAX_LABEL_CHARS = 16  # longer tokens are cut so that one of them does not squeeze the whole plot
PNG_DPI = 150


def _to_numpy(values) -> np.ndarray:
    """A float64 numpy copy of a torch tensor (any device or dtype, including bfloat16) or array-like."""
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _check_tokens(tokens: Sequence[str], count: int, name: str, per: str) -> list[str]:
    """The tokens as strings, after checking there is exactly one per ``per`` (row/column) of the map."""
    tokens = [str(token) for token in tokens]
    if len(tokens) != count:
        raise ValueError(f"{name} has {len(tokens)} tokens but the map has {count} {per}s; "
                         f"give exactly one token per {per}.")
    return tokens


def _display_label(token: str) -> str:
    """A token as a tick label: control characters made visible, blank tokens shown as ␣, long ones cut."""
    label = token.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if not label.strip():
        label = "␣" * max(len(label), 1)
    if len(label) > MAX_LABEL_CHARS:
        label = label[:MAX_LABEL_CHARS - 1] + "…"
    return label


def _label_fontsize(cell_inches: float, count: int) -> Optional[float]:
    """Font size (points) for tick labels on cells of this size, or None when they should be hidden."""
    if count > MAX_LABELLED_TOKENS:
        return None
    size = min(cell_inches * 72 * 0.8, MAX_LABEL_FONTSIZE)
    return size if size >= MIN_LABEL_FONTSIZE else None


def _color_range(values: np.ndarray) -> tuple[float, float]:
    """Colour limits that keep white at zero for non-negative maps (attention weights and norms are)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = min(float(finite.min()), 0.0), float(finite.max())
    return low, high if high > low else low + 1.0


def _draw_map(ax, matrix: np.ndarray, column_labels: list[str], row_labels: list[str], cmap: str,
              color_range: tuple[float, float], map_inches: tuple[float, float],
              show_x_labels: bool = True, show_y_labels: bool = True):
    """Draw an (R, N) map into ``ax``, tick labels sized for a map of about ``map_inches``; returns the image."""
    rows, columns = matrix.shape
    image = ax.imshow(matrix, cmap=cmap, vmin=color_range[0], vmax=color_range[1], aspect="auto",
                      interpolation="nearest")
    width_inches, height_inches = map_inches
    x_font = _label_fontsize(width_inches / columns, columns) if show_x_labels else None
    y_font = _label_fontsize(height_inches / rows, rows) if show_y_labels else None
    if x_font is None:
        ax.set_xticks([])
    else:
        # parse_math=False: a token such as "$" or "a$b$" must print as itself, not as mathtext
        ax.set_xticks(range(columns), [_display_label(t) for t in column_labels], rotation=90,
                      fontsize=x_font, parse_math=False)
    if y_font is None:
        ax.set_yticks([])
    else:
        ax.set_yticks(range(rows), [_display_label(t) for t in row_labels], fontsize=y_font, parse_math=False)
    ax.tick_params(length=2, pad=1)
    return image


def heatmap(matrix, tokens: Sequence[str], path=None, title: Optional[str] = None, ax=None, cmap: str = "Blues",
            row_tokens: Optional[Sequence[str]] = None) -> Figure:
    """One attribution map as a heatmap with a colorbar.

    matrix: (R, N), row i = query token, column j = source token. tokens: the N source tokens (x axis,
    rotated 90°). row_tokens: the R query tokens (y axis); defaults to ``tokens``. Tick labels shrink
    with the token count and are hidden above ``MAX_LABELLED_TOKENS``. title: e.g. "layer 3 - attnresln_n".
    ax: draw into this axes (its figure gets the colorbar) instead of a new figure sized to the map.
    path: also save a PNG there. Returns the Figure.
    """
    matrix = _to_numpy(matrix)
    if matrix.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D (R, N) matrix; got shape {tuple(matrix.shape)}.")
    rows, columns = matrix.shape
    tokens = _check_tokens(tokens, columns, "tokens", "column")
    if row_tokens is None:
        row_tokens = _check_tokens(tokens, rows, "tokens (also the row labels, as row_tokens is not given)", "row")
    else:
        row_tokens = _check_tokens(row_tokens, rows, "row_tokens", "row")

    if ax is None:
        # about 0.12 in per token keeps labels near 7 pt at 128 tokens; square cells where they fit
        map_width = float(np.clip(0.12 * columns, 4, 15))
        map_height = float(np.clip(map_width / columns * rows, 1, 15))
        figure = Figure(figsize=(map_width + 2.5, map_height + 2.0), layout="constrained")
        ax = figure.add_subplot()
    else:
        figure = ax.get_figure(root=True)
        # the axes' size before layout is a close enough estimate for choosing a label font
        box = ax.get_window_extent()
        map_width, map_height = box.width / figure.dpi, box.height / figure.dpi
    image = _draw_map(ax, matrix, tokens, row_tokens, cmap, _color_range(matrix), (map_width, map_height))
    ax.set_xlabel("source token")
    ax.set_ylabel("query token")
    if title:
        ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02, shrink=0.8 if rows > 8 else 1.0)
    if path is not None:
        figure.savefig(path, dpi=PNG_DPI)
    return figure


def _check_maps(maps: Mapping[str, object], tokens: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Convert the (L, N, N) maps, checking they share L and N and that N matches the tokens."""
    if not maps:
        raise ValueError("maps is empty: give at least one method's (L, N, N) map.")
    arrays = {str(method): _to_numpy(values) for method, values in maps.items()}
    first_method, first = next(iter(arrays.items()))
    for method, values in arrays.items():
        if values.ndim != 3 or values.shape[1] != values.shape[2]:
            raise ValueError(f"maps[{method!r}] must have shape (L, N, N); got {tuple(values.shape)}.")
        if values.shape != first.shape:
            raise ValueError(f"maps[{method!r}] has shape {tuple(values.shape)} but maps[{first_method!r}] "
                             f"has {tuple(first.shape)}; all methods must share L and N.")
    return arrays, _check_tokens(tokens, first.shape[1], "tokens", "column")


def _check_rectangular_maps(maps: Mapping[str, object], tokens: Sequence[str], column_tokens: Sequence[str]):
    """Convert (L, T, C) maps, checking they share L, T and C and match the row and column tokens."""
    if not maps:
        raise ValueError("maps is empty: give at least one method's (L, T, C) map.")
    arrays = {str(method): _to_numpy(values) for method, values in maps.items()}
    first_method, first = next(iter(arrays.items()))
    for method, values in arrays.items():
        if values.ndim != 3 or values.shape != first.shape:
            raise ValueError(f"maps[{method!r}] has shape {tuple(values.shape)} but maps[{first_method!r}] has "
                             f"{tuple(first.shape)}; all methods must be (L, T, C) of one shape.")
    return (arrays, _check_tokens(tokens, first.shape[1], "tokens", "row"),
            _check_tokens(column_tokens, first.shape[2], "column_tokens", "column"))


def layer_grid(maps: Mapping[str, object], tokens: Sequence[str], path, methods: Optional[Sequence[str]] = None,
               layers: Optional[Sequence[int]] = None, cmap: str = "Blues") -> Figure:
    """An overview PNG: one heatmap per (method, layer), rows = methods, columns = layers.

    maps: method -> (L, N, N). tokens: the N tokens. methods: which rows, in order (default: all).
    layers: which columns, as layer numbers 1..L (default: all). Each method row shares one colour
    scale and colorbar, so that layers of one method compare directly. Token labels appear on the
    left column and bottom row when the panels are big enough to read them. Returns the Figure.
    """
    arrays, tokens = _check_maps(maps, tokens)
    methods = list(arrays) if methods is None else [str(method) for method in methods]
    unknown = [method for method in methods if method not in arrays]
    if unknown:
        raise ValueError(f"methods {unknown} are not in maps (which has {list(arrays)}).")
    layer_count, token_count = next(iter(arrays.values())).shape[:2]
    layers = list(range(1, layer_count + 1)) if layers is None else [int(layer) for layer in layers]
    outside = [layer for layer in layers if not 1 <= layer <= layer_count]
    if outside:
        raise ValueError(f"layers {outside} are outside 1..{layer_count}: layers are numbered from 1.")
    if not methods or not layers:
        raise ValueError("layer_grid needs at least one method and one layer to draw.")

    panel = float(np.clip(0.06 * token_count, 2.2, 4.0))
    figure = Figure(figsize=(panel * len(layers) + 1.5, panel * len(methods) + 1.0), layout="constrained")
    axes = figure.subplots(len(methods), len(layers), squeeze=False)
    for row, method in enumerate(methods):
        shown = arrays[method][[layer - 1 for layer in layers]]
        color_range = _color_range(shown)
        for column, layer in enumerate(layers):
            ax = axes[row, column]
            image = _draw_map(ax, shown[column], tokens, tokens, cmap, color_range, (panel, panel),
                              show_x_labels=row == len(methods) - 1, show_y_labels=column == 0)
            ax.set_title(f"layer {layer} - {method}", fontsize=9)
        figure.colorbar(image, ax=axes[row, :], shrink=0.9, pad=0.01)
    figure.savefig(path, dpi=100)  # grids get wide; 100 dpi keeps a 24-layer overview a sane size
    return figure


def mixing_ratio_plot(ratios: Mapping[str, object], path=None, title: Optional[str] = None,
                      spread: Optional[Mapping[str, object]] = None) -> Figure:
    """Mean context-mixing ratio by layer, one line with markers per method.

    ratios: method -> (L,) fractions in [0, 1], plotted as percentages at layers 1..L.
    spread: method -> (L, 2) fractions (e.g. the 25th and 75th percentiles), drawn as a shaded band
    around that method's line. path: also save a PNG there. Returns the Figure.
    """
    if not ratios:
        raise ValueError("ratios is empty: give at least one method's (L,) mean ratios.")
    spread = {} if spread is None else dict(spread)
    unknown = [method for method in spread if method not in ratios]
    if unknown:
        raise ValueError(f"spread has methods {unknown} that ratios does not have.")

    figure = Figure(figsize=(7, 4.2), layout="constrained")
    ax = figure.add_subplot()
    longest = 0
    for method, values in ratios.items():
        percent = 100 * _to_numpy(values)
        if percent.ndim != 1:
            raise ValueError(f"ratios[{method!r}] must be 1-D (L,), one mean per layer; "
                             f"got shape {tuple(percent.shape)}.")
        layers = np.arange(1, len(percent) + 1)
        (line,) = ax.plot(layers, percent, marker="o", markersize=4, label=method)
        if method in spread:
            band = 100 * _to_numpy(spread[method])
            if band.shape != (len(percent), 2):
                raise ValueError(f"spread[{method!r}] must have shape ({len(percent)}, 2), a low and high value "
                                 f"per layer; got {tuple(band.shape)}.")
            ax.fill_between(layers, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.2, linewidth=0)
        longest = max(longest, len(percent))
    ax.set_xlim(0.5, longest + 0.5)
    ax.set_xticks(range(1, longest + 1, max(1, longest // 16)))
    ax.set_ylim(0, 100)
    ax.set_xlabel("layer")
    ax.set_ylabel("context-mixing ratio (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    if title:
        ax.set_title(title)
    if path is not None:
        figure.savefig(path, dpi=PNG_DPI)
    return figure


PRESERVED_LABEL = "[kept]"  # the column of what a target position keeps (cross_attnres_n, cross_attnresln_n)


def cross_grid(maps: Mapping[str, object], source_tokens: Sequence[str], target_tokens: Sequence[str], path,
               layers: Optional[Sequence[int]] = None, title: Optional[str] = None, cmap: str = "Blues") -> Figure:
    """Target x source maps of one sentence pair: one heatmap per (method, layer), rows = methods, columns = layers.

    maps: method -> (L, T, S), or (L, T, S + 1) with a last column for what the target position keeps (labelled
    "[kept]"; it is left out of the colour scale, which it would otherwise wash out, and shows in the darkest colour
    when larger). source_tokens: the S source tokens (x axis); target_tokens: the T target rows (y axis).
    layers: the L layer numbers for the titles (default 1..L). Each method row shares one colour scale. Returns the
    Figure (and saves a PNG at ``path``)."""
    if not maps:
        raise ValueError("maps is empty: give at least one method's (L, T, S) map.")
    arrays = {str(method): _to_numpy(values) for method, values in maps.items()}
    sources, targets = [str(t) for t in source_tokens], [str(t) for t in target_tokens]
    count = None
    for method, values in arrays.items():
        if values.ndim != 3 or values.shape[1] != len(targets) or values.shape[2] not in (len(sources), len(sources) + 1):
            raise ValueError(f"maps[{method!r}] must have shape (L, T, S) or (L, T, S + 1) with T = {len(targets)} "
                             f"target and S = {len(sources)} source tokens; got {tuple(values.shape)}.")
        if count is not None and values.shape[0] != count:
            raise ValueError("all methods must have the same number of layers.")
        count = values.shape[0]
    layers = list(range(1, count + 1)) if layers is None else [int(layer) for layer in layers]
    if len(layers) != count:
        raise ValueError(f"layers names {len(layers)} layer(s) but the maps have {count}.")
    panel_w = float(np.clip(0.18 * (len(sources) + 1), 2.2, 5.0))
    panel_h = float(np.clip(0.18 * len(targets), 1.6, 5.0))
    figure = Figure(figsize=(panel_w * count + 1.5, panel_h * len(arrays) + 1.2 + (0.3 if title else 0)),
                    layout="constrained")
    axes = figure.subplots(len(arrays), count, squeeze=False)
    for row, (method, values) in enumerate(arrays.items()):
        kept = values.shape[2] == len(sources) + 1
        color_range = _color_range(values[:, :, :len(sources)])
        columns = sources + ([PRESERVED_LABEL] if kept else [])
        for column, layer in enumerate(layers):
            ax = axes[row, column]
            image = _draw_map(ax, values[column], columns, targets, cmap, color_range, (panel_w, panel_h),
                              show_x_labels=row == len(arrays) - 1 or kept, show_y_labels=column == 0)
            ax.set_title(f"layer {layer} - {method}", fontsize=8)
        figure.colorbar(image, ax=axes[row, :], shrink=0.9, pad=0.01)
    figure.supxlabel("source token", fontsize=9)
    figure.supylabel("target row (decoder input)", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=100)
    return figure


def aer_plot(aer: Mapping[str, Mapping[str, Sequence[Optional[float]]]], layers: Sequence[int], path=None,
             title: Optional[str] = None) -> Figure:
    """Alignment error rate by decoder layer: one line per method and setting (method: colour, setting: line style,
    "output" solid and "input" dashed), so that weights (cross_attn_w) and norms (cross_attn_n, ...) compare at a
    glance. aer: method -> setting -> one AER (a fraction, None when undefined) per layer in ``layers`` (the layer
    numbers, counted from 1). Plotted in %. path: also save a PNG there. Returns the Figure."""
    if not aer:
        raise ValueError("aer is empty: give at least one method's AER by layer.")
    layers = [int(layer) for layer in layers]
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = figure.add_subplot()
    styles = {"output": "-", "input": "--"}
    colors = [f"C{k % 10}" for k in range(len(aer))]
    for color, (method, by_setting) in zip(colors, aer.items()):
        for setting, values in by_setting.items():
            values = [np.nan if v is None else 100.0 * float(v) for v in values]
            if len(values) != len(layers):
                raise ValueError(f"aer[{method!r}][{setting!r}] has {len(values)} values for {len(layers)} layers.")
            ax.plot(layers, values, styles.get(setting, ":"), color=color, marker="o", markersize=4,
                    label=f"{method} ({setting})")
    ax.set_xticks(layers if len(layers) <= 16 else layers[::max(1, len(layers) // 16)])
    ax.set_ylim(0, 100)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("alignment error rate (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    if path is not None:
        figure.savefig(path, dpi=PNG_DPI)
    return figure


def _json_numbers(values: np.ndarray) -> str:
    """Nested JSON lists of the values at 4 significant digits; NaN and infinities become null."""
    if values.ndim == 1:
        return "[" + ",".join(f"{v:.4g}" if np.isfinite(v) else "null" for v in values.tolist()) + "]"
    return "[" + ",".join(_json_numbers(part) for part in values) + "]"


def html_report(maps: Mapping[str, object], tokens: Sequence[str], path, title: str = "kobattr",
                ratios: Optional[Mapping[str, object]] = None,
                column_tokens: Optional[Sequence[str]] = None) -> Path:
    """Write one self-contained HTML page to explore the maps token by token; returns its path.

    maps: method -> (L, N, N), all with the same L and N. tokens: the N tokens. ratios: optional
    name -> (L, N) context-mixing ratios (fractions) of each token at each layer, shown as percentages.
    column_tokens: for maps whose columns are other tokens than their rows (cross maps: target rows, source
    columns, maps (L, T, C)), the C column labels; the page then shows, for a chosen row token, how much each
    column token contributes to it.
    The page shows, for a chosen token i, a row per layer with every token coloured by row i of that
    layer's map (how much each token contributes to token i), a method selector, a row/table
    normalisation toggle and tooltips with the exact values. Data are embedded at 4 significant digits;
    the page loads nothing from outside.
    """
    if column_tokens is None:
        arrays, tokens = _check_maps(maps, tokens)
        columns = tokens
    else:
        arrays, tokens, columns = _check_rectangular_maps(maps, tokens, column_tokens)
    layer_count, token_count = next(iter(arrays.values())).shape[:2]
    ratio_arrays = {str(name): _to_numpy(values) for name, values in (ratios or {}).items()}
    for name, values in ratio_arrays.items():
        if values.shape != (layer_count, token_count):
            raise ValueError(f"ratios[{name!r}] must have shape (L, N) = ({layer_count}, {token_count}) "
                             f"like the maps; got {tuple(values.shape)}.")

    def keyed(arrays_by_name: dict[str, np.ndarray]) -> str:
        return "{" + ",".join(json.dumps(name) + ":" + _json_numbers(values)
                              for name, values in arrays_by_name.items()) + "}"

    payload = ('{"tokens":' + json.dumps(tokens, ensure_ascii=False)
               + ',"columns":' + json.dumps(columns, ensure_ascii=False)
               + ',"square":' + json.dumps(column_tokens is None)
               + ',"methods":' + json.dumps(list(arrays), ensure_ascii=False)
               + ',"maps":' + keyed(arrays) + ',"ratios":' + keyed(ratio_arrays) + "}")
    page = fill_template(_HTML_TEMPLATE, {"TITLE": html.escape(str(title)), "DATA": embeddable_json(payload)})
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


_HTML_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{TITLE}}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 0.3em; }
  .help { color: #555; font-size: 0.9em; margin: 0 0 0.8em; max-width: 60em; }
  #controls { display: flex; gap: 1.2em; align-items: center; flex-wrap: wrap; margin-bottom: 0.8em; }
  #sentence { line-height: 2; margin-bottom: 1em; padding: 0.4em; background: #f5f5f5; border-radius: 4px; }
  .tok { white-space: pre; padding: 1px 3px; margin: 1px; border-radius: 3px;
         font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.85em; }
  #sentence .tok { cursor: pointer; border: 1px solid #ccc; background: #fff; }
  #sentence .tok:hover { border-color: #2166ac; }
  #sentence .tok.selected { background: #2166ac; color: #fff; border-color: #2166ac; }
  table { border-collapse: collapse; }
  th, td { padding: 3px 6px; border-bottom: 1px solid #e4e4e4; vertical-align: top; text-align: left; }
  th { font-size: 0.85em; color: #444; }
  td.layer, td.ratio { white-space: nowrap; font-size: 0.85em; }
  td.ratio { min-width: 5em; }
  td.contributions { line-height: 1.9; }
  td.contributions .tok.self { outline: 2px solid #f4a300; }
  #tooltip { position: fixed; pointer-events: none; background: #222; color: #fff; padding: 4px 7px;
             border-radius: 4px; font-size: 0.8em; white-space: pre; z-index: 10; }
</style>
</head>
<body>
<h1>{{TITLE}}</h1>
<p class="help">Choose a token (click it below or use the menu). Each table row is one layer: every token is
shaded by how much it contributes to the chosen token there (row <i>i</i> of that layer's map; the chosen token
itself is outlined). &ldquo;Normalise each row&rdquo; scales each layer by its own largest value; unticked, all
layers share the scale of the largest value in the table. Hover a token for the exact numbers.</p>
<div id="controls">
  <label>token <select id="token-select"></select></label>
  <label>method <select id="method-select"></select></label>
  <label><input type="checkbox" id="normalise" checked> normalise each row</label>
</div>
<div id="sentence"></div>
<table>
  <thead><tr id="header"></tr></thead>
  <tbody id="layers"></tbody>
</table>
<div id="tooltip" hidden></div>
<script type="application/json" id="kobattr-data">{{DATA}}</script>
<script>
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("kobattr-data").textContent);
  var tokens = data.tokens, ratioNames = Object.keys(data.ratios);
  var state = { token: 0, method: data.methods[0], normalise: true };
  var tokenSelect = document.getElementById("token-select");
  var methodSelect = document.getElementById("method-select");
  var normaliseBox = document.getElementById("normalise");
  var sentence = document.getElementById("sentence");
  var tooltip = document.getElementById("tooltip");

  // Token text only ever reaches the page through textContent, so markup in tokens stays text.
  function shown(token) {
    var text = token.replace(/\n/g, "\\n").replace(/\r/g, "\\r").replace(/\t/g, "\\t");
    return text.trim() === "" ? "\u2423".repeat(Math.max(text.length, 1)) : text;
  }
  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function number(value) {
    return value === null ? "n/a" : Number(value.toPrecision(4)).toString();
  }

  tokens.forEach(function (token, index) {
    tokenSelect.appendChild(new Option(index + ": " + shown(token), String(index)));
    var span = element("span", "tok", shown(token));
    span.dataset.index = String(index);
    sentence.appendChild(span);
    sentence.appendChild(document.createTextNode(" "));
  });
  data.methods.forEach(function (method) { methodSelect.appendChild(new Option(method, method)); });

  var header = document.getElementById("header");
  header.appendChild(element("th", "", "layer"));
  ratioNames.forEach(function (name) { header.appendChild(element("th", "", "mixing % (" + name + ")")); });
  header.appendChild(element("th", "", "contributions to the chosen token"));

  function largestMagnitude(values) {
    return values.reduce(function (best, v) { return v === null ? best : Math.max(best, Math.abs(v)); }, 0);
  }

  function render() {
    var i = state.token, layers = data.maps[state.method];
    tokenSelect.value = String(i);
    methodSelect.value = state.method;
    Array.prototype.forEach.call(sentence.children, function (span) {
      span.classList.toggle("selected", span.dataset.index === String(i));
    });
    var rows = layers.map(function (layer) { return layer[i]; });
    var tableScale = largestMagnitude(rows.map(largestMagnitude));
    var body = document.getElementById("layers");
    body.textContent = "";
    rows.forEach(function (row, l) {
      var tr = element("tr");
      tr.appendChild(element("td", "layer", "layer " + (l + 1)));
      ratioNames.forEach(function (name) {
        var ratio = data.ratios[name][l][i];
        var cell = element("td", "ratio", ratio === null ? "n/a" : (100 * ratio).toFixed(1) + "%");
        if (ratio !== null) {
          var p = Math.max(0, Math.min(100, 100 * ratio)).toFixed(1);
          cell.style.background = "linear-gradient(90deg, #c6dbef " + p + "%, transparent " + p + "%)";
        }
        tr.appendChild(cell);
      });
      var cell = element("td", "contributions");
      var scale = state.normalise ? largestMagnitude(row) : tableScale;
      var total = row.reduce(function (sum, v) { return v === null ? sum : sum + v; }, 0);
      row.forEach(function (value, j) {
        var span = element("span", data.square && j === i ? "tok self" : "tok", shown(data.columns[j]));
        var strength = value === null || scale === 0 ? 0 : Math.abs(value) / scale;
        // blue for positive contributions, red for negative ones (signed attributions)
        var rgb = value !== null && value < 0 ? "178,24,43" : "33,102,172";
        span.style.background = "rgba(" + rgb + "," + strength.toFixed(3) + ")";
        if (strength > 0.55) span.style.color = "#fff";
        var tip = "layer " + (l + 1) + "  " + shown(data.columns[j]) + " \u2192 " + shown(tokens[i]) +
                  "\nvalue " + number(value);
        if (value !== null && total !== 0) tip += "\n" + (100 * value / total).toFixed(1) + "% of the row total";
        span.dataset.tip = tip;
        cell.appendChild(span);
        cell.appendChild(document.createTextNode(" "));
      });
      tr.appendChild(cell);
      body.appendChild(tr);
    });
  }

  sentence.addEventListener("click", function (event) {
    var index = event.target.dataset && event.target.dataset.index;
    if (index !== undefined) { state.token = Number(index); render(); }
  });
  tokenSelect.addEventListener("change", function () { state.token = Number(tokenSelect.value); render(); });
  methodSelect.addEventListener("change", function () { state.method = methodSelect.value; render(); });
  normaliseBox.addEventListener("change", function () { state.normalise = normaliseBox.checked; render(); });

  var table = document.getElementById("layers");
  table.addEventListener("mousemove", function (event) {
    var tip = event.target.dataset && event.target.dataset.tip;
    if (!tip) { tooltip.hidden = true; return; }
    tooltip.textContent = tip;
    tooltip.hidden = false;
    tooltip.style.left = (event.clientX + 12) + "px";
    tooltip.style.top = (event.clientY + 12) + "px";
  });
  table.addEventListener("mouseleave", function () { tooltip.hidden = true; });

  render();
})();
</script>
</body>
</html>
"""
