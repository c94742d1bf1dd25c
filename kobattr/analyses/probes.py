"""Attention-based probing classifiers for dependency heads (Clark et al. 2019 section 5, Table 3; spec
clark2019.md section 3), trained on attention weights and on norms side by side: `kobattr heads --probe-*`.

Features. Per sentence of U gold units (heads.read_conllu: a multi-word token is one unit) the word-level map
of every analysed layer and head, with the first and the last token of the encoding as words 0 and U+1
([CLS] and [SEP] for BERT-style encoders; a decoder-only model's BOS, or without one the first piece of word 1,
and the last piece of word U: kobattr's choice, the paper only has BERT). Word level as heads.py: attention
*to* a unit sums over its key pieces, attention *from* it is the mean over its query pieces. Norms: each
token query row of ||alpha_ij f(x_j)|| is divided by its sum (normalize_rows=True, spec [D]), so features
stay on alpha's [0, 1] scale; attention to a split unit is the norm of the summed vectors
||sum_{t in w} alpha_it f(x_t)|| (spec section 0 default, norm_to="vector") or the sum of the norms
(norm_to="sum", which is heads.py's word map).

Probes (AA = clarkkev/attention-analysis@b609cfc, Syntax_Analysis.ipynb cell 14). From the 2LH maps M_k and
their transposes, candidate c of dependent d is ROOT (column 0, scored r_s M_k[d, first] + r_e M_k[d, last]
with two shared learned scalars) or word c (self not masked). attn: s(d, c) = sum_k w_k F_k(d, c);
attn_words: s(d, c) = sum_k omega_k(d, c) F_k(d, c), omega = Dense(2 dim -> 2LH, with bias)([v_d; v_c]) of
frozen word vectors, an all-zero pair for ROOT; distances (the Distances+GloVe baseline): the 8 distance
features beside [v_d; v_c], 256 tanh units, 1 output. AA pairs the word vectors with the candidate columns
shifted by one (its zero ROOT pair is appended last while ROOT is column 0); kobattr follows the spec and
pairs candidate c with word c. Right-branching: the head is the next word, the last word's is ROOT.

Training: softmax cross-entropy over the U+1 candidates summed over a sentence's scored words (punctuation
included), one sentence per Adam step (lr 0.002, betas and eps as TF1's defaults; torch's eps placement),
file order, TF's Glorot-uniform initialisation from a local torch.Generator(seed), zero biases. With epochs > 1
the epoch of the best dev UAS is kept. UAS counts the words whose relation is not `punct`. Gold: every
syntactic word's HEAD (0 = ROOT) mapped to units; arcs inside one multi-word token and words without a head
are left out (as in heads.py). Sentences over max_pieces pieces (specials included) are dropped (AA:
extract_attention.py), and counted.

Real data (UD_English-EWT or the GUM news/interview/academic documents from universaldependencies.org;
GloVe 6B 100-d from nlp.stanford.edu) is the user's to supply; the shipped sample (kobattr/data/sample.conllu)
only makes a quick run possible.

Shape vocabulary: L analysed layers, H heads, K = L*H maps, U units of a sentence, S = U + 2 word-level
positions, n tokens of one text, D word-vector size.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..layer import LayerInputError, head_vectors
from .heads import DepSentence, _batch, _encode, _save

KINDS = ("weights", "norms")
PROBES = ("attn", "attn_words")
N_DISTANCE = 8
MAX_PIECES = 128
HIDDEN = 256
ADAM = {"betas": (0.9, 0.999), "eps": 1e-8}  # TF1 AdamOptimizer defaults


# ----------------------------------------------------------------------------------------------- gold
def gold_examples(sentence: DepSentence) -> list[tuple[int, int, str]]:
    """(dependent unit d, gold candidate, relation) of every scored word: candidate 0 = ROOT, u + 1 = unit u."""
    out = [(d, 0, "root") for d in sentence.roots]
    out += [(d, h + 1, rel) for d, h, rel in sentence.arcs]
    return sorted(out, key=lambda e: e[0])


def is_punct(relation: str) -> bool:
    """Whether a UD relation is punctuation (left out of UAS)."""
    return relation.split(":")[0] == "punct"


# ----------------------------------------------------------------------------------------------- word vectors
class WordVectors:
    """A frozen table of word vectors looked up lowercased, unknown words -> row 0 (AA cell 12)."""

    def __init__(self, vocab: dict, matrix: Tensor, source: str):
        self.vocab, self.matrix, self.source = vocab, matrix.float(), source
        self.dim = matrix.shape[1]

    def vectors(self, sentence: DepSentence) -> Tensor:
        """(U, D) the vector of each unit."""
        return self.matrix[[self.vocab.get(u.lower(), 0) for u in sentence.units]]

    def describe(self) -> dict:
        return {"source": self.source, "dim": self.dim, "rows": self.matrix.shape[0]}


def glove_vectors(path) -> WordVectors:
    """GloVe's text format (`word v_1 ... v_D` per line); the first occurrence of a word wins."""
    vocab, rows = {}, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip().split(" ")
            if len(parts) < 2:
                continue
            try:
                values = [float(v) for v in parts[1:]]
            except ValueError:
                raise ValueError(f"{path}: line {number} is not `word` followed by numbers (GloVe text format).") from None
            if rows and len(values) != len(rows[0]):
                raise ValueError(f"{path}: line {number} has {len(values)} numbers, the first line {len(rows[0])}.")
            if parts[0] not in vocab:
                vocab[parts[0]] = len(rows)
                rows.append(values)
    if not rows:
        raise ValueError(f"{path} holds no word vectors.")
    return WordVectors(vocab, torch.tensor(rows), f"glove:{Path(path).name}")


