"""Head-level analyses of Clark et al. 2019 and Kobayashi et al. 2020 (spec section 8): `kobattr heads`.

Per analysed layer and head, for the attention weights alpha^h and for the norms ||alpha^h_ij f^h(x_j)||
normalised per row, over the visible (query, key) pairs of every text (padding, causal and window masks
respected):

- special-token share: mean over query rows of the row's share going to each key category
  ([CLS]/BOS, [SEP]/EOS, "." and ",", other);
- entropy of the rows (and of the first token's row alone) beside the uniform baseline mean ln(n_visible_i);
- relative position: mean A_{i,i-1} and A_{i,i+1} (a head above 0.5 is a previous- / next-token head);
- no-op evidence: per key category mean alpha and mean ||f^h(x_j)||; Spearman of alpha^h_ij vs ||f^h(x_j)||;
- dependency probing on gold CoNLL-U trees (accuracy of the best head per relation, both directions,
  beside the best fixed-offset baseline).

Pooling: every statistic is a mean over all visible query rows of all texts (each row counts once); the
Spearman correlation is computed per text and averaged over texts (texts where it is undefined, e.g. one
token, are left out). kobattr's choices where the spec leaves room: the per-category means of alpha and
||f|| are, per row, the mean over the row's visible keys of that category, averaged over the rows that see
at least one such key; a row without i-1 (or i+1) visible contributes 0 to prev_token (next_token);
[MASK], [UNK] and other specials count as "other"; when BOS and EOS are one token (GPT-2), it is
[CLS]/BOS at a text's first position and [SEP]/EOS elsewhere.

Dependency probing: the gold words are tokenised themselves (is_split_into_words; word_ids map pieces to
words). A multi-word token (CoNLL-U range "3-4") is one span: its syntactic words all map to the surface
form's pieces; an arc inside one span cannot be scored (a word never predicts itself) and is counted as
skipped; empty nodes ("8.1") are skipped; root arcs are not scored. Word-level maps sum over key pieces and
average over query pieces (after the per-row normalisation of the norms), special tokens excluded; the
argmax runs over the other words visible to the row (ties: the first word).

Shape vocabulary: L analysed layers, B batch, H heads, N padded tokens, n tokens of one text, C key
categories, U surface words of one sentence.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..layer import LayerInputError, visible
from ..methods import row_normalize, spearman
from ..io import atomic_write
from ..result import join_pieces
from ..views import headview

CATEGORIES = ("cls_bos", "sep_eos", "punct", "other")
CATEGORY_LABELS = {"cls_bos": "[CLS]/BOS", "sep_eos": "[SEP]/EOS", "punct": '"." and ","', "other": "other"}
KINDS = ("weights", "norms")
DIRECTIONS = ("dep_to_head", "head_to_dep")
OFFSETS = (-1, 1, -2, 2, -3, 3, -4, 4, -5, 5)  # also the tie order of the offset baseline: nearest first
POSITION_THRESHOLD = 0.5
PUNCT = frozenset({".", ","})
SAMPLE_CONLLU = Path(__file__).resolve().parent.parent / "data" / "sample.conllu"


def sample_conllu_path() -> Path:
    """The self-written CoNLL-U sample shipped with kobattr (CC0)."""
    return SAMPLE_CONLLU


# ----------------------------------------------------------------------------------------------- CoNLL-U
@dataclass
class DepSentence:
    """A gold tree over surface words ("units": a multi-word token is one unit).

    units: surface forms; arcs: (dependent unit, head unit, relation) of every scored arc;
    skipped: counts of arcs not scored ("root", "within_token", "empty_node", "no_head");
    roots: the units of the words whose HEAD is 0 (the attention probes score ROOT as a candidate)."""

    units: list
    arcs: list
    text: str = ""
    skipped: dict = field(default_factory=dict)
    roots: list = field(default_factory=list)


def read_conllu(source, limit: Optional[int] = None) -> list[DepSentence]:
    """Sentences of a CoNLL-U file (path) or text (a str holding tab-separated lines), parsed with ``conllu``.

    Raises ValueError with the sentence number when a line cannot be parsed or a HEAD points nowhere."""
    import conllu

    if isinstance(source, (str, os.PathLike)) and "\t" not in str(source):
        text = Path(source).read_text(encoding="utf-8")
    else:
        text = str(source)
    try:
        parsed = conllu.parse(text)
    except Exception as err:  # conllu raises its own ParseException subclasses
        raise ValueError(f"not valid CoNLL-U ({type(err).__name__}: {err}).") from None
    sentences = []
    for number, tokens in enumerate((t for t in parsed if len(t)), 1):  # a comment block alone is no sentence
        sentences.append(_sentence(tokens, number))
        if limit is not None and len(sentences) >= limit:
            break
    if not sentences:
        raise ValueError("the CoNLL-U input holds no sentence.")
    return sentences


def _sentence(tokens, number: int) -> DepSentence:
    units: list[str] = []
    unit_of: dict[int, int] = {}
    span_end = 0  # last word id covered by the current multi-word token
    skipped = {"root": 0, "within_token": 0, "empty_node": 0, "no_head": 0}
    words = []
    for tok in tokens:
        tid = tok["id"]
        if isinstance(tid, tuple):
            if len(tid) == 3 and tid[1] == "-":  # multi-word token: one surface span
                units.append(tok["form"])
                for w in range(tid[0], tid[2] + 1):
                    unit_of[w] = len(units) - 1
                span_end = tid[2]
            elif len(tid) == 3 and tid[1] == ".":
                skipped["empty_node"] += 1
            continue
        if not isinstance(tid, int):
            raise ValueError(f"sentence {number}: token id {tid!r} is not a word, range or empty node.")
        if tid > span_end:
            units.append(tok["form"])
            unit_of[tid] = len(units) - 1
        words.append(tok)
    arcs, roots = [], []
    for tok in words:
        head, rel = tok["head"], tok["deprel"]
        if head is None or rel in (None, "_"):
            skipped["no_head"] += 1
            continue
        if head == 0:
            skipped["root"] += 1
            roots.append(unit_of[tok["id"]])
            continue
        if head not in unit_of:
            raise ValueError(f"sentence {number}: word {tok['id']} has HEAD {head}, which is not a word of the sentence.")
        d, h = unit_of[tok["id"]], unit_of[head]
        if d == h:
            skipped["within_token"] += 1
            continue
        arcs.append((d, h, rel))
    text = tokens.metadata.get("text") or " ".join(units)
    return DepSentence(units=units, arcs=arcs, text=text, skipped=skipped, roots=roots)


# ----------------------------------------------------------------------------------------------- accumulation
def _nan_to_none(values):
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if isinstance(values, float) and not math.isfinite(values) else values


def _grid(t: Tensor) -> list:
    return _nan_to_none(t.double().tolist())


class HeadStatistics:
    """Running sums of every statistic of spec section 8, fed batch by batch (nothing of a batch is kept).

    n_layers, n_heads: of the analysed layers; causal and windows (one per analysed layer, 0 = none): the
    visibility rule of the model (kobattr.layer.visible)."""

    def __init__(self, n_layers: int, n_heads: int, causal: bool = False, windows: Optional[Sequence[int]] = None):
        L, H, C = n_layers, n_heads, len(CATEGORIES)
        self.L, self.H, self.causal = L, H, causal
        self.windows = list(windows) if windows is not None else [0] * L
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.texts = self.rows = 0
        self.share = {k: z(L, H, C) for k in KINDS}
        self.entropy = {k: z(L, H) for k in KINDS}
        self.entropy_first = {k: z(L, H) for k in KINDS}
        self.prev = {k: z(L, H) for k in KINDS}
        self.next = {k: z(L, H) for k in KINDS}
        self.uniform = z(L)
        self.alpha_cat, self.fx_cat, self.cat_rows = z(L, H, C), z(L, H, C), z(L, C)
        self.spearman_sum, self.spearman_texts = z(L, H), z(L, H)
        self.sentences = 0
        self.arc_counts: dict[str, int] = {}
        self.correct = {k: {d: {} for d in DIRECTIONS} for k in KINDS}
        self.offset_correct: dict[str, Tensor] = {}
        self.skipped = {"root": 0, "within_token": 0, "empty_node": 0, "no_head": 0, "missing_pieces": 0}

    _FIXED = ("L", "H", "causal", "windows")

    def state(self) -> dict:
        """The sums as a batch state of kobattr.analyses.parts (the shape and visibility rule as Fixed values)."""
        from .parts import Fixed

        return {k: Fixed(v) if k in self._FIXED else v for k, v in vars(self).items()}

    @classmethod
    def from_state(cls, state: dict) -> "HeadStatistics":
        """The statistics whose sums are ``state`` (a sum of state()s)."""
        stats = cls.__new__(cls)
        stats.__dict__.update({k: v.value if k in cls._FIXED else v for k, v in state.items()})
        return stats

    def visibility(self, n: int) -> Tensor:
        """(L, n, n) bool: key j visible to query i in each analysed layer, for one unpadded text."""
        pos = torch.arange(n)
        ones = torch.ones(1, n, dtype=torch.bool)
        return torch.stack([visible(pos, pos, ones, self.causal, w)[0] for w in self.windows])

    def add(self, alpha: Tensor, norms: Tensor, value_norms: Tensor, mask: Tensor, categories: Tensor,
            word_ids: Optional[list] = None, sentences: Optional[list] = None) -> None:
        """One batch. alpha, norms: (L, B, H, N, N) head maps of attn_w and attn_n; value_norms (L, B, H, N);
        mask (B, N) bool; categories (B, N) index into CATEGORIES; word_ids: per text, the unit of each of the
        N positions (None for specials and padding) and sentences: per text its DepSentence (None: no tree)."""
        C = len(CATEGORIES)
        for b in range(mask.shape[0]):
            keep = mask[b].nonzero().flatten()
            n = len(keep)
            if n == 0:
                continue
            vis = self.visibility(n)
            visf = vis.double()
            A = alpha[:, b][:, :, keep][:, :, :, keep].double() * visf[:, None]
            Nm = row_normalize(norms[:, b][:, :, keep][:, :, :, keep].double() * visf[:, None])
            fx = value_norms[:, b][:, :, keep].double()
            onehot = torch.nn.functional.one_hot(categories[b][keep].long(), C).double()
            maps = {"weights": A, "norms": Nm}
            for kind, M in maps.items():
                self.share[kind] += (M @ onehot).sum(2)
                ent = -torch.where(M > 0, M * torch.log(torch.where(M > 0, M, torch.ones_like(M))), 0.0).sum(-1)
                self.entropy[kind] += ent.sum(-1)
                self.entropy_first[kind] += ent[..., 0]
                self.prev[kind] += M.diagonal(-1, -2, -1).sum(-1)
                self.next[kind] += M.diagonal(1, -2, -1).sum(-1)
            self.uniform += torch.log(visf.sum(-1)).sum(-1)
            self.rows += n
            self.texts += 1
            count = visf @ onehot  # (L, n, C) visible keys of each category per row
            has = count > 0
            safe = torch.where(has, count, torch.ones_like(count))[:, None]
            self.alpha_cat += torch.where(has[:, None], (A @ onehot) / safe, 0.0).sum(2)
            fx_rows = (visf[:, None] * fx[:, :, None, :]) @ onehot  # (L, H, n, C)
            self.fx_cat += torch.where(has[:, None], fx_rows / safe, 0.0).sum(2)
            self.cat_rows += has.double().sum(1)
            for li in range(self.L):
                for h in range(self.H):
                    rho = spearman(A[li, h][vis[li]], fx[li, h].expand(n, n)[vis[li]])
                    if math.isfinite(rho):
                        self.spearman_sum[li, h] += rho
                        self.spearman_texts[li, h] += 1
            if sentences is not None and sentences[b] is not None:
                wid = [word_ids[b][p] for p in keep.tolist()]
                self._add_tree(maps, visf, wid, sentences[b])

    def _add_tree(self, maps: dict, visf: Tensor, wid: list, sentence: DepSentence) -> None:
        U, n = len(sentence.units), len(wid)
        assign = torch.zeros(U, n, dtype=torch.float64)
        for p, u in enumerate(wid):
            if u is not None:
                assign[u, p] = 1.0
        pieces = assign.sum(1)
        present = pieces > 0
        rows_mean = assign / torch.where(present, pieces, torch.ones_like(pieces))[:, None]
        vis_w = (assign @ visf @ assign.T) > 0  # (L, U, U): some piece of the key word visible to the query word
        blocked = ~vis_w | torch.eye(U, dtype=torch.bool)
        preds = {}
        for kind, M in maps.items():
            scores = (rows_mean @ M @ assign.T).masked_fill(blocked[:, None], float("-inf"))  # (L, H, U, U)
            preds[kind] = (scores.argmax(-1), torch.isfinite(scores).any(-1))
        self.sentences += 1
        for name, k in sentence.skipped.items():
            self.skipped[name] += k
        for d, h, rel in sentence.arcs:
            if not (present[d] and present[h]):
                self.skipped["missing_pieces"] += 1
                continue
            self.arc_counts[rel] = self.arc_counts.get(rel, 0) + 1
            for kind, (pred, has) in preds.items():
                for direction, (q, gold) in (("dep_to_head", (d, h)), ("head_to_dep", (h, d))):
                    ok = ((pred[:, :, q] == gold) & has[:, :, q]).double()
                    table = self.correct[kind][direction]
                    table[rel] = table.get(rel, 0) + ok
            hits = torch.tensor([float(h == d + k) for k in OFFSETS], dtype=torch.float64)
            self.offset_correct[rel] = self.offset_correct.get(rel, 0) + hits

    # ------------------------------------------------------------------------------------------ results
    def results(self, layers: Sequence[int]) -> dict:
        """The statistics as plain JSON types (per-head values [layer][head]); ``layers``: model layer indices."""
        rows = max(self.rows, 1)
        per_kind = lambda d: {k: _grid(d[k] / rows) for k in KINDS}  # noqa: E731
        texts = max(self.texts, 1)
        cat_rows = self.cat_rows[:, None, :]
        alpha_mean = self.alpha_cat / cat_rows  # NaN where no row saw a key of the category
        fx_mean = self.fx_cat / cat_rows
        out = {
            "layers": [int(i) + 1 for i in layers],
            "heads": self.H,
            "texts": self.texts,
            "tokens": self.rows,
            "entropy": per_kind(self.entropy),
            "entropy_first_row": {k: _grid(self.entropy_first[k] / texts) for k in KINDS},
            "entropy_uniform": _grid(self.uniform / rows),
            "prev_token": per_kind(self.prev),
            "next_token": per_kind(self.next),
            "special_share": {k: {c: _grid(self.share[k][:, :, ci] / rows) for ci, c in enumerate(CATEGORIES)}
                              for k in KINDS},
            "noop": {
                "alpha_mean": {c: _grid(alpha_mean[:, :, ci]) for ci, c in enumerate(CATEGORIES)},
                "fx_norm_mean": {c: _grid(fx_mean[:, :, ci]) for ci, c in enumerate(CATEGORIES)},
                "spearman_alpha_fx": _grid(self.spearman_sum / self.spearman_texts),
                "spearman_texts": int(self.spearman_texts.min().item()) if self.texts else 0,
            },
        }
        for name, src in (("prev_token_heads", self.prev), ("next_token_heads", self.next)):
            out[name] = {k: [[int(layers[li]) + 1, h + 1] for li, h in (src[k] / rows > POSITION_THRESHOLD)
                             .nonzero().tolist()] for k in KINDS}
        if self.sentences:
            out["dependency"] = self._dependency(layers)
            out["dependency_corpus"] = {"sentences": self.sentences, "arcs": sum(self.arc_counts.values()),
                                        "relations": len(self.arc_counts), "skipped": dict(self.skipped)}
        return out

    def _dependency(self, layers: Sequence[int]) -> dict:
        rels = sorted(self.arc_counts, key=lambda r: (-self.arc_counts[r], r))
        result = {}
        for kind in KINDS:
            result[kind] = {}
            for rel in rels:
                count = self.arc_counts[rel]
                entry = {"count": count}
                for direction in DIRECTIONS:
                    acc = self.correct[kind][direction][rel] / count  # (L, H)
                    flat = int(acc.flatten().argmax())  # ties: the first (layer, head)
                    li, h = divmod(flat, self.H)
                    entry[direction] = {"layer": int(layers[li]) + 1, "head": h + 1, "accuracy": float(acc[li, h])}
                hits = self.offset_correct[rel] / count
                best = int(hits.argmax())  # ties: the nearest offset, the left one first (OFFSETS order)
                entry["offset_baseline"] = {"offset": OFFSETS[best], "accuracy": float(hits[best])}
                result[kind][rel] = entry
        return result


# ----------------------------------------------------------------------------------------------- encoding
@dataclass
class _Item:
    ids: list
    token_type_ids: Optional[list]
    word_ids: Optional[list]
    sentence: Optional[DepSentence]


def _encode(text_or_sentence, tokenizer, max_length: Optional[int]) -> _Item:
    trunc = {"truncation": max_length is not None, "max_length": max_length}
    if isinstance(text_or_sentence, DepSentence):
        if not getattr(tokenizer, "is_fast", False):
            raise LayerInputError("dependency probing needs a fast tokenizer (word_ids() maps pieces to gold words).")
        enc = tokenizer(list(text_or_sentence.units), is_split_into_words=True, **trunc)
        word_ids = enc.word_ids()
        sentence = text_or_sentence
    else:
        enc = tokenizer(text_or_sentence, **trunc)
        word_ids, sentence = None, None
    if not enc["input_ids"]:
        raise LayerInputError(f"{str(text_or_sentence)[:40]!r} has no tokens after tokenization.")
    return _Item(list(enc["input_ids"]), list(enc["token_type_ids"]) if "token_type_ids" in enc else None,
                 word_ids, sentence)


def _batch(items: list[_Item], tokenizer) -> tuple[dict, list]:
    """A padded tokenizer-style batch on the tokenizer's padding side, and the word ids padded alike."""
    from ..api import _pad_id

    width = max(len(it.ids) for it in items)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    pad_id = _pad_id(tokenizer)

    def pad(values, fill):
        extra = [fill] * (width - len(values))
        return extra + list(values) if left else list(values) + extra

    batch = {"input_ids": torch.tensor([pad(it.ids, pad_id) for it in items]),
             "attention_mask": torch.tensor([pad([1] * len(it.ids), 0) for it in items])}
    if all(it.token_type_ids is not None for it in items):
        batch["token_type_ids"] = torch.tensor([pad(it.token_type_ids, 0) for it in items])
    word_ids = [pad(it.word_ids, None) if it.word_ids is not None else None for it in items]
    return batch, word_ids


