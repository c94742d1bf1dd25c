"""The method registry: one MethodSpec per method, read by everything that computes, checks or shows one.

Row i of a map is the query (output) token, column j the source (key) token. Definitions and
conventions: docs/methods.md. Adding a method means one REGISTRY entry plus its computation in the
reference (kobattr/reference.py) and, if it needs new per-key parts, in core's preparation.

A method takes a *form* in each block structure it applies to (kobattr.layer.STRUCTURE_NAMES):
  weights  mean_h alpha^h_ij (+ [i == j] with residual), mixed 50/50 when the residual is in
  vector   the norm of t_ij = sum_h alpha^h_ij f^h(x_j) (split by the norm after attention, attn_out_norm,
           where the layer has one) (+ [i == j] x_i with residual), optionally split by the norm that
           follows the residual (``norm``: the Layer attribute holding it); ``prenorm``: a_ij itself, before
           the norm after attention
  ff       scope ``ff_scope`` of the feed-forward primitive: 0 ||FF_ij||, 1 ||res_ij + FF_ij||,
           2 ||g(res_ij + FF_ij)|| with g the norm after the FFN residual; FF_ij is split by the norm
           after the FFN (ffn_out_norm) where the layer has one
  peer     a peers' measure (ALTI, GlobEnc, Value Zeroing; spec section 10, kobattr/peers.py) of the vector
           form (residual in, ``target``, ``norm``) whose pairs it compares; ``rollout``: rolled out by analyze()
``target`` names the real hidden state (a key of Layer.forward) that the parts plus the bias sum to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

PAPERS = {
    "clark2019": "Clark et al. 2019, What Does BERT Look At? An Analysis of BERT's Attention",
    "kobayashi2020": "Kobayashi et al. 2020, Attention is Not Only a Weight: Analyzing Transformers with Vector Norms",
    "kobayashi2021": "Kobayashi et al. 2021, Incorporating Residual and Normalization Layers into Analysis of "
                     "Masked Language Models",
    "kobayashi2024": "Kobayashi et al. 2024, Analyzing Feed-Forward Blocks in Transformers through the Lens of "
                     "Attention Maps",
}
KINDS = ("weights", "vector", "ff", "peer")
PRIMITIVES = ("attention_maps", "ff_maps")  # the peers' measures run in kobattr/peers.py, not through a backend


@dataclass(frozen=True)
class Form:
    """How a method is computed in one block structure (see the module docstring)."""

    kind: str
    residual: bool  # the map contains the residual path (rollout uses it as it is)
    target: Optional[str] = None  # the real hidden state parts + bias sum to (vector and ff forms)
    norm: Optional[str] = None  # vector forms: the Layer norm split after the residual ("ln1", "ln2"; it reads y)
    ff_scope: Optional[int] = None  # ff forms: index into the ff_maps output
    prenorm: bool = False  # vector forms: a_ij = sum_h alpha^h_ij f^h(x_j) before the norm after attention (P1)
    measure: Optional[str] = None  # peer forms: the peers' measure (kobattr/peers.py)
    rollout: bool = False  # peer forms: rolled out through the analysed layers (analyze)

    @property
    def primitive(self) -> str:
        return {"ff": "ff_maps", "peer": "peers"}.get(self.kind, "attention_maps")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    display: str
    paper: str  # a key of PAPERS
    forms: dict  # block structure -> Form
    heads: bool = False  # per-head maps with heads=True
    default: bool = False  # computed when no methods are named

    @property
    def structures(self) -> tuple:
        return tuple(self.forms)


@dataclass(frozen=True)
class Structure:
    """A block structure: its FF scopes in order, the component whose contextualization change each pair
    of consecutive scopes measures, and the maps FF-amp compares."""

    name: str
    description: str
    scopes: tuple
    components: dict  # component -> (map before, map after)
    ff_amp: tuple  # (map before the FFN, map of the FFN's share)
    ff_input: Optional[str]  # the vector method whose pairs are the FFN input (None: the FFN reads ln2(x_i) alone)
    ff_stream: str  # the vector method whose pairs the FFN output is added to
    out_norm: Optional[str] = None  # the Layer norm after the FFN residual (scope 2 of the FF primitive)


def _weights(residual):
    return Form("weights", residual)


def _vector(residual, target, norm=None):
    return Form("vector", residual, target, norm)


def _ff(scope, target, residual):
    return Form("ff", residual, target, ff_scope=scope)


ALL = ("post", "pre", "sandwich", "post_only", "parallel")  # kobattr.layer.STRUCTURE_NAMES
_PRE_LIKE = ("pre", "sandwich")  # a norm before the FFN


def _each(structures, make):
    return {s: make(s) for s in structures}


_REGISTRY = [
    MethodSpec("attn_w", "ATTN-W", "clark2019", _each(ALL, lambda s: _weights(False)), heads=True, default=True),
    MethodSpec("attnres_w", "ATTNRES-W", "kobayashi2021", _each(ALL, lambda s: _weights(True))),
    # what attention adds to the stream for (i, j): after the norm that follows attention where there is one
    MethodSpec("attn_n", "ATTN-N", "kobayashi2020", _each(ALL, lambda s: _vector(False, "attn")), heads=True,
               default=True),
    MethodSpec("attnres_n", "ATTNRES-N", "kobayashi2021", _each(ALL, lambda s: _vector(True, "y")), default=True),
    MethodSpec("attnresln_n", "ATTNRESLN-N", "kobayashi2021",
               {"post": _vector(True, "mid", "ln1"), **_each(_PRE_LIKE, lambda s: _vector(True, "mid", "ln2"))},
               default=True),
    MethodSpec("atb", "ATB", "kobayashi2024",
               {"post": _vector(True, "mid", "ln1"), **_each(ALL[1:], lambda s: _vector(True, "y"))}),
    MethodSpec("atbln", "ATBLN", "kobayashi2024", _each(_PRE_LIKE, lambda s: _vector(True, "mid", "ln2"))),
    MethodSpec("atbff", "ATBFF", "kobayashi2024", {"post": _ff(0, "ffn_out", False), "post_only": _ff(0, "ffn_out", False)}),
    MethodSpec("atblnff", "ATBLNFF", "kobayashi2024", _each(_PRE_LIKE, lambda s: _ff(0, "ffn_out", False))),
    MethodSpec("atbffres", "ATBFFRES", "kobayashi2024",
               {"post": _ff(1, "ffn_res", True), "post_only": _ff(1, "out", True), "parallel": _ff(1, "out", True)}),
    MethodSpec("atblnffres", "ATBLNFFRES", "kobayashi2024", _each(_PRE_LIKE, lambda s: _ff(1, "out", True))),
    MethodSpec("atbffresln", "ATBFFRESLN", "kobayashi2024", {"post": _ff(2, "out", True)}),
    # the literal Kobayashi 2020 quantity where a norm follows attention (attn_n there is after it); elsewhere attn_n
    # is already this, so it is not offered
    MethodSpec("attn_n_prenorm", "ATTN-N-PRENORM", "kobayashi2020",
               _each(("sandwich", "post_only"), lambda s: Form("vector", False, "attn_raw", prenorm=True)), heads=True),
]
REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in _REGISTRY}

_PRE_COMPONENTS = dict(scopes=("atb", "atbln", "atblnff", "atblnffres"),
                       components={"ln": ("atb", "atbln"), "ff": ("atbln", "atblnff"), "res": ("atblnff", "atblnffres")},
                       ff_amp=("atbln", "atblnff"), ff_input="atbln", ff_stream="atb")
STRUCTURES = {
    "post": Structure("post", "post-LN: y = x + Attn(x), h = LN1(y), out = LN2(h + FF(h))",
                      scopes=("atb", "atbff", "atbffres", "atbffresln"),
                      components={"ff": ("atb", "atbff"), "res": ("atbff", "atbffres"), "ln": ("atbffres", "atbffresln")},
                      ff_amp=("atb", "atbff"), ff_input="atb", ff_stream="atb", out_norm="ln2"),
    "pre": Structure("pre", "pre-LN: y = x + Attn(LN1(x)), out = y + FF(LN2(y))", **_PRE_COMPONENTS),
    "sandwich": Structure("sandwich", "sandwich norms: y = x + P1(Attn(LN1(x))), out = y + P2(FF(LN2(y)))",
                          **_PRE_COMPONENTS),
    "post_only": Structure("post_only", "norms after attention and FFN only: y = x + P1(Attn(x)), out = y + P2(FF(y))",
                           scopes=("atb", "atbff", "atbffres"),
                           components={"ff": ("atb", "atbff"), "res": ("atbff", "atbffres")},
                           ff_amp=("atb", "atbff"), ff_input="atb", ff_stream="atb"),
    # the FFN reads token i alone, so its share of row i is all in cell (i, i): FF and residual are one component
    "parallel": Structure("parallel", "parallel residual: out = x + Attn(LN1(x)) + FF(LN2(x))",
                          scopes=("atb", "atbffres"), components={"ffres": ("atb", "atbffres")},
                          ff_amp=("atb", "atbffres"), ff_input=None, ff_stream="atb"),
}


def form(method: str, structure: str) -> Form:
    return REGISTRY[method].forms[structure]


def methods_for(structure: str) -> tuple[str, ...]:
    """Every method defined for a block structure, in registry order."""
    return tuple(name for name, spec in REGISTRY.items() if structure in spec.forms)


def default_methods(structure: str) -> tuple[str, ...]:
    return tuple(m for m in methods_for(structure) if REGISTRY[m].default)


def ff_methods(methods, structure: str) -> tuple[str, ...]:
    """The methods among ``methods`` that need the feed-forward primitive."""
    return tuple(m for m in methods if form(m, structure).kind == "ff")


def has_residual(method: str, structure: str) -> bool:
    return form(method, structure).residual


def display_name(method: str) -> str:
    return REGISTRY[method].display


def check_methods(methods, structure: str) -> tuple[str, ...]:
    """Normalise a method request (None, "all", a name, or names) for a block structure, or raise ValueError.
    "all" is every per-layer method; the peers' rollouts (``*_rollout``) are asked for by name."""
    available = methods_for(structure)
    if methods is None:
        return default_methods(structure)
    if isinstance(methods, str):
        methods = (methods,)
    elif not isinstance(methods, (list, tuple)):
        raise ValueError(f"methods must be a name, a list of names or 'all', got {type(methods).__name__}.")
    if any(not isinstance(m, str) for m in methods):
        bad = next(m for m in methods if not isinstance(m, str))
        raise ValueError(f"method names must be strings, got {bad!r} in {list(methods)!r}.")
    # "alti,value_zeroing" names two methods (the CLI's --methods alti,value_zeroing)
    names = tuple(dict.fromkeys(p.strip().lower().replace("-", "_") for m in methods for p in m.split(",")
                                if p.strip() or "," not in m))
    if "all" in names:
        if len(names) > 1:
            raise ValueError(f"'all' cannot be mixed with method names (got {list(methods)!r}); ask for 'all' or for names.")
        return tuple(m for m in available if not form(m, structure).rollout)  # every per-layer map; rollouts by name
    if not names:
        raise ValueError("no methods requested; name at least one or ask for 'all'.")
    for m in names:
        if m not in available:
            elsewhere = [s for s in STRUCTURES if s != structure and m in methods_for(s)]
            hint = f" ({m} is defined for {', '.join(elsewhere)} layers)" if elsewhere else ""
            raise ValueError(f"unknown method {m!r} for a {structure} layer{hint}; choose from "
                             f"{', '.join(available)} or 'all'.")
    return names