def random_vectors(sentences: Sequence[DepSentence], dim: int = 100, seed: int = 0) -> WordVectors:
    """A seeded standard-normal table over the lowercased words of ``sentences`` (sorted)."""
    words = sorted({u.lower() for s in sentences for u in s.units})
    gen = torch.Generator().manual_seed(seed)
    return WordVectors({w: i for i, w in enumerate(words)}, torch.randn(len(words), dim, generator=gen),
                       f"random(dim={dim}, seed={seed})")


class ModelEmbeddings:
    """The model's own input embeddings, each unit the mean over its pieces (zeros for a unit without any)."""

    def __init__(self, model, tokenizer):
        self.table = model.get_input_embeddings().weight.detach().float().cpu()
        self.tokenizer = tokenizer
        self.dim = self.table.shape[1]
        self.source = "model input embeddings"

    def vectors(self, sentence: DepSentence) -> Tensor:
        enc = self.tokenizer(list(sentence.units), is_split_into_words=True, add_special_tokens=False)
        out = torch.zeros(len(sentence.units), self.dim)
        count = torch.zeros(len(sentence.units), 1)
        for t, u in zip(enc["input_ids"], enc.word_ids()):
            if u is not None:
                out[u] += self.table[t]
                count[u] += 1
        return out / count.clamp(min=1)

    def describe(self) -> dict:
        return {"source": self.source, "dim": self.dim, "rows": self.table.shape[0]}


# ----------------------------------------------------------------------------------------------- features
def group_matrix(word_ids: Sequence[Optional[int]], n_units: int) -> Tensor:
    """(S, n) 0/1: row 0 the first token, rows 1..U the pieces of each unit, row U+1 the last token."""
    G = torch.zeros(n_units + 2, len(word_ids))
    G[0, 0] = G[n_units + 1, len(word_ids) - 1] = 1.0
    for p, u in enumerate(word_ids):
        if u is not None:
            G[u + 1, p] = 1.0
    return G


def word_maps(alpha: Tensor, norms: Optional[Tensor], word_ids: Sequence[Optional[int]], n_units: int,
              piece_vectors: Optional[dict] = None, normalize_rows: bool = True) -> dict:
    """Word-level maps (L, H, S, S) of one unpadded text from its token maps alpha, norms (L, H, n, n).

    piece_vectors: {unit: (L, P, H, D) f^h of its P pieces} for the units of several pieces whose attention is
    the norm of the summed vectors (norm_to="vector"); without it, the sum of the norms."""
    G = group_matrix(word_ids, n_units).to(alpha.dtype)
    Q = G / G.sum(1, keepdim=True).clamp(min=1)  # mean over query pieces
    out = {"weights": Q @ alpha @ G.T}
    if norms is not None:
        total = norms.sum(-1, keepdim=True)
        scale = torch.where(total > 0, 1 / torch.where(total > 0, total, torch.ones_like(total)), 0.0) \
            if normalize_rows else torch.ones_like(total)
        K = (norms * scale) @ G.T  # (L, H, n, S)
        for u, f in (piece_vectors or {}).items():
            pieces = G[u + 1].nonzero().flatten()
            summed = torch.einsum("lhip,lphd->lhid", alpha[..., pieces], f.to(alpha.dtype))
            K[..., u + 1] = summed.norm(dim=-1) * scale[..., 0]
        out["norms"] = Q @ K
    return out


