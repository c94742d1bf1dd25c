"""The head view of `kobattr heads` (kobattr.analyses.heads.write_head_view): heads.html, an interactive page over
results.json (no network, no script loaded from anywhere).

Every per-head statistic the results hold (section 8: entropy, first-row entropy, previous- and next-token share,
share per key category, the no-op means and Spearman's rho; gradient importance per quantity and key category;
coreference accuracy per mention type) is a layer x head grid coloured on a sequential scale, with a weights /
norms toggle where the statistic has both. Clicking a head shows all its values, weights and norms side by side,
and the dependency relations it is the best head for; with clustering, the MDS scatter of the heads (one circle
per head, coloured by layer) shares the selection. The probes' UAS (not per head) are a table.

The page embeds the results themselves (embeddable_json inside <script type="application/json">) and an index of
the statistics as paths into them, so every value shown is the results file's number: data-value is String(x) of
that number ("" for a missing one). Text from the results (model name, relations, labels) reaches the page only
through textContent or html.escape.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..io import atomic_write
from .html import page
from .templating import embeddable_json, fill_template

def _title(results: dict) -> str:
    return f"kobattr heads: {(results.get('model') or {}).get('name') or 'results'}"


def render(results: dict, statistics: list) -> str:
    """heads.html for ``results`` (the dict kobattr.analyses.heads.write_report writes as results.json): a
    standalone HTML page over the per-head ``statistics`` (kobattr.analyses.heads.head_view_statistics: each a dict
    with id, group, label, layers and paths, a path being the keys from results to a [layer][head] grid)."""
    stats = statistics
    if not stats:
        raise ValueError("the results hold no per-head statistic to show; pass the dict head_statistics returns.")
    root = "kobattr-heads"  # one view per page, and a fixed id keeps equal results' pages byte-identical
    data = {"results": results, "statistics": stats}
    body = fill_template(_FRAGMENT, {
        "ROOT": root, "STYLE": _CSS, "TITLE": html.escape(_title(results)), "NOTE": html.escape(_HELP),
        "DATA": embeddable_json(json.dumps(data, ensure_ascii=False, allow_nan=False)),
        "SCRIPT": fill_template(_JS, {"ROOT": root}),
    })
    return page(body, _title(results))


def write(results: dict, statistics: list, path) -> Path:
    """Write render(results, statistics) to ``path`` atomically; returns the path."""
    path = Path(path)
    text = render(results, statistics)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


_HELP = ("Pick a statistic (weights or norms where it has both): each cell is one head, darker = larger; hover for "
         "the value, click a head for all its values. Layers and heads count from 1; every number is the one in "
         "results.json.")

_FRAGMENT = """<div class="kv-root kv-heads" id="{{ROOT}}">
<style>{{STYLE}}</style>
<div class="kv-title">{{TITLE}}</div>
<p class="kv-note">{{NOTE}}</p>
<p class="kv-nojs">This page needs JavaScript.</p>
<div class="kv-controls"></div>
<div class="kv-main"><div class="kv-gridbox"></div><div class="kv-side"></div></div>
<div class="kv-extra"></div>
<script type="application/json" class="kv-data">{{DATA}}</script>
<script>{{SCRIPT}}</script>
</div>"""

_CSS = r"""
.kv-root { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0.5em 0; }
.kv-root .kv-title { font-weight: 600; margin: 0 0 0.3em; white-space: pre-wrap; }
.kv-root .kv-note { color: #555; font-size: 0.85em; margin: 0 0 0.5em; max-width: 70em; }
.kv-root .kv-controls { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; margin-bottom: 0.6em;
  font-size: 0.9em; }
.kv-root .kv-main, .kv-root .kv-extra { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
.kv-root table { border-collapse: collapse; font-size: 0.8em; }
.kv-root .kv-heatmap td.kv-hcell { width: 26px; height: 20px; border: 1px solid #fff; cursor: pointer; }
.kv-root .kv-heatmap td.kv-missing { background: #ddd; }
.kv-root .kv-heatmap td.kv-picked { outline: 2px solid #f4a300; }
.kv-root .kv-heatmap th { font-weight: normal; color: #555; padding: 0 3px; }
.kv-root .kv-scale { font-size: 0.8em; color: #555; margin-top: 0.3em; }
.kv-root .kv-side table th, .kv-root .kv-side table td, .kv-root .kv-probes th, .kv-root .kv-probes td {
  padding: 1px 6px; border-bottom: 1px solid #e4e4e4; text-align: right; }
.kv-root .kv-side table th { text-align: left; font-weight: normal; }
.kv-root .kv-side h4, .kv-root .kv-extra h4 { margin: 0.2em 0; font-size: 0.95em; }
.kv-root .kv-side .kv-best { font-size: 0.85em; max-width: 36em; white-space: pre-wrap; }
.kv-root svg.kv-mds circle { cursor: pointer; stroke: #fff; stroke-width: 0.5; }
.kv-root svg.kv-mds circle.kv-picked { stroke: #f4a300; stroke-width: 3; }
"""

_JS = r"""
(function () {
  "use strict";
  var root = document.getElementById("{{ROOT}}");
  var data = JSON.parse(root.querySelector("script.kv-data").textContent);
  var results = data.results, stats = data.statistics, SVG = "http://www.w3.org/2000/svg";
  var STOPS = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];  // sequential blues
  var state = { stat: 0, kind: "weights", picked: null, mdsKind: null };

  function get(path) {
    var v = results;
    for (var i = 0; i < path.length; i++) {
      if (v === null || v === undefined) return undefined;
      v = v[path[i]];
    }
    return v;
  }
  function el(tag, cls, text, parent) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function svg(tag, attrs, parent) {
    var node = document.createElementNS(SVG, tag);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function missing(v) { return v === null || v === undefined; }
  function exact(v) { return missing(v) ? "" : String(v); }
  function shown(v) {
    if (missing(v)) return "n/a";
    var a = Math.abs(v);
    return a === 0 || (a >= 1e-3 && a < 1e4) ? v.toFixed(4) : v.toExponential(3);
  }
  function colour(t) {
    var x = Math.max(0, Math.min(1, t)) * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2);
    var f = x - i, c = STOPS[i].map(function (a, k) { return Math.round(a + f * (STOPS[i + 1][k] - a)); });
    return "rgb(" + c.join(",") + ")";
  }
  function layerColour(li, L) { return "hsl(" + Math.round(280 * li / Math.max(L - 1, 1)) + ",70%,45%)"; }
  function kinds(stat) { return stat.paths.value ? ["value"] : ["weights", "norms"]; }
  function kindOf(stat) { return stat.paths.value ? "value" : state.kind; }
  function same(a, b) { return a && b && a.layer === b.layer && a.head === b.head; }

  // ------------------------------------------------------------------ controls
  var controls = root.querySelector(".kv-controls");
  var label = el("label", null, "statistic ", controls);
  var statSelect = el("select", "kv-stat", null, label);
  var groups = {};
  stats.forEach(function (s, i) {
    if (!groups[s.group]) { groups[s.group] = el("optgroup", null, null, statSelect); groups[s.group].label = s.group; }
    var option = el("option", null, s.label, groups[s.group]);
    option.value = String(i);
  });
  var kindLabel = el("label", null, "map ", controls);
  var kindSelect = el("select", "kv-kind", null, kindLabel);
  ["weights", "norms"].forEach(function (k) { el("option", null, k, kindSelect).value = k; });
  statSelect.addEventListener("change", function () { state.stat = Number(statSelect.value); draw(); });
  kindSelect.addEventListener("change", function () { state.kind = kindSelect.value; draw(); });

  // ------------------------------------------------------------------ grid
  var gridbox = root.querySelector(".kv-gridbox"), side = root.querySelector(".kv-side");
  function drawGrid() {
    var stat = stats[state.stat], kind = kindOf(stat), grid = get(stat.paths[kind]) || [];
    var layers = get(stat.layers) || [];
    kindSelect.disabled = kind === "value";
    gridbox.textContent = "";
    var values = [].concat.apply([], grid).filter(function (v) { return !missing(v); });
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    var table = el("table", "kv-heatmap", null, gridbox);
    table.dataset.stat = stat.id;
    table.dataset.kind = kind;
    var head = el("tr", null, null, table);
    el("th", null, "layer \\ head", head);
    var H = grid.length ? grid[0].length : 0;
    for (var h = 0; h < H; h++) el("th", null, String(h + 1), head);
    grid.forEach(function (row, li) {
      var tr = el("tr", null, null, table);
      el("th", null, String(layers[li]), tr);
      row.forEach(function (v, hi0) {
        var td = el("td", "kv-hcell", null, tr), pick = { layer: layers[li], head: hi0 + 1 };
        td.dataset.layer = String(pick.layer);
        td.dataset.head = String(pick.head);
        td.dataset.value = exact(v);
        td.title = "layer " + pick.layer + ", head " + pick.head + ": " + shown(v);
        if (missing(v)) td.classList.add("kv-missing");
        else td.style.background = colour(hi > lo ? (v - lo) / (hi - lo) : 0.5);
        if (same(pick, state.picked)) td.classList.add("kv-picked");
        td.addEventListener("click", function () { choose(pick); });
      });
    });
    var scale = el("div", "kv-scale", values.length ? "light " + lo.toPrecision(6) + " \u2192 dark " +
                   hi.toPrecision(6) +
                   (kind === "value" ? "" : " (" + kind + ")") : "no values", gridbox);
    scale.dataset.low = values.length ? String(lo) : "";
    scale.dataset.high = values.length ? String(hi) : "";
  }

  // ------------------------------------------------------------------ side panel
  function valueAt(stat, kind, pick) {
    var li = (get(stat.layers) || []).indexOf(pick.layer), grid = get(stat.paths[kind]);
    return li < 0 || !grid || !grid[li] ? undefined : grid[li][pick.head - 1];
  }
  function drawSide() {
    side.textContent = "";
    var pick = state.picked;
    if (!pick) { el("p", "kv-note", "Click a head for all its values.", side); return; }
    el("h4", null, "layer " + pick.layer + ", head " + pick.head, side).className = "kv-picked-title";
    var table = el("table", "kv-values", null, side), top = el("tr", null, null, table);
    el("th", null, "statistic", top); el("th", null, "weights", top); el("th", null, "norms", top);
    stats.forEach(function (stat) {
      if ((get(stat.layers) || []).indexOf(pick.layer) < 0) return;
      var tr = el("tr", null, null, table);
      tr.dataset.stat = stat.id;
      el("th", null, stat.group + ": " + stat.label, tr);
      kinds(stat).forEach(function (kind) {
        var v = valueAt(stat, kind, pick), td = el("td", null, shown(v), tr);
        td.dataset.kind = kind;
        td.dataset.value = exact(v);
        if (kind === "value") td.colSpan = 2;
      });
    });
    var best = [];
    ["weights", "norms"].forEach(function (kind) {
      var dep = (results.dependency || {})[kind] || {};
      Object.keys(dep).forEach(function (rel) {
        ["dep_to_head", "head_to_dep"].forEach(function (d) {
          var e = dep[rel][d];
          if (e && e.layer === pick.layer && e.head === pick.head)
            best.push(rel + " (" + d.replace(/_/g, " ") + ", " + kind + ", accuracy " + shown(e.accuracy) + ")");
        });
      });
      var coref = ((results.coreference || {}).best || {})[kind];
      if (coref && coref.layer === pick.layer && coref.head === pick.head) best.push("coreference (" + kind + ")");
    });
    el("p", "kv-best", best.length ? "Best head for: " + best.join("; ") : "Best head for no dependency relation.",
       side);
  }

  // ------------------------------------------------------------------ MDS scatter
  var extra = root.querySelector(".kv-extra"), mdsBox = null;
  var clustering = results.clustering;
  function drawMds() {
    mdsBox.textContent = "";
    var xy = clustering.mds[state.mdsKind], L = clustering.layers.length, H = clustering.heads;
    var size = 380, pad = 16;
    var xs = xy.map(function (p) { return p[0]; }), ys = xy.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys),
        y1 = Math.max.apply(null, ys), span = Math.max(x1 - x0, y1 - y0) || 1;
    var plot = svg("svg", { "class": "kv-mds", width: size, height: size, role: "img" }, mdsBox);
    plot.dataset.kind = state.mdsKind;
    xy.forEach(function (p, k) {
      var li = Math.floor(k / H), pick = { layer: clustering.layers[li], head: k % H + 1 };
      var c = svg("circle", { cx: (pad + (p[0] - x0) / span * (size - 2 * pad)).toFixed(2),
                              cy: (size - pad - (p[1] - y0) / span * (size - 2 * pad)).toFixed(2), r: 5,
                              fill: layerColour(li, L) }, plot);
      c.dataset.layer = String(pick.layer);
      c.dataset.head = String(pick.head);
      c.dataset.x = String(p[0]);
      c.dataset.y = String(p[1]);
      c.dataset.label = clustering.labels[k];
      svg("title", {}, c).textContent = "head " + clustering.labels[k] + " (layer-head)";
      if (same(pick, state.picked)) c.classList.add("kv-picked");
      c.addEventListener("click", function () { choose(pick); });
    });
    var legend = el("div", "kv-scale", state.mdsKind + " distances; colour = layer: ", mdsBox);
    clustering.layers.forEach(function (layer, li) {
      var key = el("span", null, "\u25cf", legend);
      key.style.color = layerColour(li, L);
      el("span", null, String(layer) + " ", legend);
    });
  }
  if (clustering && clustering.mds) {
    var box = el("div", "kv-mdsbox", null, extra);
    el("h4", null, "Head clustering: 2-D MDS of the JS distances", box);
    var mdsLabel = el("label", null, "map ", box);
    var mdsSelect = el("select", "kv-mds-kind", null, mdsLabel);
    Object.keys(clustering.mds).forEach(function (k) { el("option", null, k, mdsSelect).value = k; });
    state.mdsKind = mdsSelect.value;
    mdsSelect.addEventListener("change", function () { state.mdsKind = mdsSelect.value; drawMds(); });
    mdsBox = el("div", null, null, box);
  }

  // ------------------------------------------------------------------ probes (not per head)
  var probes = results.probes;
  if (probes && probes.uas) {
    var pbox = el("div", "kv-probesbox", null, extra);
    el("h4", null, "Attention probes: UAS", pbox);
    var pt = el("table", "kv-probes", null, pbox), ph = el("tr", null, null, pt);
    el("th", null, "probe", ph);
    var splits = Object.keys(probes.uas);
    splits.forEach(function (s) { ["weights", "norms"].forEach(function (k) { el("th", null, s + " " + k, ph); }); });
    Object.keys(probes.uas[splits[0]]).forEach(function (name) {
      var tr = el("tr", null, null, pt);
      el("th", null, name, tr);
      splits.forEach(function (s) {
        var v = probes.uas[s][name];
        ["weights", "norms"].forEach(function (k) {
          var x = v !== null && typeof v === "object" ? v[k] : v, td = el("td", null, shown(x), tr);
          td.dataset.value = exact(x);
        });
      });
    });
  }

  function choose(pick) { state.picked = pick; draw(); }
  function draw() {
    drawGrid();
    drawSide();
    if (mdsBox) drawMds();
  }
  root.querySelector(".kv-nojs").remove();
  draw();
  root.dataset.ready = "true";
})();
"""