def token_categories(ids: Sequence[int], tokens: Sequence[str], tokenizer) -> list[int]:
    """Index into CATEGORIES of each token of one unpadded text (first position = index 0)."""
    def ids_of(*names):
        return {v for v in (getattr(tokenizer, n, None) for n in names) if v is not None}

    cls_ids, sep_ids = ids_of("cls_token_id", "bos_token_id"), ids_of("sep_token_id", "eos_token_id")
    cats = []
    for p, (t, tok) in enumerate(zip(ids, tokens)):
        if t in cls_ids and (t not in sep_ids or p == 0):
            name = "cls_bos"
        elif t in sep_ids:
            name = "sep_eos"
        elif join_pieces([tok]).strip() in PUNCT:
            name = "punct"
        else:
            name = "other"
        cats.append(CATEGORIES.index(name))
    return cats


# ----------------------------------------------------------------------------------------------- driver
def head_statistics(model, tokenizer, texts: Optional[Sequence[str]] = None,
                    sentences: Optional[Sequence[DepSentence]] = None, layers: Optional[Sequence[int]] = None,
                    batch_size: int = 8, backend="auto", max_length: Optional[int] = None, progress: bool = False,
                    verify: int = 2, parts: Optional[Path] = None) -> Optional[dict]:
    """Every statistic of spec section 8 over ``texts`` or gold ``sentences`` (read_conllu), per analysed
    layer and head, for weights and norms (the contents of results.json; see the module docstring).

    Streams: ``batch_size`` texts per kobattr.analyze(..., heads=True) call, whose maps are reduced to
    running sums and dropped before the next batch. With ``sentences`` the gold words are tokenised
    themselves and dependency probing is added. layers: model layer indices (default all).

    Every batch's sums start from zero and are summed along kobattr.analyses.parts' fixed tree. parts: a
    directory all ranks can write; under torchrun the ranks then share the batches (contiguous blocks), and
    rank 0 returns the statistics (identical to a single-process run's), the other ranks None."""
    from ..api import analyze
    from ..models import get_adapter
    from .parts import Fixed, Max, batch_sum

    if (texts is None) == (sentences is None):
        raise LayerInputError("give either texts= or sentences= (gold trees from read_conllu).")
    items_in = list(texts if texts is not None else sentences)
    if not items_in:
        raise LayerInputError("no texts or sentences to analyse.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LayerInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    adapter = get_adapter(model)
    batches = [items_in[k:k + batch_size] for k in range(0, len(items_in), batch_size)]

    def leaf(k: int) -> dict:
        items = [_encode(x, tokenizer, max_length) for x in batches[k]]
        batch, word_ids = _batch(items, tokenizer)
        result = analyze(model, batch, tokenizer=tokenizer, methods=["attn_w", "attn_n"], heads=True, layers=layers,
                         backend=backend, verify=verify)
        stats = HeadStatistics(len(result.layers), result.head_maps["attn_w"].shape[2], adapter.causal,
                               [adapter.window(model.config, i) for i in result.layers])
        mask = result.attention_mask
        categories = torch.zeros(mask.shape, dtype=torch.long)
        for b, it in enumerate(items):
            keep = mask[b].nonzero().flatten()
            ids = batch["input_ids"][b, keep].tolist()
            categories[b, keep] = torch.tensor(token_categories(ids, [result.tokens[b][p] for p in keep.tolist()],
                                                                tokenizer))
        stats.add(result.head_maps["attn_w"], result.head_maps["attn_n"], result.value_norms, mask, categories,
                  word_ids=word_ids, sentences=[it.sentence for it in items])
        return {"stats": stats.state(), "layers": Fixed(list(result.layers)),
                "backends": {f"{p}={name}" for per_layer in result.backends for p, name in per_layer.items()},
                "worst_spot": Max(max([0.0] + [e.max().item() for e in result.spot_check.values()]))}

    summed = batch_sum(len(batches), leaf, parts=parts, name="heads", progress=progress, desc="heads: batches")
    if summed is None:  # another rank than 0 of a shared run
        return None
    stats, analysed = HeadStatistics.from_state(summed["stats"]), summed["layers"].value
    used_backends, worst_spot = summed["backends"], summed["worst_spot"].value
    from ..reproduce import _model_name

    out = {"model": {"name": _model_name(model), "family": adapter.family, "causal": adapter.causal}}
    out.update(stats.results(analysed))
    out["backends"] = ", ".join(sorted(used_backends))
    out["worst_spot_check_error"] = worst_spot
    return out


# ----------------------------------------------------------------------------------------------- output
def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _save(figure, path: Path) -> None:
    from .. import plots

    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=plots.PNG_DPI, format="png"))