def _piece_vectors(model, batch: dict, layers: Sequence[int], wanted: list) -> list:
    """Per text {padded position: (L, H, D) f^h(x_p)} of the positions in ``wanted`` (one list per text)."""
    from ..models import capture

    per_layer = []

    def on_layer(index, layer):
        dtype = torch.float64 if layer.x.dtype == torch.float64 else torch.float32
        f = head_vectors(layer, slice(None), dtype)  # (B, N, H, D)
        per_layer.append([f[b, pos].cpu() for b, pos in enumerate(wanted)])

    capture(model, batch, on_layer, layers=list(layers))
    return [torch.stack([per_layer[li][b] for li in range(len(per_layer))]) for b in range(len(wanted))]  # (L, P, H, D)


def probe_features(model, tokenizer, sentences: Sequence[DepSentence], layers: Optional[Sequence[int]] = None,
                   kinds: Sequence[str] = KINDS, batch_size: int = 8, backend="auto", progress: bool = False,
                   normalize_rows: bool = True, norm_to: str = "vector", max_pieces: int = MAX_PIECES,
                   verify: int = 2) -> list:
    """Per sentence {kind: (L, H, S, S) float32 word-level maps} (the module docstring), None for a sentence over
    ``max_pieces`` pieces. Maps from kobattr.analyze(..., methods=["attn_w", "attn_n"], heads=True)."""
    from tqdm.auto import tqdm

    from ..api import analyze

    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise LayerInputError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}.")
    if norm_to not in ("vector", "sum"):
        raise LayerInputError(f"norm_to must be 'vector' (norm of the summed vectors) or 'sum', got {norm_to!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LayerInputError(f"batch_size must be a positive int, got {batch_size!r}.")
    sentences = list(sentences)
    if not sentences or not all(isinstance(s, DepSentence) for s in sentences):
        raise LayerInputError("sentences must be a non-empty list of DepSentence (heads.read_conllu).")
    items = [_encode(s, tokenizer, None) for s in sentences]
    order = [i for i, it in enumerate(items) if len(it.ids) <= max_pieces]
    out: list = [None] * len(sentences)
    methods = ["attn_w", "attn_n"] if "norms" in kinds else ["attn_w"]
    chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc="probes: features", disable=not progress, file=sys.stderr):
        batch, word_ids = _batch([items[i] for i in chunk], tokenizer)
        result = analyze(model, batch, tokenizer=tokenizer, methods=methods, heads=True, layers=layers,
                         backend=backend, verify=verify)
        mask = result.attention_mask
        keeps = [mask[b].nonzero().flatten() for b in range(len(chunk))]
        split = []  # per text {unit: padded positions} of the units of several pieces
        for b, i in enumerate(chunk):
            units: dict = {}
            for p in keeps[b].tolist():
                if word_ids[b][p] is not None:
                    units.setdefault(word_ids[b][p], []).append(p)
            split.append({u: ps for u, ps in units.items() if len(ps) > 1})
        vectors = None
        if "norms" in kinds and norm_to == "vector" and any(split):
            flat = [[p for ps in s.values() for p in ps] for s in split]
            vectors = _piece_vectors(model, batch, result.layers, flat)
        for b, i in enumerate(chunk):
            keep = keeps[b]
            alpha = result.head_maps["attn_w"][:, b][:, :, keep][:, :, :, keep].float()
            norms = (result.head_maps["attn_n"][:, b][:, :, keep][:, :, :, keep].float()
                     if "norms" in kinds else None)
            pieces = None
            if vectors is not None:
                pieces, start = {}, 0
                for u, ps in split[b].items():
                    pieces[u] = vectors[b][:, start:start + len(ps)]
                    start += len(ps)
            maps = word_maps(alpha, norms, [word_ids[b][p] for p in keep.tolist()], len(sentences[i].units),
                             pieces, normalize_rows)
            out[i] = {k: maps[k].float().contiguous() for k in kinds}
        del result
    return out


