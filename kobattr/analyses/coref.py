"""Coreference heads (Clark et al. 2019, section 4.3, Table 2): antecedent selection per head, weights and norms.

For every gold mention m with an antecedent (an earlier mention of its cluster) inside the window, the attention
row from m's head word selects, among the head words of the gold mentions that start before m (never m's own head
word, never a special token), the one receiving the most attention; the query is correct if a mention headed by
that word is an antecedent of m. Accuracy per analysed layer and head, overall and per mention type (pronoun,
proper, nominal), for the weights alpha^h and the norms ||alpha^h_ij f^h(x_j)||, beside three baselines (nearest
preceding mention, nearest with the same head word, and a four-sieve rule-based resolver after Lee et al. 2011).
Definitions: shared/spec/clark2019.md section 2 and docs/methods.md section 9.

Data: CorefUD 1.x files, i.e. CoNLL-U with coreference brackets in MISC ``Entity=`` (``(e1-person-1`` opens a
mention of entity e1 whose head is its first word, ``e1)`` closes it, ``(e2-place-1)`` is a one-word mention; the
field order comes from the ``# global.Entity = eid-etype-head-other`` comment, this order when there is none).
Real data: the CorefUD project (https://ufal.mff.cuni.cz/corefud, English: ``en_gum``) or UD_English-GUM
(https://github.com/UniversalDependencies/UD_English-GUM, whose CoNLL-U carries the same ``Entity=`` annotation;
annotations CC BY 4.0, but read the licence of each GUM genre). kobattr ships a self-written CC0 sample
(kobattr/data/sample_coref.conllu, :func:`sample_coref_path`).

Conventions (kobattr's, where the paper leaves room; spec section 2 tags them [D]):
- Words are surface units as in kobattr.analyses.heads (a multi-word token is one unit; empty nodes are no
  words: a mention on empty nodes only is dropped). A discontinuous mention (``e1[1/2]``) is the union of its parts.
- Head word: the mention's head field if the file has one, else the mention word whose dependency head lies
  outside the mention (leftmost on ties).
- Window: the document's words are tokenised themselves and truncated by the tokenizer to ``max_tokens`` pieces
  counting the specials (``[CLS]`` + the first 126 pieces + ``[SEP]`` for BERT); a mention is kept only if every
  piece of every word of it is inside the window.
- Order: mentions by (first word, last word); "before m" means starting at an earlier word. Antecedents and
  candidates alike are the mentions starting before m; candidates exclude those headed by m's head word.
- Word-level maps: attention from a word is the mean over its pieces; attention to a word is the sum over its
  pieces (weights) or, for norms, the norm of the summed vectors ||sum_{t in w} alpha_it f^h(x_t)|| (spec section
  0; ``norm_to="sum"``: the sum of the pieces' norms). The argmax lies within one row, so norms are not
  row-normalised (a multi-piece query word averages its pieces' unnormalised rows).
- Ties: between candidate words, the nearest to m's head word wins (then the earlier); the baselines take the
  nearest candidate in mention order (the latest start, then the latest end).
- Types by m's head word: pronoun = XPOS PRP / PRP$ or UPOS PRON; proper = XPOS NNP / NNPS or UPOS PROPN;
  nominal = everything else.
- Rule-based baseline: sieves (1) the same mention string, (2) the same head word, (3) compatible number, gender
  and person, (4) any candidate; the nearest candidate of the first non-empty sieve. Strings and head words are
  compared case-insensitively. Pronouns take number, gender and person from a lexicon (unlisted ones: unknown);
  other mentions are third person, of unknown gender, plural if the head's XPOS is NNS / NNPS or its FEATS say
  Number=Plur. Unknown matches anything.
- ``candidates="all_words"``: the literal wording of the paper, the argmax over every other word the row sees;
  correct if that word heads an antecedent.

Shape vocabulary: L analysed layers, B batch, H heads, N padded tokens, n tokens of one text, U words.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..layer import LayerInputError, head_vectors
from .heads import KINDS, _batch, _Item

TYPES = ("pronoun", "proper", "nominal")
GROUPS = ("all",) + TYPES
BASELINES = ("nearest", "head_match", "rule_based")
CANDIDATES = ("mentions", "all_words")
NORM_TO = ("vector", "sum")
DEFAULT_SCHEMA = ("eid", "etype", "head", "other")
SAMPLE_COREF = Path(__file__).resolve().parent.parent / "data" / "sample_coref.conllu"

# number, gender, person of English pronouns (None: unknown, matches anything)
_PRONOUNS = {}
for _words, _attrs in (
        (("i", "me", "my", "mine", "myself"), ("sg", None, 1)),
        (("we", "us", "our", "ours", "ourselves"), ("pl", None, 1)),
        (("you", "your", "yours"), (None, None, 2)),
        (("yourself",), ("sg", None, 2)),
        (("yourselves",), ("pl", None, 2)),
        (("he", "him", "his", "himself"), ("sg", "masc", 3)),
        (("she", "her", "hers", "herself"), ("sg", "fem", 3)),
        (("it", "its", "itself"), ("sg", "neut", 3)),
        (("they", "them", "their", "theirs", "themselves"), ("pl", None, 3))):
    for _w in _words:
        _PRONOUNS[_w] = _attrs


def sample_coref_path() -> Path:
    """The self-written CorefUD sample shipped with kobattr (CC0): four short English documents."""
    return SAMPLE_COREF


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class Mention:
    """A gold mention: its words (unit indices in the document, sorted), entity id, head word (a unit index),
    type (TYPES), lower-cased surface string and head form, and (number, gender, person) for the rule sieve."""

    words: tuple
    entity: str
    head: int
    type: str
    text: str
    head_form: str
    attributes: tuple

    @property
    def start(self) -> int:
        return self.words[0]

    @property
    def end(self) -> int:
        return self.words[-1]


@dataclass
class CorefDocument:
    """One document: its surface words (units) and gold mentions in (start, end) order; dropped counts mentions
    the reader could not keep (``empty_only``: on empty nodes only)."""

    doc_id: str
    units: list
    mentions: list
    dropped: dict = field(default_factory=dict)


@dataclass
class _Word:  # one syntactic word of a document
    unit: int
    form: str
    upos: str
    xpos: str
    feats: dict
    head: Optional[int]  # document-level syntactic word index; None for the root or no head


_BRACKET = re.compile(r"\(([^()]+)(\)?)|([^()]+)\)")
_PART = re.compile(r"^(.*?)(\[\d+/\d+\])?$")


def read_corefud(source, limit: Optional[int] = None) -> list[CorefDocument]:
    """Documents of a CorefUD file (path) or text (a str holding tab-separated lines), parsed with ``conllu``.

    A document starts at ``# newdoc``; a file without one is one document. Raises ValueError naming the
    sentence for brackets that do not parse, close nothing or stay open, and head fields outside the mention."""
    import conllu

    if isinstance(source, (str, bytes)) and "\t" in str(source):
        text = str(source)
    else:
        text = Path(source).read_text(encoding="utf-8")
    try:
        parsed = conllu.parse(text)
    except Exception as err:  # conllu raises its own ParseException subclasses
        raise ValueError(f"not valid CoNLL-U ({type(err).__name__}: {err}).") from None
    documents: list[CorefDocument] = []
    reader: Optional[_DocReader] = None
    schema = DEFAULT_SCHEMA
    for number, tokens in enumerate((t for t in parsed if len(t)), 1):
        meta = tokens.metadata
        if "global.Entity" in meta:
            schema = tuple(meta["global.Entity"].strip().split("-"))
        if reader is None or "newdoc id" in meta or "newdoc" in meta:
            if reader is not None:
                documents.append(reader.finish())
                if limit is not None and len(documents) >= limit:
                    return documents
            reader = _DocReader(meta.get("newdoc id") or f"doc{len(documents) + 1}")
        reader.sentence(tokens, number, schema)
    if reader is None:
        raise ValueError("the CorefUD input holds no sentence.")
    documents.append(reader.finish())
    return documents


class _DocReader:
    def __init__(self, doc_id: str):
        self.doc_id = doc_id
        self.units: list[str] = []
        self.words: list[_Word] = []
        self.open: dict[str, list] = {}  # entity id -> stack of open mentions [parts, head field]
        self.parts: dict[str, dict] = {}  # discontinuous mentions: entity id + part tag -> collected positions
        self.raw: list = []  # (entity, positions, head field); positions: syntactic word index or None (empty node)
        self.number = 0

    def sentence(self, tokens, number: int, schema: tuple) -> None:
        self.number = number
        first = len(self.words)
        word_at: dict[int, int] = {}
        span_end = 0
        heads = []
        for tok in tokens:
            tid = tok["id"]
            if isinstance(tid, tuple):
                if len(tid) == 3 and tid[1] == "-":
                    self.units.append(tok["form"])
                    span_end = tid[2]
                elif len(tid) == 3 and tid[1] == ".":
                    self._brackets(tok, None, schema)
                continue
            if tid > span_end:
                self.units.append(tok["form"])
            word_at[tid] = len(self.words)
            self.words.append(_Word(len(self.units) - 1, tok["form"], tok["upos"] or "_", tok["xpos"] or "_",
                                    tok["feats"] or {}, None))
            heads.append(tok["head"])
            self._brackets(tok, len(self.words) - 1, schema)
        for k, head in enumerate(heads):
            if isinstance(head, int) and head > 0:
                if head not in word_at:
                    raise ValueError(f"sentence {number}: a word has HEAD {head}, which is not a word of the sentence.")
                self.words[first + k].head = word_at[head]

    def _brackets(self, tok, position: Optional[int], schema: tuple) -> None:
        value = (tok["misc"] or {}).get("Entity")
        if not value or value == "_":
            for stack in self.open.values():
                for m in stack:
                    m[0].append(position)
            return
        matched = "".join(m.group(0) for m in _BRACKET.finditer(value))
        if matched != value:
            raise ValueError(f"sentence {self.number}: Entity={value!r} is not a sequence of CorefUD brackets.")
        opened_here = []
        closes = []
        for m in _BRACKET.finditer(value):
            if m.group(1) is not None:
                fields = m.group(1).split("-", len(schema) - 1)
                eid = fields[0]
                head = fields[schema.index("head")] if "head" in schema and schema.index("head") < len(fields) else ""
                mention = [[], head]
                self.open.setdefault(eid, []).append(mention)
                opened_here.append(eid)
                if m.group(2):
                    closes.append(eid)
            else:
                closes.append(m.group(3))
        for stack in self.open.values():  # every open mention covers this word, the ones opened here included
            for mention in stack:
                mention[0].append(position)
        for eid in closes:
            base, part = _PART.match(eid).groups()
            if not self.open.get(eid):
                raise ValueError(f"sentence {self.number}: Entity={value!r} closes {eid}, which is not open.")
            positions, head = self.open[eid].pop()
            if part:
                key = base
                collected = self.parts.setdefault(key, {"positions": [], "head": ""})
                collected["positions"] += positions
                collected["head"] = collected["head"] or head
                k, total = map(int, part[1:-1].split("/"))
                if k == total:
                    self.raw.append((base, self.parts.pop(key)["positions"], collected["head"]))
            else:
                self.raw.append((base, positions, head))

    def finish(self) -> CorefDocument:
        still = [eid for eid, stack in self.open.items() if stack]
        if still or self.parts:
            raise ValueError(f"document {self.doc_id}: mention(s) of {', '.join(still or list(self.parts))} never close.")
        mentions, dropped = [], {"empty_only": 0}
        for eid, positions, head_field in self.raw:
            real = [p for p in positions if p is not None]
            if not real:
                dropped["empty_only"] += 1
                continue
            head = self._head(positions, real, head_field, eid)
            words = tuple(sorted({self.words[p].unit for p in real}))
            w = self.words[head]
            mentions.append(Mention(words=words, entity=eid, head=w.unit, type=_type(w),
                                    text=" ".join(self.units[u] for u in words).lower(), head_form=self.units[w.unit].lower(),
                                    attributes=_attributes(w, _type(w))))
        mentions.sort(key=lambda m: (m.start, m.end))
        return CorefDocument(doc_id=self.doc_id, units=self.units, mentions=mentions, dropped=dropped)

    def _head(self, positions: list, real: list, head_field: str, eid: str) -> int:
        if head_field not in ("", "_"):
            if not head_field.isdigit() or not 1 <= int(head_field) <= len(positions):
                raise ValueError(f"document {self.doc_id}: mention of {eid} has head {head_field!r}, not a position "
                                 f"1..{len(positions)} inside the mention.")
            chosen = positions[int(head_field) - 1]
            if chosen is not None:
                return chosen
        inside = set(real)
        outside = [p for p in sorted(inside) if self.words[p].head not in inside]
        return outside[0] if outside else min(inside)


def _type(word: _Word) -> str:
    if word.xpos in ("PRP", "PRP$") or word.upos == "PRON":
        return "pronoun"
    if word.xpos in ("NNP", "NNPS") or word.upos == "PROPN":
        return "proper"
    return "nominal"


def _attributes(word: _Word, kind: str) -> tuple:
    if kind == "pronoun":
        return _PRONOUNS.get(word.form.lower(), (None, None, None))
    plural = word.xpos in ("NNS", "NNPS") or word.feats.get("Number") == "Plur"
    return ("pl" if plural else "sg", None, 3)


# ----------------------------------------------------------------------------------------------- queries
@dataclass
class _Query:
    head: int  # m's head word
    type: str
    candidates: list  # candidate words, nearest to m's head first
    correct: set  # candidate words heading an antecedent
    antecedent_heads: set  # every word heading an antecedent (all_words mode)
    baselines: dict  # baseline name -> correct (bool)


@dataclass
class _Window:
    item: _Item
    n_words: int  # words wholly inside the window
    queries: list
    mentions: int
    dropped: int


def _compatible(a: tuple, b: tuple) -> bool:
    return all(x is None or y is None or x == y for x, y in zip(a, b))


def baseline_predictions(mentions: Sequence[Mention]) -> list:
    """Per mention with an antecedent: (mention, {baseline: predicted Mention or None}) over the preceding mentions
    of ``mentions`` (the candidates of the module docstring), in mention order."""
    ordered = sorted(mentions, key=lambda m: (m.start, m.end))
    out = []
    for m in ordered:
        before = [c for c in ordered if c.start < m.start]
        if not any(c.entity == m.entity for c in before):
            continue
        cands = [c for c in before if c.head != m.head]
        nearest = lambda pool: pool[-1] if pool else None  # noqa: E731  (mention order: the last is the nearest)
        sieves = ([c for c in cands if c.text == m.text], [c for c in cands if c.head_form == m.head_form],
                  [c for c in cands if _compatible(c.attributes, m.attributes)], cands)
        out.append((m, {"nearest": nearest(cands), "head_match": nearest(sieves[1]),
                        "rule_based": next((nearest(s) for s in sieves if s), None)}))
    return out


def _window(doc: CorefDocument, tokenizer, max_tokens: int) -> _Window:
    if not doc.units:
        raise LayerInputError(f"document {doc.doc_id} has no words.")
    full = tokenizer(list(doc.units), is_split_into_words=True)
    enc = tokenizer(list(doc.units), is_split_into_words=True, truncation=True, max_length=max_tokens)
    count = lambda ids: {u: ids.count(u) for u in set(ids) if u is not None}  # noqa: E731
    total, inside = count(full.word_ids()), count(enc.word_ids())
    whole = {u for u, k in inside.items() if total.get(u) == k}
    kept = [m for m in doc.mentions if all(u in whole for u in m.words)]
    queries = []
    for m, preds in baseline_predictions(kept):
        before = [c for c in kept if c.start < m.start]
        cands = sorted({c.head for c in before if c.head != m.head}, key=lambda u: (abs(u - m.head), u))
        queries.append(_Query(head=m.head, type=m.type, candidates=cands,
                              correct={c.head for c in before if c.entity == m.entity and c.head != m.head},
                              antecedent_heads={c.head for c in before if c.entity == m.entity},
                              baselines={b: p is not None and p.entity == m.entity for b, p in preds.items()}))
    item = _Item(list(enc["input_ids"]), list(enc["token_type_ids"]) if "token_type_ids" in enc else None,
                 enc.word_ids(), None)
    n_words = max(whole) + 1 if whole else 0
    return _Window(item, n_words, queries, len(kept), len(doc.mentions) - len(kept))


# ----------------------------------------------------------------------------------------------- word maps
def word_maps(alpha: Tensor, norms: Tensor, vectors: Optional[Tensor], word_ids: Sequence, n_words: int,
              norm_to: str = "vector") -> dict:
    """Word-level head maps of one unpadded text: {"weights": (H, U, U), "norms": (H, U, U)}, rows = from-words.

    alpha, norms: (H, n, n) piece maps (attn_w, attn_n); vectors: (n, H, D) the key vectors whose norms the norms
    map holds (only their directions are used), needed for norm_to="vector"; word_ids: the word of each piece
    (None: special); words >= n_words are left out. From a word: mean over its pieces; to a word: sum (weights),
    and for norms the norm of the summed vectors (or the sum of norms with norm_to="sum")."""
    n = alpha.shape[-1]
    assign = torch.zeros(n_words, n, dtype=torch.float64)
    for p, u in enumerate(word_ids):
        if u is not None and u < n_words:
            assign[u, p] = 1.0
    pieces = assign.sum(1, keepdim=True)
    rows_mean = assign / pieces.clamp(min=1)
    weights = rows_mean @ alpha.double() @ assign.T
    to = norms.double() @ assign.T  # (H, n, U): the sum of the pieces' norms
    if norm_to == "vector":
        unit = torch.nn.functional.normalize(vectors.double(), dim=-1)  # (n, H, D); a zero vector stays zero
        for u in (pieces.flatten() > 1).nonzero().flatten().tolist():
            idx = assign[u].nonzero().flatten()
            cos = torch.einsum("phd,qhd->hpq", unit[idx], unit[idx])  # (H, k, k)
            part = norms.double()[:, :, idx]  # (H, n, k): alpha_it ||f_t|| (times s_i after a norm)
            # ||sum_t alpha_it f_t||^2 = sum_{t,t'} N_it N_it' cos(f_t, f_t')
            to[:, :, u] = torch.einsum("hip,hpq,hiq->hi", part, cos, part).clamp(min=0).sqrt()
    return {"weights": weights, "norms": rows_mean @ to}


def _select(scores: Tensor, query: _Query, candidates: str, visible: Tensor) -> Tensor:
    """(L?, H) bool: the head's choice is correct. scores (..., U) is the query word's row."""
    if candidates == "mentions":
        if not query.candidates:
            return torch.zeros(scores.shape[:-1], dtype=torch.bool)
        cands = torch.tensor(query.candidates)
        ok = torch.tensor([c in query.correct for c in query.candidates])
        pick = scores[..., cands].argmax(-1)  # the first maximum: the nearest candidate wins ties
        return ok[pick]
    U = scores.shape[-1]
    words = sorted((u for u in range(U) if u != query.head and visible[u]), key=lambda u: (abs(u - query.head), u))
    if not words:
        return torch.zeros(scores.shape[:-1], dtype=torch.bool)
    ok = torch.tensor([u in query.antecedent_heads for u in words])
    return ok[scores[..., torch.tensor(words)].argmax(-1)]


# ----------------------------------------------------------------------------------------------- driver
def coreference_heads(model, tokenizer, documents, layers: Optional[Sequence[int]] = None, candidates: str = "mentions",
                      max_tokens: int = 128, batch_size: int = 8, backend="auto", progress: bool = False,
                      norm_to: str = "vector", verify: int = 2, parts: Optional[Path] = None) -> Optional[dict]:
    """Antecedent-selection accuracy of every analysed layer and head (weights and norms), overall and per
    mention type, beside the nearest, head-match and rule-based baselines (JSON types; module docstring).

    documents: CorefDocument list (read_corefud) or a CorefUD path. Streams ``batch_size`` documents per forward
    pass; each layer's maps are reduced to counts inside its capture hook and dropped. parts: a directory all
    ranks can write; under torchrun the ranks then share the batches (contiguous blocks; the counts add exactly),
    and rank 0 returns the result (identical to a single-process run's), the other ranks None."""
    from .parts import Fixed, Max, batch_sum
    from ..core import attribute
    from ..models import get_adapter
    from ..models.recording import capture
    from ..api import _wanted_layers
    from ..reproduce import _model_name

    if not isinstance(documents, (list, tuple)):
        documents = read_corefud(documents)
    if not documents:
        raise LayerInputError("no documents to analyse.")
    if candidates not in CANDIDATES:
        raise LayerInputError(f"candidates must be one of {', '.join(CANDIDATES)}, got {candidates!r}.")
    if norm_to not in NORM_TO:
        raise LayerInputError(f"norm_to must be one of {', '.join(NORM_TO)}, got {norm_to!r}.")
    for name, value, low in (("batch_size", batch_size, 1), ("max_tokens", max_tokens, 3)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LayerInputError(f"{name} must be an int >= {low}, got {value!r}.")
    if not getattr(tokenizer, "is_fast", False):
        raise LayerInputError("coreference heads need a fast tokenizer (word_ids() maps pieces to words).")
    adapter = get_adapter(model)
    wanted = _wanted_layers(layers, len(adapter.layer_modules(model)))
    windows = [_window(d, tokenizer, max_tokens) for d in documents]
    counts = {g: 0 for g in GROUPS}
    base_correct = {b: {g: 0 for g in GROUPS} for b in BASELINES}
    for w in windows:
        for q in w.queries:
            for g in ("all", q.type):
                counts[g] += 1
                for b in BASELINES:
                    base_correct[b][g] += int(q.baselines[b])
    batches = [windows[k:k + batch_size] for k in range(0, len(windows), batch_size)]

    def leaf(k: int) -> dict:
        chunk = batches[k]
        correct: dict = {}  # layer index -> kind -> group -> (H,) correct queries
        state = {"correct": correct, "backends": set(), "worst_spot": Max(0.0)}
        if not any(w.queries for w in chunk):
            return state
        batch, word_ids = _batch([w.item for w in chunk], tokenizer)

        def on_layer(index, layer):
            res = attribute(layer, methods=["attn_w", "attn_n"], heads=True, backend=backend, verify=verify,
                            verify_seed=index)
            state["backends"].update(f"{p}={name}" for p, name in res.backends.items())
            spot = [e.max().item() for e in res.spot_check.values()]
            state["worst_spot"] = Max(max([state["worst_spot"].value] + spot))
            vectors = None
            if norm_to == "vector":
                vectors = head_vectors(layer, slice(None), torch.float64)  # (B, N, H, D)
                if layer.attn_out_norm is not None:  # after a norm after attention, the maps hold its split part of f
                    vectors = layer.attn_out_norm.split(vectors).double()
            vis = layer.visible().cpu()
            H = res.head_maps["attn_w"].shape[1]
            state["heads"] = Fixed(H)
            table = correct.setdefault(index, {k: {g: torch.zeros(H, dtype=torch.long) for g in GROUPS} for k in KINDS})
            for b, w in enumerate(chunk):
                if not w.queries:
                    continue
                keep = batch["attention_mask"][b].bool().nonzero().flatten()
                sub = lambda t: t[b][:, keep][:, :, keep].cpu()  # noqa: E731
                wid = [word_ids[b][p] for p in keep.tolist()]
                vec = None if vectors is None else vectors[b, keep].cpu()
                maps = word_maps(sub(res.head_maps["attn_w"]), sub(res.head_maps["attn_n"]), vec, wid, w.n_words, norm_to)
                assign = torch.zeros(w.n_words, len(keep), dtype=torch.float64)
                for p, u in enumerate(wid):
                    if u is not None and u < w.n_words:
                        assign[u, p] = 1.0
                vis_w = (assign @ vis[b][keep][:, keep].double() @ assign.T) > 0
                for q in w.queries:
                    for kind in KINDS:
                        ok = _select(maps[kind][:, q.head], q, candidates, vis_w[q.head]).long()
                        for g in ("all", q.type):
                            table[kind][g] += ok

        capture(model, batch, on_layer, layers=wanted)
        return state

    summed = batch_sum(len(batches), leaf, parts=parts, name="coreference", progress=progress,
                       desc="coreference: batches")
    if summed is None:  # another rank than 0 of a shared run
        return None
    correct, used_backends, worst_spot = summed["correct"], summed["backends"], summed["worst_spot"].value
    H = summed["heads"].value if "heads" in summed else None

    def acc(k, n):
        return None if n == 0 else k / n

    out = {"model": {"name": _model_name(model), "family": adapter.family, "causal": adapter.causal},
           "layers": [i + 1 for i in wanted], "heads": H, "documents": len(documents),
           "candidates": candidates, "norm_to": norm_to, "max_tokens": max_tokens,
           "mentions": sum(w.mentions for w in windows),
           "dropped_mentions": {"outside_window": sum(w.dropped for w in windows),
                                "empty_only": sum(d.dropped.get("empty_only", 0) for d in documents)},
           "queries": dict(counts),
           "baselines": {b: {g: acc(base_correct[b][g], counts[g]) for g in GROUPS} for b in BASELINES}}
    if counts["all"] == 0:
        out.update(accuracy=None, best=None, backends="", worst_spot_check_error=0.0)
        return out
    out["accuracy"] = {k: {g: [[acc(int(v), counts[g]) for v in correct[i][k][g]] for i in wanted] for g in GROUPS}
                       for k in KINDS}
    out["best"] = {}
    for kind in KINDS:
        grid = torch.stack([correct[i][kind]["all"] for i in wanted])  # (L, H)
        li, h = divmod(int(grid.flatten().argmax()), grid.shape[1])  # ties: the first (layer, head)
        out["best"][kind] = {"layer": wanted[li] + 1, "head": h + 1,
                             **{g: out["accuracy"][kind][g][li][h] for g in GROUPS}}
    out["backends"] = ", ".join(sorted(used_backends))
    out["worst_spot_check_error"] = worst_spot
    return out


# ----------------------------------------------------------------------------------------------- output
def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}"


def summary_lines(result: dict) -> list[str]:
    """A few lines for the CLI: queries, the baselines and the best head per kind."""
    q = result["queries"]
    lines = [f"coreference: {result['documents']} documents, {q['all']} queries "
             f"({', '.join(f'{t} {q[t]}' for t in TYPES)}), {result['mentions']} mentions in the window"]
    for b in BASELINES:
        lines.append(f"  baseline {b}: {_pct(result['baselines'][b]['all'])}%")
    for kind in KINDS:
        best = (result.get("best") or {}).get(kind)
        if best:
            lines.append(f"  best head ({kind}): L{best['layer']}-H{best['head']} {_pct(best['all'])}%")
    return lines


def figures(result: dict, out: Path) -> dict:
    """coreference.png: accuracy (all queries) per layer and head, weights and norms side by side."""
    from matplotlib.figure import Figure

    from .heads import _heat, _save

    if not result.get("accuracy"):
        return {}
    layers, H = result["layers"], result["heads"]
    fig = Figure(figsize=(2 * (0.35 * H + 2.2), 0.35 * len(layers) + 1.6), layout="constrained")
    for ax, kind in zip(fig.subplots(1, 2), KINDS):
        _heat(ax, result["accuracy"][kind]["all"], layers, f"antecedent accuracy ({kind})", cmap="Greens")
    _save(fig, Path(out) / "coreference.png")
    return {"coreference": "coreference.png"}


def report_lines(result: dict, written: dict) -> list[str]:
    """The report.md section: Table 2 of Clark et al. 2019 for this model, weights and norms."""
    q = result["queries"]
    lines = ["## Coreference heads (Clark et al. 2019, section 4.3)", "",
             f"{result['documents']} documents truncated to {result['max_tokens']} pieces; {result['mentions']} mentions "
             f"inside the window ({result['dropped_mentions']['outside_window']} dropped); {q['all']} queries "
             f"({', '.join(f'{t} {q[t]}' for t in TYPES)}). Candidates: {result['candidates']}. Accuracy %:", ""]
    if "coreference" in written:
        lines += [f"![coreference]({written['coreference']})", ""]
    lines += ["| | all | pronoun | proper | nominal |", "|---|---:|---:|---:|---:|"]
    for b in BASELINES:
        lines.append(f"| {b.replace('_', ' ')} | " + " | ".join(_pct(result["baselines"][b][g]) for g in GROUPS) + " |")
    for kind in KINDS:
        best = (result.get("best") or {}).get(kind)
        if best:
            lines.append(f"| best head, {kind} (L{best['layer']}-H{best['head']}) | "
                         + " | ".join(_pct(best[g]) for g in GROUPS) + " |")
    return lines + [""]