def _heat(ax, values, layers, title, cmap="Blues"):
    import numpy as np

    from .. import plots

    m = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    plots.heatmap(m, [str(h + 1) for h in range(m.shape[1])], ax=ax, title=title, cmap=cmap,
                  row_tokens=[str(layer) for layer in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")


# results key -> module of kobattr.analyses with figures(part, out) -> {name: file} and report_lines(part, figures)
# analyses that add a part to the results file: key -> module with figures(result, out) and report_lines(result, written)
EXTRA_SECTIONS = {"gradient": "gradient", "probes": "probes", "coreference": "coref", "clustering": "clustering"}
HEAD_VIEW = "heads.html"  # kobattr.analyses.headview's page over results.json
FIGURES = {"entropy": "entropy.png", "special_share": "special_share.png", "position": "relative_position.png",
           "noop": "noop_alpha_vs_fx.png", "dependency": "dependency_relations.png"}


def _figures(results: dict, out: Path) -> dict:
    import numpy as np
    from matplotlib.figure import Figure

    layers = results["layers"]
    H = results["heads"]
    size = (0.35 * H + 2.2, 0.35 * len(layers) + 1.6)
    written = {}

    fig = Figure(figsize=(2 * size[0], size[1]), layout="constrained")
    for ax, kind in zip(fig.subplots(1, 2), KINDS):
        _heat(ax, results["entropy"][kind], layers, f"entropy ({kind}); uniform {np.mean(results['entropy_uniform']):.2f}",
              cmap="viridis")
    _save(fig, out / FIGURES["entropy"])
    written["entropy"] = FIGURES["entropy"]

    fig = Figure(figsize=(2 * size[0], len(CATEGORIES) * size[1]), layout="constrained")
    axes = fig.subplots(len(CATEGORIES), 2)
    for ci, c in enumerate(CATEGORIES):
        for ki, kind in enumerate(KINDS):
            _heat(axes[ci, ki], results["special_share"][kind][c], layers, f"share to {CATEGORY_LABELS[c]} ({kind})")
    _save(fig, out / FIGURES["special_share"])
    written["special_share"] = FIGURES["special_share"]

    fig = Figure(figsize=(2 * size[0], 2 * size[1]), layout="constrained")
    axes = fig.subplots(2, 2)
    for ri, name in enumerate(("prev_token", "next_token")):
        for ki, kind in enumerate(KINDS):
            _heat(axes[ri, ki], results[name][kind], layers, f"mean A(i, i{'-' if ri == 0 else '+'}1) ({kind})",
                  cmap="Oranges")
    _save(fig, out / FIGURES["position"])
    written["position"] = FIGURES["position"]

    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for c in CATEGORIES:
        a = np.array(results["noop"]["alpha_mean"][c], dtype=float).flatten()
        f = np.array(results["noop"]["fx_norm_mean"][c], dtype=float).flatten()
        ax.scatter(a, f, s=12, alpha=0.7, label=CATEGORY_LABELS[c])
    ax.set_xlabel("mean attention weight alpha to the key category")
    ax.set_ylabel("mean ||f(x)|| of the key category")
    ax.set_title("one point per layer and head")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out / FIGURES["noop"])
    written["noop"] = FIGURES["noop"]

    if "dependency" in results:
        rels = list(results["dependency"]["weights"])
        fig = Figure(figsize=(max(6.0, 0.55 * len(rels) + 2), 4.5), layout="constrained")
        ax = fig.add_subplot()
        x = np.arange(len(rels))
        bars = {"best head, weights": [results["dependency"]["weights"][r]["dep_to_head"]["accuracy"] for r in rels],
                "best head, norms": [results["dependency"]["norms"][r]["dep_to_head"]["accuracy"] for r in rels],
                "best offset": [results["dependency"]["weights"][r]["offset_baseline"]["accuracy"] for r in rels]}
        for k, (label, values) in enumerate(bars.items()):
            ax.bar(x + (k - 1) * 0.27, values, width=0.27, label=label)
        counts = [results["dependency"]["weights"][r]["count"] for r in rels]
        ax.set_xticks(x, [f"{r}\n(n={n})" for r, n in zip(rels, counts)], rotation=60, fontsize=7)
        ax.set_ylabel("accuracy (dependent -> head)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        _save(fig, out / FIGURES["dependency"])
        written["dependency"] = FIGURES["dependency"]
    return written


def _mean(values) -> float:
    flat = [v for row in values for v in row if v is not None]
    return sum(flat) / len(flat) if flat else float("nan")


def _report(results: dict, figures: dict, command: str, runtime_s: Optional[float], source: str) -> str:
    layers = results["layers"]
    lines = [f"# kobattr heads: {results['model']['name']}", "",
             f"- Command: `{command}`"]
    if runtime_s is not None:
        lines.append(f"- Runtime: {runtime_s:.1f} s wall ({torch.get_num_threads()} torch threads; model loading excluded)")
    lines += [f"- Model: {results['model']['family']}{' (causal rows: keys j <= i)' if results['model']['causal'] else ''}, "
              f"layers {layers[0]}..{layers[-1]} analysed ({len(layers)}), {results['heads']} heads; backends "
              f"`{results['backends']}`, worst spot-check error {results['worst_spot_check_error']:.1e}",
              f"- Input: {source}; {results['texts']} texts, {results['tokens']} visible tokens (query rows, specials "
              "included). Every surface statistic below rests on all of them.",
              "- Weights: alpha^h_ij. Norms: ||alpha^h_ij f^h(x_j)|| normalised per row. Layers and heads count "
              "from 1. Definitions: docs/methods.md and spec section 8. Every number is in results.json.", ""]

    def table(columns: dict, fmt=".3f"):
        out = ["| layer | " + " | ".join(columns) + " |", "|---:|" + "---:|" * len(columns)]
        for li, layer in enumerate(layers):
            out.append(f"| {layer} | " + " | ".join(format(v[li], fmt) for v in columns.values()) + " |")
        return "\n".join(out)

    lines += ["## 1. Entropy of the rows (Clark et al. 2019, section 3)", "",
              f"![entropy]({figures['entropy']})", "",
              "Mean over heads of the mean row entropy (nats), beside the uniform baseline mean ln(n_visible); "
              "first row = the first token's row ([CLS] / BOS) alone, over the texts.", "",
              table({"weights": [_mean([r]) for r in results["entropy"]["weights"]],
                     "norms": [_mean([r]) for r in results["entropy"]["norms"]],
                     "uniform": results["entropy_uniform"],
                     "first row, weights": [_mean([r]) for r in results["entropy_first_row"]["weights"]],
                     "first row, norms": [_mean([r]) for r in results["entropy_first_row"]["norms"]]}), ""]
    share = results["special_share"]
    lines += ["## 2. Share of each row going to special tokens and punctuation (weights vs norms)", "",
              f"![special share]({figures['special_share']})", "",
              "Mean over heads of the mean share of a query row going to each key category.", "",
              table({f"{CATEGORY_LABELS[c]} {k[0]}": [_mean([r]) for r in share[k][c]]
                     for c in CATEGORIES for k in KINDS}), "",
              f"Averaged over layers and heads: [SEP]/EOS gets {_mean(share['weights']['sep_eos']):.3f} of the "
              f"weight and {_mean(share['norms']['sep_eos']):.3f} of the norm; [CLS]/BOS "
              f"{_mean(share['weights']['cls_bos']):.3f} vs {_mean(share['norms']['cls_bos']):.3f}; \".\" and \",\" "
              f"{_mean(share['weights']['punct']):.3f} vs {_mean(share['norms']['punct']):.3f}.", ""]
    lines += ["## 3. Previous- and next-token heads", "",
              f"![relative position]({figures['position']})", "",
              f"A head whose mean A(i, i-1) (A(i, i+1)) exceeds {POSITION_THRESHOLD} (rows without that neighbour count 0):", ""]
    for name in ("prev_token_heads", "next_token_heads"):
        for kind in KINDS:
            heads = results[name][kind]
            shown = ", ".join(f"L{li}-H{h}" for li, h in heads) or "none"
            lines.append(f"- {name.replace('_', ' ')} ({kind}): {shown}")
    noop = results["noop"]
    lines += ["", "## 4. No-op evidence: alpha vs ||f(x)|| by key category (Kobayashi et al. 2020, section 4)", "",
              f"![alpha vs f(x)]({figures['noop']})", "",
              "| key category | mean alpha | mean norm of f(x) |", "|---|---:|---:|"]
    for c in CATEGORIES:
        lines.append(f"| {CATEGORY_LABELS[c]} | {_mean(noop['alpha_mean'][c]):.3f} | {_mean(noop['fx_norm_mean'][c]):.3f} |")
    lines += ["", "Spearman's rho between alpha^h_ij and ||f^h(x_j)|| over the visible pairs, per text, averaged over "
              f"texts ({noop['spearman_texts']} texts; mean over heads per layer):", "",
              table({"rho": [_mean([r]) for r in noop["spearman_alpha_fx"]]}), ""]
    if "dependency" in results:
        corpus = results["dependency_corpus"]
        sk = corpus["skipped"]
        lines += ["## 5. Dependency probing (Clark et al. 2019, section 4)", "",
                  f"{corpus['sentences']} sentences, {corpus['arcs']} scored arcs of {corpus['relations']} relations "
                  f"(not scored: {sk['root']} root arcs, {sk['within_token']} arcs inside one multi-word token, "
                  f"{sk['empty_node']} empty nodes, {sk['missing_pieces']} arcs with a word without pieces). Accuracy "
                  "of the argmax over words of the dependent's row being its gold head (dep -> head) and of the "
                  "head's row being the dependent (head -> dep), best layer-head per relation, beside the best "
                  "fixed offset (-5..5) predicting the head. n = the arcs each row rests on.", "",
                  f"![relations]({figures['dependency']})", "",
                  "| relation | n | weights dep->head | norms dep->head | weights head->dep | norms head->dep | offset baseline |",
                  "|---|---:|---|---|---|---|---|"]
        cell = lambda e: f"{e['accuracy']:.2f} (L{e['layer']}-H{e['head']})"  # noqa: E731
        for rel, w in results["dependency"]["weights"].items():
            nrm = results["dependency"]["norms"][rel]
            off = w["offset_baseline"]
            lines.append(f"| {rel} | {w['count']} | {cell(w['dep_to_head'])} | {cell(nrm['dep_to_head'])} | "
                         f"{cell(w['head_to_dep'])} | {cell(nrm['head_to_dep'])} | {off['accuracy']:.2f} "
                         f"(offset {off['offset']:+d}) |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- head view
_GRADIENT_LABELS = {"grad_abs": "|dL/d\u03b1|", "grad_x_input": "\u03b1 dL/d\u03b1", "grad_x_input_abs": "|\u03b1 dL/d\u03b1|",
                    "alpha": "mean \u03b1", "fx_norm": "mean \u2016f(x)\u2016"}


def _category_label(c: str) -> str:
    return CATEGORY_LABELS.get(c, c)


def head_view_statistics(results: dict) -> list[dict]:
    """The per-head statistics present in ``results`` (write_report's dict), in page order: each a dict with id,
    group, label, layers (path to its layer numbers) and paths ({"weights": path, "norms": path} or
    {"value": path}), a path being the keys that lead from results to a [layer][head] grid."""
    out = []

    def add(group, label, paths, layers=("layers",)):
        out.append({"id": f"s{len(out)}", "group": group, "label": label, "layers": list(layers), "paths": paths})

    section = "head statistics"
    for key, label in (("entropy", "row entropy (nats)"), ("entropy_first_row", "entropy of the first row (nats)"),
                       ("prev_token", "mean A(i, i-1): previous token"), ("next_token", "mean A(i, i+1): next token")):
        if key in results:
            add(section, label, {kind: [key, kind] for kind in KINDS})
    for c in results.get("special_share", {}).get("weights", {}):
        add(section, f"share of the row to {_category_label(c)}", {kind: ["special_share", kind, c] for kind in KINDS})
    noop = results.get("noop", {})
    for c in noop.get("alpha_mean", {}):
        add("no-op evidence", f"mean \u03b1 to {_category_label(c)}", {"value": ["noop", "alpha_mean", c]})
    for c in noop.get("fx_norm_mean", {}):
        add("no-op evidence", f"mean \u2016f(x)\u2016 of {_category_label(c)}", {"value": ["noop", "fx_norm_mean", c]})
    if "spearman_alpha_fx" in noop:
        add("no-op evidence", "Spearman \u03c1 of \u03b1 vs \u2016f(x)\u2016", {"value": ["noop", "spearman_alpha_fx"]})
    gradient = results.get("gradient") or {}
    for q, per_category in gradient.get("per_head", {}).items():
        for c in per_category:
            add("gradient importance", f"{_GRADIENT_LABELS.get(q, q)} to {_category_label(c)}",
                {"value": ["gradient", "per_head", q, c]}, layers=("gradient", "layers"))
    accuracy = (results.get("coreference") or {}).get("accuracy") or {}
    for group in accuracy.get("weights", {}):
        add("coreference", f"antecedent accuracy ({group} mentions)",
            {kind: ["coreference", "accuracy", kind, group] for kind in KINDS}, layers=("coreference", "layers"))
    return out


def write_head_view(results: dict, path) -> Path:
    """Write heads.html, the interactive head view of ``results`` (kobattr.views.headview), at ``path``."""
    return headview.write(results, head_view_statistics(results), path)


def write_report(results: dict, out_dir, command: str = "kobattr.analyses.heads.write_report",
                 runtime_s: Optional[float] = None, source: str = "") -> list[str]:
    """Write results.json, report.md, the figures and heads.html (the interactive head view) into ``out_dir``
    (each file atomically: written to a temporary name and renamed); returns the names written. results.json
    and heads.html have no timing, so equal inputs give byte-identical files."""
    import importlib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(results, out)
    report = _report(results, figures, command, runtime_s, source or "texts")
    for key, name in EXTRA_SECTIONS.items():  # analyses that add a part to the results file
        if results.get(key) is not None:
            module = importlib.import_module(f"{__package__}.{name}")
            extra = module.figures(results[key], out)
            figures.update(extra)
            report += "\n" + "\n".join(module.report_lines(results[key], extra))
    _atomic_text(out / "results.json", json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False))
    _atomic_text(out / "report.md", report)
    write_head_view(results, out / HEAD_VIEW)
    return ["report.md", "results.json", HEAD_VIEW, *figures.values()]


def run(model, tokenizer, out_dir, texts=None, sentences=None, source: str = "", command: str = "", **kwargs) -> dict:
    """head_statistics + write_report, with the wall time of the analysis in report.md."""
    started = time.perf_counter()
    results = head_statistics(model, tokenizer, texts=texts, sentences=sentences, **kwargs)
    write_report(results, out_dir, command=command, runtime_s=time.perf_counter() - started, source=source)
    return results