def candidate_features(maps: Tensor, root_start, root_end) -> Tensor:
    """(2K, U, U+1) F_k(d, c) from word-level maps (L, H, S, S): the K maps then their transposes; column 0 is
    ROOT, root_start * M_k[d, 0] + root_end * M_k[d, S-1], columns 1..U the words (AA cell 14)."""
    L, H, S, _ = maps.shape
    M = maps.reshape(L * H, S, S)
    M = torch.cat([M, M.transpose(1, 2)], 0)
    root = root_start * M[:, 1:-1, 0] + root_end * M[:, 1:-1, -1]
    return torch.cat([root[..., None], M[:, 1:-1, 1:-1]], -1)


def distance_features(n: int) -> Tensor:
    """(8, n, n+1) AA cell 13: (c-d)/n where c > d, its mirror, indicators of offsets 0, -1, +1, -2, +2 (all 0 in
    the ROOT column 0) and a ROOT indicator."""
    dist = torch.zeros(n, n)
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = (j - i) / n
    mats = [dist, dist.T] + [torch.diag(torch.ones(n - abs(k)), k) for k in (0, -1, 1, -2, 2)]
    feats = torch.cat([torch.zeros(N_DISTANCE - 1, n, 1), torch.stack(mats)], -1)
    root = torch.zeros(1, n, n + 1)
    root[..., 0] = 1
    return torch.cat([feats, root], 0)


def word_pairs(vectors: Tensor) -> Tensor:
    """(U, U+1, 2D) [v_d; v_c] of each dependent d and candidate c, all zero in the ROOT column."""
    U, D = vectors.shape
    pairs = torch.cat([vectors[:, None].expand(U, U, D), vectors[None].expand(U, U, D)], -1)
    return torch.cat([torch.zeros(U, 1, 2 * D), pairs], 1)


# ----------------------------------------------------------------------------------------------- probes
def _glorot(shape, fan_in: int, fan_out: int, gen: torch.Generator) -> torch.nn.Parameter:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.nn.Parameter((torch.rand(shape, generator=gen) * 2 - 1) * limit)


class Probe(torch.nn.Module):
    """One of AA's probes: kind "attn", "attn_words" or "distances" (the module docstring)."""

    def __init__(self, kind: str, n_maps: int, word_dim: int, generator: torch.Generator, word_vectors=None):
        super().__init__()
        self.kind, self.word_vectors = kind, word_vectors
        self.best_epoch, self.dev_uas = None, []
        if kind in PROBES:
            # tf.get_variable on a scalar: TF's fans of shape [] are 1 and 1
            self.root_start = _glorot((), 1, 1, generator)
            self.root_end = _glorot((), 1, 1, generator)
        if kind == "attn":
            self.weight = _glorot((n_maps,), n_maps, n_maps, generator)  # TF: a 1-D shape has fan_in = fan_out = size
        elif kind == "attn_words":
            self.dense = torch.nn.Linear(2 * word_dim, n_maps)
            self.dense.weight = _glorot((n_maps, 2 * word_dim), 2 * word_dim, n_maps, generator)
            torch.nn.init.zeros_(self.dense.bias)
        elif kind == "distances":
            # AA's input also holds one all-zero dummy map: it adds nothing but counts in Glorot's fan-in
            fan_in = N_DISTANCE + 2 * word_dim + 1
            self.hidden = torch.nn.Linear(N_DISTANCE + 2 * word_dim, HIDDEN)
            self.hidden.weight = _glorot((HIDDEN, N_DISTANCE + 2 * word_dim), fan_in, HIDDEN, generator)
            self.out = torch.nn.Linear(HIDDEN, 1)
            self.out.weight = _glorot((1, HIDDEN), HIDDEN, 1, generator)
            for b in (self.hidden.bias, self.out.bias):
                torch.nn.init.zeros_(b)
        else:
            raise LayerInputError(f"kind must be 'attn', 'attn_words' or 'distances', got {kind!r}.")

    def forward(self, maps: Optional[Tensor], words: Optional[Tensor]) -> Tensor:
        """(U, U+1) scores s(d, c) from word-level maps (L, H, S, S) and unit vectors (U, D)."""
        if self.kind == "distances":
            x = torch.cat([distance_features(words.shape[0]).permute(1, 2, 0), word_pairs(words)], -1)
            return self.out(torch.tanh(self.hidden(x)))[..., 0]
        F = candidate_features(maps, self.root_start, self.root_end)  # (2K, U, U+1)
        if self.kind == "attn":
            return torch.einsum("k,kdc->dc", self.weight, F)
        return (self.dense(word_pairs(words)) * F.permute(1, 2, 0)).sum(-1)