def vector_ratio(context: Tensor, self_part: Tensor) -> Tensor:
    """Context-mixing ratio ||c|| / (||c|| + ||p||) over the last dim (0 where both are 0)."""
    c, p = context.norm(dim=-1), self_part.norm(dim=-1)
    total = c + p
    return torch.where(total > 0, c / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks of a 1-d tensor, ties sharing their average rank (as scipy.stats.rankdata)."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    return ((ends - (counts - 1) / 2.0))[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rho of two 1-d tensors."""
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else float("nan")


def contextualization_change(before: Tensor, after: Tensor, visible: Tensor) -> Tensor:
    """1 - Spearman rho of two (B, N, N) maps over the visible (query, key) pairs, per batch element (B,)."""
    return torch.tensor([1.0 - spearman(b[v], a[v]) for b, a, v in zip(before, after, visible)], dtype=torch.float64)


def row_normalize(m: Tensor) -> Tensor:
    sums = m.sum(-1, keepdim=True)
    return torch.where(sums > 0, m / torch.where(sums > 0, sums, torch.ones_like(sums)), torch.zeros_like(m))


def ff_amp(atb: Tensor, atbff: Tensor, visible: Tensor, k: int = 10,
           include_diagonal: bool = False) -> list[list[tuple[int, int, float]]]:
    """The top-k (query, key, amplification) pairs per batch element whose share the FF raises most:
    amplification = row-normalised ATBFF minus row-normalised ATB (each row sums to 1), over the
    visible pairs. kobattr's choice (spec section 4 leaves it open): the diagonal (a token's share of
    itself, which dominates otherwise) is left out unless include_diagonal."""
    keep = visible if include_diagonal else visible & ~torch.eye(visible.shape[-1], dtype=torch.bool, device=visible.device)
    amp = (row_normalize(atbff) - row_normalize(atb)).masked_fill(~keep, float("-inf"))
    result = []
    for a in amp:
        n_kept = int(torch.isfinite(a).sum())
        values, flat = a.flatten().topk(min(k, n_kept))
        result.append([(int(f) // a.shape[1], int(f) % a.shape[1], float(v)) for v, f in zip(values, flat)])
    return result


# ------------------------------------------------------------------------------- the peers' measures (spec section 10)
PAPERS.update({
    "ferrando2022": "Ferrando et al. 2022, Measuring the Mixing of Contextual Information in the Transformer",
    "modarressi2022": "Modarressi et al. 2022, GlobEnc: Quantifying Global Token Attribution by Incorporating the Whole "
                      "Encoder Layer in Transformers",
    "mohebbi2023": "Mohebbi et al. 2023, Quantifying Context Mixing in Transformers",
})


def _peer(measure, rollout=False):
    """ALTI forms: post-LN decomposes the LN1 output, the other structures the whole stream x_i + a_i after
    attention (the norm there feeds only the next sub-layer). A rollout, a product of maps, decomposes no state."""
    def make(s):
        if rollout:
            return Form("peer", True, measure=measure, rollout=True)
        return Form("peer", True, "mid", "ln1", measure=measure) if s == "post" else Form("peer", True, "y", measure=measure)
    return _each(ALL, make)


_PEER_REGISTRY = [
    MethodSpec("alti", "ALTI", "ferrando2022", _peer("alti")),
    MethodSpec("alti_rollout", "ALTI rollout", "ferrando2022", _peer("alti", True)),
    MethodSpec("alti_l2", "ALTI-L2", "ferrando2022", _peer("alti_l2")),
    MethodSpec("alti_l2_rollout", "ALTI-L2 rollout", "ferrando2022", _peer("alti_l2", True)),
    # GlobEnc carries the ATTNRES-LN parts through LN2: a post-LN (BERT) measure
    # GlobEnc's parts (no bias, FFN skipped) and Value Zeroing's distances sum to no hidden state: no target
    MethodSpec("globenc", "GlobEnc", "modarressi2022", {"post": Form("peer", True, measure="globenc")}),
    MethodSpec("globenc_rollout", "GlobEnc rollout", "modarressi2022",
               {"post": Form("peer", True, measure="globenc", rollout=True)}),
    MethodSpec("value_zeroing", "Value Zeroing", "mohebbi2023",
               _each(ALL, lambda s: Form("peer", True, measure="value_zeroing"))),
    MethodSpec("value_zeroing_rollout", "Value Zeroing rollout", "mohebbi2023",
               _each(ALL, lambda s: Form("peer", True, measure="value_zeroing", rollout=True))),
]
PAPERS["ferrando2024"] = ("Ferrando & Voita 2024, Information Flow Routes: Automatically Interpreting Language Models "
                          "at Scale")
# the attention edges of the information-flow graph (kobattr.flow builds the graph and its routes)
_PEER_REGISTRY.append(MethodSpec("flow_attn", "Flow (attention)", "ferrando2024",
                                 _each(ALL, lambda s: Form("peer", True, measure="flow_attn"))))
REGISTRY.update({spec.name: spec for spec in _PEER_REGISTRY})
