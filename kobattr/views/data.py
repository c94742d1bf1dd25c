"""What a view shows and how it is embedded.

A view shows maps of one text (``batch``) of a result: for an encoder-decoder result one ``part`` (the encoder's
self-attention, the decoder's self-attention or the cross-attention, target rows x source columns), some methods,
layers and heads. Padding is left out. Each shown map is a *panel* (method, layer, head; head -1 for a layer-level
map), and a page embeds per panel and query row only the ``k`` entries of largest magnitude (all of them for short
texts) and the row's total, as little-endian binary in base64: float32 values stay exact (JavaScript reads them into
doubles without rounding, and String(x) writes the shortest text that reads back to the same double, which is
Python's repr(float(x))) and take 8 bytes per entry with their column index, so long texts give small pages.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import adaptive_max_pool2d

from ..methods import REGISTRY
from ..result import Attribution, Seq2SeqAttribution, decoder_map_width

VIEWS = ("tokens", "head", "model")
PARTS = ("encoder", "decoder", "cross")
ALL_ENTRIES_UP_TO = 64  # columns: up to this many, every entry of a row is embedded
DEFAULT_TOP_K = 20
MAX_AUTO_DATA_BYTES = 8 * 2**20  # the automatic top-k keeps a page's embedded numbers (in base64) below this
THUMBNAIL_PIXELS = 48  # model-view thumbnails: at most this many pixels per side, each the largest |value| it covers


@dataclass(frozen=True)
class Panel:
    method: str
    layer: int  # position in Selection.layers
    head: int  # -1: the layer-level map


@dataclass
class Selection:
    """Everything a view shows of one text, checked; rows and columns without padding."""

    view: str
    part: Optional[str]  # None for a plain Attribution
    result: Attribution  # whose maps are shown: a seq2seq result's encoder for part="encoder"
    batch: int
    methods: list
    layers: list  # model layer indices (as in result.layers)
    heads: list  # the shown heads of the per-head methods
    rows: Union[slice, Tensor]  # selects the shown rows of a map's row dimension
    columns: Union[slice, Tensor]  # selects the shown columns (a cross map's kept column is never one)
    row_positions: list  # token index of each shown row (in result.tokens[batch], or the source tokens for columns)
    column_positions: list
    row_tokens: list
    column_tokens: list
    panels: list


def display_name(method: str) -> str:
    """The papers' name of a method (ATTN-N); cross maps have no registry entry but follow the same spelling."""
    return REGISTRY[method].display if method in REGISTRY else method.upper().replace("_", "-")


def is_weight_method(method: str, structure: str) -> bool:
    """Maps of attention weights (fractions of 1), drawn with opacity = weight; the other maps are norms."""
    if method in REGISTRY:
        return REGISTRY[method].forms[structure].kind == "weights"
    return method.endswith("_w")  # cross_attn_w


def _positions_selector(positions: list) -> Union[slice, Tensor]:
    """A slice when the positions are consecutive (no copy when indexing), else an index tensor."""
    if positions and positions == list(range(positions[0], positions[-1] + 1)):
        return slice(positions[0], positions[-1] + 1)
    return torch.tensor(positions, dtype=torch.long)


def _as_list(value, name: str, kind: type) -> Optional[list]:
    """None, one ``kind`` or a sequence of them, as a list (None stays None)."""
    if value is None:
        return None
    items = [value] if isinstance(value, kind) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple, range)) or not items \
            or any(isinstance(v, bool) or not isinstance(v, kind) for v in items):
        raise ValueError(f"{name} must be one {kind.__name__} or a non-empty list of them, got {value!r}.")
    return list(dict.fromkeys(items))


def _part(result: Attribution, part: Optional[str]) -> tuple[Attribution, Optional[str], list]:
    """(the Attribution whose maps are shown, the part, the methods it can show)."""
    if not isinstance(result, Attribution):
        raise ValueError(f"views show a kobattr Attribution (what kobattr.analyze returns), got "
                         f"{type(result).__name__}.")
    if not isinstance(result, Seq2SeqAttribution):
        if part is not None:
            raise ValueError(f"part={part!r} is for encoder-decoder results (Seq2SeqAttribution); leave it out for "
                             "this Attribution.")
        shown = result
    else:
        part = "decoder" if part is None else part
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; an encoder-decoder result has parts {', '.join(PARTS)}.")
        if part == "encoder":
            if result.encoder is None:
                raise ValueError("this result holds no encoder analysis; analyze(..., targets=...) without "
                                 "encoder_methods=[] adds one.")
            shown = result.encoder
        else:
            shown = result
    if shown.contracted:
        raise ValueError("this result is contracted (analyze(..., contract=...)): its rows are weighted sums of "
                         "token rows, which a view cannot show; analyze without contract=.")
    if part in ("decoder", "cross"):
        widths = ("N",) if part == "decoder" else ("S", "P")
        methods = [m for m in shown.methods if decoder_map_width(m) in widths]
    else:
        methods = list(shown.methods)
    return shown, part, methods