def _inputs(features, sentences, word_vectors, kind) -> list:
    """(maps, words, dependents, gold, relations) per kept sentence with at least one scored word."""
    if features is not None and len(features) != len(sentences):
        raise LayerInputError(f"{len(features)} feature entries for {len(sentences)} sentences.")
    rows = []
    for i, s in enumerate(sentences):
        maps = None if features is None else features[i]
        ex = gold_examples(s)
        if (kind != "distances" and maps is None) or not ex:
            continue
        words = word_vectors.vectors(s) if word_vectors is not None else None
        d, g, rel = zip(*ex)
        rows.append((maps, words, torch.tensor(d), torch.tensor(g), rel))
    return rows


def _check_features(features) -> None:
    if features is None or not any(f is not None for f in features):
        raise LayerInputError("the attention probes need features (probe_features, one kind: a list of (L, H, S, S) maps).")
    for f in features:
        if f is not None and (not isinstance(f, Tensor) or f.dim() != 4 or f.shape[-1] != f.shape[-2]):
            raise LayerInputError("features must be (L, H, S, S) tensors of one kind (probe_features(...)[i][kind]).")


def train_probe(features, sentences: Sequence[DepSentence], kind: str = "attn", word_vectors=None, seed: int = 0,
                lr: float = 0.002, epochs: int = 1, dev: Optional[tuple] = None, progress: bool = False) -> Probe:
    """A probe trained as AA's run_training (the module docstring). features: per sentence (L, H, S, S) word-level
    maps of one kind (None: skipped; unused by "distances"); word_vectors: a WordVectors / ModelEmbeddings table
    (attn_words, distances). dev: (features, sentences); with epochs > 1 the best dev epoch is kept
    (probe.dev_uas per epoch, probe.best_epoch)."""
    from tqdm.auto import tqdm

    if kind != "attn" and word_vectors is None:
        raise LayerInputError(f"the {kind} probe needs word_vectors= (glove_vectors, random_vectors or ModelEmbeddings).")
    if kind != "distances":
        _check_features(features)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise LayerInputError(f"epochs must be a positive int, got {epochs!r}.")
    rows = _inputs(features, sentences, word_vectors if kind != "attn" else None, kind)
    if not rows:
        raise LayerInputError("no training sentence with a scored word (and features).")
    n_maps = 0 if kind == "distances" else 2 * rows[0][0].shape[0] * rows[0][0].shape[1]
    gen = torch.Generator().manual_seed(seed)
    probe = Probe(kind, n_maps, word_vectors.dim if word_vectors is not None else 0, gen,
                  word_vectors if kind != "attn" else None)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, **ADAM)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        probe.train()
        for maps, words, d, g, _ in tqdm(rows, desc=f"probes: {kind} epoch {epoch + 1}", disable=not progress,
                                         file=sys.stderr, leave=False):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(probe(maps, words)[d], g, reduction="sum")
            loss.backward()
            opt.step()
        if dev is not None:
            score = uas(probe, *dev)
            probe.dev_uas.append(score)
            if score > best:
                best, probe.best_epoch = score, epoch + 1
                best_state = {k: v.clone() for k, v in probe.state_dict().items()}
    if best_state is not None:
        probe.load_state_dict(best_state)
    probe.eval()
    return probe


