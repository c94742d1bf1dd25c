"""The style and script of every view: plain CSS and vanilla JavaScript, nothing loaded from anywhere.

Every rule is scoped under .kv-root and the script finds its own view by the id in {{ROOT}}, so several views share
one notebook or page. Token text reaches the page only through textContent. Elements a reader (or a test) checks
carry exact values: data-value is String(x) of the embedded float32 (or float64) number, the shortest decimal text
that reads back to the same double, and data-row / data-column / data-index are token indices of the result (row and
column tokens of result.tokens[batch]; a cross view's columns index the source tokens).
"""

CSS = r"""
.kv-root { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0.5em 0; }
.kv-root .kv-title { font-weight: 600; margin: 0 0 0.3em; }
.kv-root .kv-note, .kv-root .kv-help { color: #555; font-size: 0.85em; margin: 0 0 0.5em; max-width: 70em; }
.kv-root .kv-controls { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; margin-bottom: 0.6em;
  font-size: 0.9em; }
.kv-root .kv-controls input[type=number] { width: 5.5em; }
.kv-root .kv-tok { white-space: pre; font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 12px; }
.kv-root span.kv-tok { padding: 1px 3px; margin: 1px; border-radius: 3px; display: inline-block; }
.kv-root .kv-sentence { line-height: 1.9; margin-bottom: 0.8em; padding: 0.3em; background: #f5f5f5;
  border-radius: 4px; }
.kv-root .kv-sentence .kv-tok, .kv-root text.kv-tok { cursor: pointer; }
.kv-root .kv-sentence .kv-tok { border: 1px solid #ccc; background: #fff; }
.kv-root .kv-sentence .kv-tok.kv-selected { background: #2166ac; color: #fff; border-color: #2166ac; }
.kv-root table.kv-table { border-collapse: collapse; }
.kv-root .kv-table th, .kv-root .kv-table td { padding: 2px 6px; border-bottom: 1px solid #e4e4e4;
  vertical-align: top; text-align: left; font-size: 0.85em; }
.kv-root .kv-table td.kv-cells { line-height: 1.8; }
.kv-root .kv-cell.kv-self { outline: 2px solid #f4a300; }
.kv-root .kv-cell.kv-dropped { color: #999; }
.kv-root .kv-cell.kv-kept { font-style: italic; border: 1px dashed #888; }
.kv-root .kv-head { display: inline-block; padding: 1px 6px; margin: 1px; border-radius: 3px; color: #fff;
  cursor: pointer; font-size: 0.85em; user-select: none; }
.kv-root .kv-head.kv-off { opacity: 0.25; }
.kv-root .kv-panels { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; }
.kv-root .kv-panel h4 { margin: 0.2em 0; font-size: 0.95em; }
.kv-root text.kv-tok.kv-selected { font-weight: 700; fill: #2166ac; }
.kv-root .kv-grid td { padding: 1px; border: none; }
.kv-root canvas.kv-thumb { width: 48px; height: 48px; image-rendering: pixelated; border: 1px solid #ddd;
  cursor: pointer; display: block; }
.kv-root canvas.kv-thumb.kv-open { border: 2px solid #f4a300; }
.kv-root .kv-detail { margin-top: 0.8em; }
"""