def _methods(view: str, method, available: list, head_methods: list, part: Optional[str]) -> list:
    where = f"the {part} maps" if part else "this result"
    chosen = _as_list(method, "method", str)
    if chosen is None:
        if view != "head":
            return available
        if not head_methods:
            raise ValueError(f"the head view needs per-head maps, and {where} has none: run analyze(..., heads=True), "
                             f"or name a layer-level method= ({', '.join(available)}).")
        return head_methods
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise ValueError(f"method {unknown[0]!r} is not among the methods of {where}: "
                         f"{', '.join(available) or 'none'}.")
    return chosen


def _layers(result: Attribution, layer) -> list:
    """Model layer indices of result.layers: an index of result.layers, or negative from the end of it."""
    chosen = _as_list(layer, "layer", int)
    if chosen is None:
        return list(result.layers)
    layers = []
    for value in chosen:
        if value < 0 and -len(result.layers) <= value:
            value = result.layers[value]
        if value not in result.layers:
            raise ValueError(f"layer {value} was not analysed; the result holds layers {list(result.layers)} (or count "
                             "from the end with negative numbers).")
        layers.append(value)
    return list(dict.fromkeys(layers))


def select(result: Attribution, view: str, part: Optional[str] = None, method=None, layer=None, heads=None,
           batch: int = 0) -> Selection:
    """What ``view`` shows of ``result``, or ValueError with a sentence that says what is wrong."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose {', '.join(VIEWS)}.")
    shown, part, available = _part(result, part)
    B = shown.attention_mask.shape[0]
    if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < B:
        raise ValueError(f"batch must be the index of one of the result's {B} text(s) (0..{B - 1}), got {batch!r}.")
    head_methods = [m for m in available if m in shown.head_maps]
    methods = _methods(view, method, available, head_methods, part)
    layers = _layers(shown, layer)

    per_head = [m for m in methods if m in shown.head_maps] if view != "tokens" else []
    head_count = shown.head_maps[per_head[0]].shape[2] if per_head else 0
    chosen_heads = _as_list(heads, "heads", int)
    if chosen_heads is not None:
        if not per_head:
            raise ValueError(f"heads= chooses heads of per-head maps, and the {view} view of "
                             f"{', '.join(methods)} has none" + (" (the tokens view shows layer-level maps)."
                                                                 if view == "tokens" else "."))
        outside = [h for h in chosen_heads if not 0 <= h < head_count]
        if outside:
            raise ValueError(f"head {outside[0]} does not exist; the layers have {head_count} heads "
                             f"(0..{head_count - 1}).")
    heads = chosen_heads if chosen_heads is not None else list(range(head_count))

    targets = [i for i, v in enumerate(shown.attention_mask[batch].tolist()) if v]
    if part == "cross":
        columns = [j for j, v in enumerate(shown.source_mask[batch].tolist()) if v]
        column_tokens = [shown.source_tokens[batch][j] for j in columns]
    else:
        columns, column_tokens = targets, [shown.tokens[batch][j] for j in targets]
    if shown.rows is None:
        row_positions = map_rows = targets
    else:  # maps of selected query rows: row k of a map is token rows[k]
        selected, real = shown.rows.tolist(), set(targets)
        map_rows = [k for k, i in enumerate(selected) if i in real]
        row_positions = [selected[k] for k in map_rows]
    if not row_positions or not columns:
        raise ValueError(f"text {batch} has no token to show (its attention mask is all padding).")
    panels = [Panel(m, li, h) for m in methods for li in range(len(layers))
              for h in (heads if m in per_head else [-1])]
    return Selection(view, part, shown, batch, methods, layers, heads if per_head else [],
                     _positions_selector(map_rows), _positions_selector(columns), row_positions, columns,
                     [shown.tokens[batch][i] for i in row_positions], column_tokens, panels)


def panel_matrix(selection: Selection, panel: Panel) -> tuple[Tensor, Optional[Tensor]]:
    """(the panel's (R, C) map without padding, the kept column (R,) of a residual cross map or None)."""
    result = selection.result
    layer = result.layers.index(selection.layers[panel.layer])
    if panel.head < 0:
        full = result.maps[panel.method][layer, selection.batch]
    else:
        full = result.head_maps[panel.method][layer, selection.batch, panel.head]
    full = full[selection.rows]
    kept = full[:, -1] if selection.part == "cross" and decoder_map_width(panel.method) == "P" else None
    return full[:, selection.columns], kept


def automatic_top_k(top_k: Optional[int], panels: int, rows: int, columns: int, entry_bytes: int = 6,
                    row_bytes: int = 4) -> int:
    """Entries embedded per row: ``top_k`` (at most the columns), or without it every entry of maps up to
    ALL_ENTRIES_UP_TO columns and otherwise DEFAULT_TOP_K, fewer when the page's numbers would take more than
    MAX_AUTO_DATA_BYTES, but at least one (so that over ~170 maps of 4096 rows a page grows beyond it: choose
    layers, heads or methods then). entry_bytes: an entry's value and column index; row_bytes: a row's total."""
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive number of entries per row, got {top_k!r}.")
        return min(top_k, columns)
    if columns <= ALL_ENTRIES_UP_TO:
        return columns
    row_budget = MAX_AUTO_DATA_BYTES * 3 / 4 / (panels * rows)  # base64 writes 3 bytes as 4 characters
    return max(1, min(DEFAULT_TOP_K, columns, int((row_budget - row_bytes) // entry_bytes)))


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _value_type(t: Tensor) -> tuple[str, torch.dtype]:
    """float64 maps stay float64; every narrower float converts to float32 exactly."""
    return ("f8", torch.float64) if t.dtype == torch.float64 else ("f4", torch.float32)


def payload(selection: Selection, top_k: Optional[int] = None) -> dict:
    """The JSON-ready data of a view: tokens, panels, per panel and row the top-k (column, value) entries and the row
    total, kept columns, and per view the mixing ratios (tokens) or thumbnails and opacity scales (head, model)."""
    result, view = selection.result, selection.view
    R, C = len(selection.row_positions), len(selection.column_positions)
    value_type, torch_type = _value_type(panel_matrix(selection, selection.panels[0])[0])
    index_type = "<u2" if C <= 1 << 16 else "<u4"
    value_bytes, index_bytes = int(value_type[1]), int(index_type[2])
    k = automatic_top_k(top_k, len(selection.panels), R, C, value_bytes + index_bytes, value_bytes)
    indices, values, totals, kept, thumbnails = [], [], [], [], []
    scales: dict = {m: [0.0] * len(selection.layers) for m in selection.methods}
    thumb_shape = (min(R, THUMBNAIL_PIXELS), min(C, THUMBNAIL_PIXELS))
    for panel in selection.panels:
        matrix, kept_column = panel_matrix(selection, panel)
        matrix = matrix.to(torch_type)
        magnitude = matrix.abs().nan_to_num_(0.0) if k < C or view == "model" else None  # NaN ranks last
        if k == C:  # every entry, in column order
            chosen, top = torch.arange(C).expand(R, C), matrix
        else:
            chosen = magnitude.topk(k, dim=-1).indices
            top = matrix.gather(-1, chosen)
        indices.append(chosen.numpy().astype(index_type))
        values.append(top.numpy())
        totals.append(matrix.double().sum(-1).to(torch_type).numpy())  # summed in float64, stored like the values
        kept.append(None if kept_column is None else _b64(kept_column.to(torch_type).numpy(), "<" + value_type))
        largest = float(top.abs().nan_to_num_(0.0).max())  # each row's largest |value| is among the embedded ones
        scales[panel.method][panel.layer] = max(scales[panel.method][panel.layer], largest)
        if view == "model":
            pooled = adaptive_max_pool2d(magnitude.float()[None], thumb_shape)[0]
            thumbnails.append((255 * pooled / pooled.max().clamp_min(1e-30)).round().to(torch.uint8).numpy())
    structure = result.structure
    for m in selection.methods:  # opacity: a weight is its own opacity; norms are divided by the layer's largest one
        if is_weight_method(m, structure):
            scales[m] = [1.0] * len(selection.layers)
    data = {
        "view": view,
        "rows": selection.row_tokens, "rowIndex": selection.row_positions,
        "columns": selection.column_tokens, "columnIndex": selection.column_positions,
        "square": selection.row_positions == selection.column_positions,
        "methods": [{"name": m, "display": display_name(m), "perHead": m in result.head_maps and view != "tokens"}
                    for m in selection.methods],
        "layers": selection.layers, "heads": selection.heads,
        "panels": [[selection.methods.index(p.method), p.layer, p.head] for p in selection.panels],
        "k": k, "scales": scales,
        "entries": {"index": _b64(np.concatenate([i.reshape(-1) for i in indices]), index_type),
                    "indexType": "u2" if index_type == "<u2" else "u4",
                    "value": _b64(np.concatenate([v.reshape(-1) for v in values]), "<" + value_type),
                    "valueType": value_type,
                    "total": _b64(np.concatenate(totals), "<" + value_type),
                    "kept": kept},
    }
    if view == "tokens":
        ratio_rows = torch.tensor(selection.row_positions)
        ratios = {}
        for m in selection.methods:
            if m in result.ratios:
                layer_rows = torch.tensor([result.layers.index(layer) for layer in selection.layers])
                table = result.ratios[m][layer_rows, selection.batch][:, ratio_rows]
                ratio_type, ratio_torch = _value_type(table)
                ratios[m] = {"value": _b64(table.to(ratio_torch).numpy(), "<" + ratio_type), "type": ratio_type}
        data["ratios"] = ratios
    if view == "model":
        data["thumbnails"] = {"pixels": _b64(np.stack(thumbnails), "u1"), "shape": list(thumb_shape)}
    return data