def predictions(probe: Probe, features, sentences: Sequence[DepSentence]) -> list:
    """Per scored sentence (predicted candidate, gold candidate, relation) of every scored word."""
    out = []
    with torch.no_grad():
        for maps, words, d, g, rel in _inputs(features, sentences, probe.word_vectors, probe.kind):
            pred = probe(maps, words)[d].argmax(-1)
            out.append(list(zip(pred.tolist(), g.tolist(), rel)))
    return out


def _score(pairs) -> tuple[int, int]:
    scored = [(p, g) for sent in pairs for p, g, rel in sent if not is_punct(rel)]
    return sum(p == g for p, g in scored), len(scored)


def uas(probe: Probe, features, sentences: Sequence[DepSentence]) -> float:
    """Unlabelled attachment score over the words whose relation is not punct (NaN without any)."""
    correct, total = _score(predictions(probe, features, sentences))
    return correct / total if total else float("nan")


def right_branching_uas(sentences: Sequence[DepSentence]) -> float:
    """UAS of the head = the next word (the last word's head is ROOT), punct excluded."""
    pairs = [[(d + 2 if d + 1 < len(s.units) else 0, g, rel) for d, g, rel in gold_examples(s)] for s in sentences]
    correct, total = _score(pairs)
    return correct / total if total else float("nan")


# ----------------------------------------------------------------------------------------------- driver
def _word_vectors(word_vectors, model, tokenizer, sentences):
    if word_vectors is None:
        return ModelEmbeddings(model, tokenizer)
    if isinstance(word_vectors, str) and word_vectors == "random":
        return random_vectors(sentences)
    if isinstance(word_vectors, (str, Path)):
        return glove_vectors(word_vectors)
    if hasattr(word_vectors, "vectors") and hasattr(word_vectors, "dim"):
        return word_vectors
    raise LayerInputError("word_vectors must be None (the model's input embeddings), 'random', a GloVe file path "
                          f"or a WordVectors table, got {type(word_vectors).__name__}.")


def _finite(tree):
    """NaN (a split without a scored word) as None, so the results stay strict JSON."""
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def _counts(sentences, features) -> dict:
    kept = [s for s, f in zip(sentences, features) if f is not None]
    ex = [e for s in kept for e in gold_examples(s)]
    return {"sentences": len(sentences), "dropped_over_max_pieces": len(sentences) - len(kept),
            "words": len(ex), "scored_words": sum(not is_punct(r) for _, _, r in ex)}


def attention_probes(model, tokenizer, train: Sequence[DepSentence], dev: Sequence[DepSentence],
                     test: Sequence[DepSentence], layers: Optional[Sequence[int]] = None, word_vectors=None,
                     seed: int = 0, progress: bool = False, batch_size: int = 8, backend="auto",
                     normalize_rows: bool = True, norm_to: str = "vector", epochs: int = 1) -> dict:
    """UAS on dev and test of the attn and attn_words probes trained on ``train``, for weights and norms side by
    side, beside right-branching and the distances(+words) baseline (JSON types). word_vectors: None (the model's
    input embeddings), "random" (a seeded table), a GloVe text file, or a table."""
    from ..api import _wanted_layers
    from ..models import get_adapter
    from ..reproduce import _model_name

    analysed = _wanted_layers(layers, len(get_adapter(model).layer_modules(model)))
    splits = {"train": list(train), "dev": list(dev), "test": list(test)}
    for name, sents in splits.items():
        if not sents:
            raise LayerInputError(f"the {name} split holds no sentence.")
    vectors = _word_vectors(word_vectors, model, tokenizer, [s for v in splits.values() for s in v])
    feats = {name: probe_features(model, tokenizer, sents, layers=layers, batch_size=batch_size, backend=backend,
                                  progress=progress, normalize_rows=normalize_rows, norm_to=norm_to)
             for name, sents in splits.items()}
    one = next(f for f in feats["train"] if f is not None)
    per_kind = {k: {name: [None if f is None else f[k] for f in feats[name]] for name in splits} for k in KINDS}
    out_uas: dict = {"dev": {}, "test": {}}
    best_epochs: dict = {}
    for probe_kind in PROBES:
        for split in out_uas:
            out_uas[split][probe_kind] = {}
        for kind in KINDS:
            f = per_kind[kind]
            probe = train_probe(f["train"], splits["train"], kind=probe_kind, word_vectors=vectors, seed=seed,
                                epochs=epochs, dev=(f["dev"], splits["dev"]), progress=progress)
            best_epochs[f"{probe_kind}/{kind}"] = probe.best_epoch
            out_uas["dev"][probe_kind][kind] = probe.dev_uas[probe.best_epoch - 1]
            out_uas["test"][probe_kind][kind] = uas(probe, f["test"], splits["test"])
    kept = {name: [s for s, f in zip(splits[name], feats[name]) if f is not None] for name in splits}
    dist = train_probe(None, kept["train"], kind="distances", word_vectors=vectors, seed=seed, epochs=epochs,
                       dev=(None, kept["dev"]), progress=progress)
    for split in out_uas:
        out_uas[split]["right_branching"] = right_branching_uas(kept[split])
        out_uas[split]["distances_words"] = dist.dev_uas[dist.best_epoch - 1] if split == "dev" else \
            uas(dist, None, kept[split])
    return {
        "model": _model_name(model),
        "layers": [i + 1 for i in analysed],
        "heads": int(one["weights"].shape[1]),
        "uas": _finite(out_uas),
        "best_epoch": best_epochs,
        "word_vectors": vectors.describe(),
        "counts": {name: _counts(splits[name], feats[name]) for name in splits},
        "settings": {"seed": seed, "lr": 0.002, "epochs": epochs, "normalize_rows": normalize_rows, "norm_to": norm_to,
                     "max_pieces": MAX_PIECES, "punct_excluded": True,
                     "root_tokens": "first and last token of the encoding ([CLS], [SEP] for BERT)"},
    }