JS = r"""
(function () {
  "use strict";
  var ROOT_ID = "{{ROOT}}";
  var WINDOW = 64;  // tokens drawn at once; the range controls move the window over long texts
  var LINE = 18, TEXT = 140, GAP = 150;  // head view geometry (px)
  var TYPES = { u1: Uint8Array, u2: Uint16Array, u4: Uint32Array, f4: Float32Array, f8: Float64Array };
  var SVG = "http://www.w3.org/2000/svg";
  var script = document.currentScript, tries = 0;

  function start() {
    var parent = script && script.parentElement;
    var root = parent && parent.id === ROOT_ID ? parent : document.getElementById(ROOT_ID);
    if (!root) {  // the classic Notebook runs an output's scripts before it attaches the output
      if (++tries < 100) setTimeout(start, 50);
      return;
    }
    var data = JSON.parse(root.querySelector("script.kv-data").textContent);
    root.querySelector(".kv-nojs").remove();
    view(root, data);
  }

  function decode(text, type) {
    var binary = atob(text), bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return new TYPES[type](bytes.buffer);
  }
  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function svgElement(tag, attributes, className) {
    var node = document.createElementNS(SVG, tag);
    for (var name in attributes) node.setAttribute(name, String(attributes[name]));
    if (className) node.setAttribute("class", className);
    return node;
  }
  function shown(token) {  // control characters visible, blank tokens as a visible space
    var text = token.replace(/\n/g, "\\n").replace(/\r/g, "\\r").replace(/\t/g, "\\t");
    return text.trim() === "" ? "\u2423".repeat(Math.max(text.length, 1)) : text;
  }
  function number(value) {
    return isNaN(value) ? "n/a" : Number(value.toPrecision(4)).toString();
  }
  function headColor(head) {
    return "hsl(" + ((head * 137.5) % 360).toFixed(1) + ",65%,42%)";
  }
  function range(extent) {
    var out = [];
    for (var i = extent.from; i < extent.to; i++) out.push(i);
    return out;
  }

  function view(root, data) {
    var R = data.rows.length, C = data.columns.length, K = data.k;
    var index = decode(data.entries.index, data.entries.indexType);
    var value = decode(data.entries.value, data.entries.valueType);
    var total = decode(data.entries.total, data.entries.valueType);
    var kept = data.entries.kept.map(function (b) { return b === null ? null : decode(b, data.entries.valueType); });
    var panelAt = {}, methodIndex = {};
    data.panels.forEach(function (p, i) { panelAt[p.join("/")] = i; });
    data.methods.forEach(function (method, m) { methodIndex[method.name] = m; });
    var state = {
      method: 0, layer: data.layers.length - 1, row: data.view === "tokens" ? 0 : null, column: null,
      heads: {}, normalise: true, open: null, rows: { from: 0, to: Math.min(R, WINDOW) }
    };
    state.columns = data.square ? state.rows : { from: 0, to: Math.min(C, WINDOW) };
    data.heads.forEach(function (h) { state.heads[h] = true; });
    var controls = root.querySelector(".kv-controls"), body = root.querySelector(".kv-body");

    function panel(method, layer, head) {
      return panelAt[method + "/" + layer + "/" + head];
    }
    function entries(p, r) {  // the embedded [column, value] pairs of row r of panel p
      var out = [], base = (p * R + r) * K;
      for (var s = 0; s < K; s++) out.push([index[base + s], value[base + s]]);
      return out;
    }
    function tokenSpan(className, text, position, original) {
      var span = element("span", "kv-tok " + className, shown(text));
      span.dataset.pos = String(position);
      span.dataset.index = String(original);
      return span;
    }

    // ------------------------------------------------------------------ controls
    function select(className, label, options, chosen, onChange) {
      var box = element("label", "", label + " "), menu = element("select", className);
      options.forEach(function (text, i) { menu.appendChild(new Option(text, String(i))); });
      menu.value = String(chosen);
      menu.addEventListener("change", function () { onChange(Number(menu.value)); update(); });
      box.appendChild(menu);
      controls.appendChild(box);
    }
    function rangeControl(label, extent, count) {
      if (count <= WINDOW) return;
      var box = element("span", "kv-range", label + " ");
      var from = element("input", "kv-from"), to = element("input", "kv-to");
      [from, to].forEach(function (input) { input.type = "number"; input.min = "0"; input.max = String(count); });
      function show() { from.value = String(extent.from); to.value = String(extent.to); }
      function set(start, end) {
        var first = Math.max(0, Math.min(start, count - 1)), last = Math.max(first + 1, Math.min(end, count));
        var moved = first !== extent.from || last !== extent.to;
        extent.from = first;
        extent.to = last;
        show();
        // only a moved window redraws: the change event of a field left by a click on a token would otherwise
        // rebuild that token under the click, and the click would be lost
        if (moved) update();
      }
      from.addEventListener("change", function () {  // moves the window, keeping its width
        set(Number(from.value), Number(from.value) + extent.to - extent.from);
      });
      to.addEventListener("change", function () { set(extent.from, Number(to.value)); });
      var previous = element("button", "kv-previous", "\u25c0"), next = element("button", "kv-next", "\u25b6");
      previous.type = next.type = "button";
      previous.addEventListener("click", function () {
        var width = extent.to - extent.from;
        set(extent.from - width, extent.from);
      });
      next.addEventListener("click", function () {
        var width = extent.to - extent.from;
        set(extent.to, extent.to + width);
      });
      box.appendChild(from);
      box.appendChild(document.createTextNode(" to "));
      box.appendChild(to);
      box.appendChild(document.createTextNode(" of " + count + " "));
      box.appendChild(previous);
      box.appendChild(next);
      controls.appendChild(box);
      show();
    }
    function ranges() {
      rangeControl(data.square ? "tokens" : "rows", state.rows, R);
      if (!data.square) rangeControl("columns", state.columns, C);
    }
    var layerNames = data.layers.map(function (l) { return "layer " + (l + 1); });

    // ------------------------------------------------------------------ tokens view
    function tokensView() {
      if (data.methods.length > 1) {
        select("kv-method", "method", data.methods.map(function (m) { return m.display; }), state.method,
               function (m) { state.method = m; });
      }
      var normalise = element("label", "", " normalise each row");
      var box = element("input", "kv-normalise");
      box.type = "checkbox";
      box.checked = true;
      box.addEventListener("change", function () { state.normalise = box.checked; update(); });
      normalise.prepend(box);
      controls.appendChild(normalise);
      ranges();
      var sentence = element("div", "kv-sentence"), table = element("table", "kv-table");
      body.appendChild(sentence);
      body.appendChild(table);
      body.addEventListener("click", function (event) {
        var token = event.target.closest(".kv-sentence .kv-row");
        if (token) { state.row = Number(token.dataset.pos); update(); }
      });
      return function () {
        sentence.textContent = "";
        range(state.rows).forEach(function (r) {
          var span = tokenSpan("kv-row" + (r === state.row ? " kv-selected" : ""), data.rows[r], r, data.rowIndex[r]);
          sentence.appendChild(span);
        });
        table.textContent = "";
        var method = data.methods[state.method], ratios = data.ratios[method.name];
        var ratioValues = ratios ? decode(ratios.value, ratios.type) : null;
        var head = element("tr"), r = state.row;
        ["layer"].concat(ratios ? ["mixing ratio"] : [], ["contributions to " + shown(data.rows[r]) + " (token " +
                                                          data.rowIndex[r] + ")", "row total"])
          .forEach(function (name) { head.appendChild(element("th", "", name)); });
        table.appendChild(head);
        var rows = data.layers.map(function (layer, l) { return entries(panel(state.method, l, -1), r); });
        var tableScale = 0;
        rows.forEach(function (row) {
          row.forEach(function (e) { tableScale = Math.max(tableScale, Math.abs(e[1])); });
        });
        rows.forEach(function (row, l) {
          var p = panel(state.method, l, -1), byColumn = {}, rowScale = 0;
          row.forEach(function (e) { byColumn[e[0]] = e[1]; rowScale = Math.max(rowScale, Math.abs(e[1])); });
          var scale = state.normalise ? rowScale : tableScale;
          var tr = element("tr", "kv-layer");
          tr.dataset.layer = String(data.layers[l]);
          tr.appendChild(element("td", "", layerNames[l]));
          if (ratioValues) {
            var ratio = ratioValues[l * R + r];
            var cell = element("td", "kv-ratio", isNaN(ratio) ? "n/a" : (100 * ratio).toFixed(1) + "%");
            cell.dataset.value = String(ratio);
            tr.appendChild(cell);
          }
          var cells = element("td", "kv-cells");
          range(state.columns).forEach(function (c) {
            var span = tokenSpan("kv-cell", data.columns[c], c, data.columnIndex[c]);
            if (data.columnIndex[c] === data.rowIndex[r] && data.square) span.classList.add("kv-self");
            if (c in byColumn) {
              var v = byColumn[c], strength = scale > 0 ? Math.abs(v) / scale : 0;
              span.dataset.value = String(v);
              span.style.background = "rgba(33,102,172," + strength.toFixed(3) + ")";
              if (strength > 0.55) span.style.color = "#fff";
              span.title = shown(data.columns[c]) + " \u2192 " + shown(data.rows[r]) + ": " + number(v);
            } else {
              span.classList.add("kv-dropped");
              span.title = "not among the top " + K + " of this row";
            }
            cells.appendChild(span);
          });
          if (kept[p]) {
            var keep = element("span", "kv-tok kv-cell kv-kept", "[kept]");
            keep.dataset.value = String(kept[p][r]);
            keep.title = "what the target token keeps: " + number(kept[p][r]);
            cells.appendChild(keep);
          }
          tr.appendChild(cells);
          var sum = element("td", "kv-total", number(total[p * R + r]));
          sum.dataset.value = String(total[p * R + r]);
          tr.appendChild(sum);
          table.appendChild(tr);
        });
      };
    }

    // ------------------------------------------------------------------ lines between row and column tokens
    function lines(method, layer, heads) {  // one method's panels of one layer as an SVG; heads: -1 = layer-level
      var rows = range(state.rows), columns = range(state.columns);
      var svg = svgElement("svg", { width: 2 * TEXT + GAP, height: Math.max(rows.length, columns.length) * LINE + 6 },
                           "kv-lines");
      var rowY = {}, columnY = {};
      rows.forEach(function (r, i) { rowY[r] = i * LINE + LINE / 2 + 3; });
      columns.forEach(function (c, i) { columnY[c] = i * LINE + LINE / 2 + 3; });
      var scale = data.scales[data.methods[method].name][layer];
      var focused = state.row !== null || state.column !== null;
      var edges = document.createDocumentFragment();
      heads.forEach(function (head) {
        if (head >= 0 && !state.heads[head]) return;
        var p = panel(method, layer, head), color = head < 0 ? "#444" : headColor(head);
        rows.forEach(function (r) {
          if (state.row !== null && r !== state.row) return;
          entries(p, r).forEach(function (e) {
            var c = e[0], v = e[1];
            if (!(c in columnY) || (state.column !== null && c !== state.column)) return;
            var line = svgElement("line", { x1: TEXT, y1: rowY[r], x2: TEXT + GAP, y2: columnY[c], stroke: color,
                                            "stroke-width": 2,
                                            "stroke-opacity": scale > 0 ? Math.min(1, Math.abs(v) / scale) : 0 },
                                  "kv-edge");
            line.dataset.head = String(head);
            line.dataset.row = String(data.rowIndex[r]);
            line.dataset.column = String(data.columnIndex[c]);
            line.dataset.value = String(v);
            if (focused) {  // few lines: each gets a tooltip
              var title = svgElement("title", {});
              title.textContent = (head < 0 ? "" : "head " + head + ": ") + shown(data.columns[c]) + " \u2192 " +
                                  shown(data.rows[r]) + " " + number(v);
              line.appendChild(title);
            }
            edges.appendChild(line);
          });
        });
      });
      svg.appendChild(edges);
      rows.forEach(function (r) {
        var text = svgElement("text", { x: TEXT - 6, y: rowY[r] + 4, "text-anchor": "end" },
                              "kv-tok kv-row" + (r === state.row ? " kv-selected" : ""));
        text.textContent = shown(data.rows[r]);
        text.dataset.pos = String(r);
        text.dataset.index = String(data.rowIndex[r]);
        svg.appendChild(text);
      });
      columns.forEach(function (c) {
        var text = svgElement("text", { x: TEXT + GAP + 6, y: columnY[c] + 4 },
                              "kv-tok kv-column" + (c === state.column ? " kv-selected" : ""));
        text.textContent = shown(data.columns[c]);
        text.dataset.pos = String(c);
        text.dataset.index = String(data.columnIndex[c]);
        svg.appendChild(text);
      });
      return svg;
    }
    function focusOn(event) {  // click a row token: its lines only; a column token: the lines into it; again: all
      var token = event.target.closest("text.kv-tok");
      if (!token) return false;
      var position = Number(token.dataset.pos);
      if (token.classList.contains("kv-row")) {
        state.row = state.row === position ? null : position;
        state.column = null;
      } else {
        state.column = state.column === position ? null : position;
        state.row = null;
      }
      update();
      return true;
    }
    function opacityNote(method) {
      var weights = data.scales[method.name].every(function (s) { return s === 1; });
      return weights ? "opacity = weight" : "opacity = value / the layer's largest " + method.display + " value";
    }

    // ------------------------------------------------------------------ head view
    function headView() {
      if (data.layers.length > 1) {
        select("kv-layer", "layer", layerNames, state.layer, function (l) { state.layer = l; });
      }
      if (data.heads.length) {
        var swatches = element("span", "kv-heads", "heads ");
        data.heads.forEach(function (h) {
          var swatch = element("span", "kv-head", String(h));
          swatch.dataset.head = String(h);
          swatch.style.background = headColor(h);
          swatches.appendChild(swatch);
        });
        swatches.addEventListener("click", function (event) {
          var swatch = event.target.closest(".kv-head");
          if (!swatch) return;
          var h = Number(swatch.dataset.head);
          state.heads[h] = !state.heads[h];
          update();
        });
        controls.appendChild(swatches);
      }
      ranges();
      var panels = element("div", "kv-panels");
      body.appendChild(panels);
      body.addEventListener("click", focusOn);
      return function () {
        root.querySelectorAll(".kv-head").forEach(function (swatch) {
          swatch.classList.toggle("kv-off", !state.heads[Number(swatch.dataset.head)]);
        });
        panels.textContent = "";
        data.methods.forEach(function (method, m) {
          var box = element("div", "kv-panel");
          box.dataset.method = method.name;
          box.appendChild(element("h4", "", method.display + " \u00b7 " + layerNames[state.layer]));
          box.appendChild(element("div", "kv-help", opacityNote(method)));
          box.appendChild(lines(m, state.layer, method.perHead ? data.heads : [-1]));
          panels.appendChild(box);
        });
      };
    }

    // ------------------------------------------------------------------ model view
    function modelView() {
      var pixels = decode(data.thumbnails.pixels, "u1");
      var height = data.thumbnails.shape[0], width = data.thumbnails.shape[1], size = height * width;
      var grids = element("div", "kv-panels"), detail = element("div", "kv-detail");
      data.methods.forEach(function (method, m) {
        var box = element("div", "kv-panel kv-grid"), table = element("table");
        box.dataset.method = method.name;
        box.appendChild(element("h4", "", method.display));
        var heads = method.perHead ? data.heads : [-1], header = element("tr");
        header.appendChild(element("th"));
        heads.forEach(function (h) { header.appendChild(element("th", "", h < 0 ? "layer" : "head " + h)); });
        table.appendChild(header);
        data.layers.forEach(function (layer, l) {
          var tr = element("tr");
          tr.appendChild(element("th", "", layerNames[l]));
          heads.forEach(function (h) {
            var p = panel(m, l, h), canvas = element("canvas", "kv-thumb"), td = element("td");
            canvas.width = width;
            canvas.height = height;
            canvas.dataset.method = method.name;
            canvas.dataset.layer = String(layer);
            canvas.dataset.head = String(h);
            canvas.title = method.display + ", " + layerNames[l] + (h < 0 ? "" : ", head " + h);
            var context = canvas.getContext("2d"), image = context.createImageData(width, height);
            for (var i = 0; i < size; i++) {
              image.data[4 * i] = 33; image.data[4 * i + 1] = 102; image.data[4 * i + 2] = 172;
              image.data[4 * i + 3] = pixels[p * size + i];
            }
            context.putImageData(image, 0, 0);
            td.appendChild(canvas);
            tr.appendChild(td);
          });
          table.appendChild(tr);
        });
        box.appendChild(table);
        grids.appendChild(box);
      });
      body.appendChild(element("p", "kv-help", "Click a map to open it below; each thumbnail is scaled to its own " +
                                               "largest value."));
      body.appendChild(grids);
      body.appendChild(detail);
      ranges();
      body.addEventListener("click", function (event) {
        var thumb = event.target.closest("canvas.kv-thumb");
        if (thumb) {
          state.open = { method: methodIndex[thumb.dataset.method],
                         layer: data.layers.indexOf(Number(thumb.dataset.layer)), head: Number(thumb.dataset.head) };
          state.row = state.column = null;
          update();
        } else {
          focusOn(event);
        }
      });
      return function () {
        root.querySelectorAll("canvas.kv-thumb").forEach(function (thumb) {
          var open = state.open && methodIndex[thumb.dataset.method] === state.open.method &&
                     Number(thumb.dataset.layer) === data.layers[state.open.layer] &&
                     Number(thumb.dataset.head) === state.open.head;
          thumb.classList.toggle("kv-open", Boolean(open));
        });
        detail.textContent = "";
        if (!state.open) return;
        var method = data.methods[state.open.method];
        detail.dataset.method = method.name;
        detail.dataset.layer = String(data.layers[state.open.layer]);
        detail.dataset.head = String(state.open.head);
        detail.appendChild(element("h4", "", method.display + " \u00b7 " + layerNames[state.open.layer] +
                                             (state.open.head < 0 ? "" : " \u00b7 head " + state.open.head)));
        detail.appendChild(element("div", "kv-help", opacityNote(method)));
        detail.appendChild(lines(state.open.method, state.open.layer, [state.open.head]));
      };
    }

    var update = { tokens: tokensView, head: headView, model: modelView }[data.view]();
    update();
    root.dataset.ready = "true";
  }

  start();
})();
"""