# ----------------------------------------------------------------------------------------------- output
LABELS = {"attn": "Attn", "attn_words": "Attn+words", "right_branching": "right-branching",
          "distances_words": "Distances+words"}


def summary_lines(result: dict) -> list[str]:
    """A few lines for the CLI: UAS (punct excluded) dev / test of each probe, weights vs norms, and the baselines."""
    u = result["uas"]
    c = result["counts"]
    lines = [f"attention probes (UAS without punct, dev / test; train {c['train']['sentences']} sentences, "
             f"dev {c['dev']['scored_words']} words, test {c['test']['scored_words']} words; word vectors: "
             f"{result['word_vectors']['source']})"]
    for p in PROBES:
        lines.append(f"  {LABELS[p]:<16} weights {u['dev'][p]['weights']:.3f} / {u['test'][p]['weights']:.3f}   "
                     f"norms {u['dev'][p]['norms']:.3f} / {u['test'][p]['norms']:.3f}")
    for b in ("right_branching", "distances_words"):
        lines.append(f"  {LABELS[b]:<16} {u['dev'][b]:.3f} / {u['test'][b]:.3f}")
    return lines


def plot(result: dict, path) -> str:
    """A bar plot of the test UAS: each probe for weights and norms, the baselines as lines; returns the file name."""
    import numpy as np
    from matplotlib.figure import Figure

    u = result["uas"]["test"]
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(PROBES))
    for k, kind in enumerate(KINDS):
        ax.bar(x + (k - 0.5) * 0.38, [u[p][kind] for p in PROBES], width=0.38, label=kind)
    for b, style in (("right_branching", ":"), ("distances_words", "--")):
        ax.axhline(u[b], color="k", linestyle=style, linewidth=1, label=LABELS[b])
    ax.set_xticks(x, [LABELS[p] for p in PROBES])
    ax.set_ylabel("test UAS (punct excluded)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    path = Path(path)
    _save(fig, path)
    return path.name


def figures(result: dict, out) -> dict:
    """probes.png (test UAS per probe, weights vs norms, baselines) in ``out``; returns {"probes": file name}."""
    from pathlib import Path

    return {"probes": plot(result, Path(out) / "probes.png")}


def report_lines(result: dict, written: dict) -> list[str]:
    """The report.md section: the figure and the UAS table of the summary lines."""
    lines = ["## Attention probes for dependency parsing (Clark et al. 2019, section 5, Table 3)", ""]
    if "probes" in written:
        lines += [f"![attention probes]({written['probes']})", ""]
    return lines + ["```", *summary_lines(result), "```", ""]
