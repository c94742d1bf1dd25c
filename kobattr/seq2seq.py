"""Encoder-decoder models: the decoder layer with its cross-attention, and the cross maps (spec section 7).

A decoder layer (target position i, source position j, e_j the encoder's final output) runs

    post-LN (Marian, BART):          p_i = LN_s(x_i + SelfAttn_i) ;  y_i = p_i + CrossAttn_i ;  x2_i = LN_c(y_i) ;
                                     out_i = LN_f(x2_i + FF(x2_i))
    pre-LN (M2M-100, NLLB, mBART):   p_i = x_i + SelfAttn(LN_s(x))_i ;  y_i = p_i + CrossAttn(LN_c(p))_i ;
                                     out_i = y_i + FF(LN_f(y_i))

with CrossAttn_i = sum_j c_ij + b_Oc, c_ij = sum_h alpha^h_ij f_c^h(e_j), f_c^h(e_j) = (e_j W_V^h + b_V^h) W_O^h.
The norm g that follows the cross block's residual is LN_c (post-LN) or the pre-FFN norm LN_f (pre-LN, where LN_c
only feeds the queries); in both structures g(y_i) is the FFN input.

Cross maps (target x source, rows i = target positions):
    cross_attn_w       mean_h alpha^h_ij                                            (T, S)   (+ per head)
    cross_attn_n       ||c_ij||                                                     (T, S)   (+ alpha^h_ij ||f_c^h(e_j)||)
    cross_attnres_n    ||c_ij||, and a last column ||p_i||                          (T, S + 1)
    cross_attnresln_n  ||g_i(c_ij)||, and a last column ||g_i(p_i)||                (T, S + 1)
g_i is the distributive split of g with the statistic of its whole real input y_i (b_Oc included); b_Oc and the norm's
shift are the row's bias term. The last column is what the target position keeps (never an alignment candidate).
Mixing ratio of the cross block: ||sum_j c_ij|| / (||sum_j c_ij|| + ||p_i||) (with g applied for the ln variant).

Decoder layers offer exactly attn_w, attnres_w, attn_n, attnres_n, attnresln_n (the self-attention block, through
kobattr.attribute on DecoderLayer.self_attn) and the cross maps above. attnresln_n splits the self-attention block
with its residual by the norm that follows that residual: LN_s in post-LN; in pre-LN LN_c, the cross-attention's
pre-norm, applied as a pre-LN encoder's attnresln_n applies the FFN's pre-norm LN2 (self_attn.ln2 is LN_c), so its
parts plus bias sum to LN_c(p_i), the cross-attention's query input.

The cross maps never build a (T, S, D) tensor: per source key j the Gram matrix G_j (H x H) of the vectors
f_c^h(e_j) (or of their norm split) gives ||sum_h alpha^h_ij f_c^h(e_j)||^2 = alpha_ij^T G_j alpha_ij, evaluated for
blocks of target rows; the row sums sum_j c_ij come from the model's own attention output (head_outputs).
:func:`cross_reference` is the slow materialising version every result is checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from torch import Tensor

from .core import _relative_error
from .layer import NORM_KINDS, AttentionShapes, FeedForward, Layer, LayerInputError, Norm, all_finite
from .methods import row_normalize, vector_ratio

DEFAULT_BUDGET = 1 << 23  # elements per intermediate, as the torch backend's


# ----------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class CrossMethod:
    """A cross-attention map: ``residual`` adds the last column ||p_i|| (what the target position keeps), ``norm``
    splits every part by the norm g after the cross block's residual."""

    name: str
    display: str
    paper: str  # a key of kobattr.methods.PAPERS
    kind: str  # "weights" or "vector"
    residual: bool = False
    norm: bool = False
    heads: bool = False  # per-head maps with heads=True
    default: bool = True


CROSS_METHODS: dict[str, CrossMethod] = {m.name: m for m in (
    CrossMethod("cross_attn_w", "CROSS-ATTN-W", "kobayashi2020", "weights", heads=True),
    CrossMethod("cross_attn_n", "CROSS-ATTN-N", "kobayashi2020", "vector", heads=True),
    CrossMethod("cross_attnres_n", "CROSS-ATTNRES-N", "kobayashi2020", "vector", residual=True),
    CrossMethod("cross_attnresln_n", "CROSS-ATTNRESLN-N", "kobayashi2020", "vector", residual=True, norm=True),
)}

# the self-attention methods a decoder layer offers, by its placement (spec section 7)
DECODER_SELF_METHODS = {
    "post": ("attn_w", "attnres_w", "attn_n", "attnres_n", "attnresln_n"),
    "pre": ("attn_w", "attnres_w", "attn_n", "attnres_n", "attnresln_n"),
}
PLACEMENTS = tuple(DECODER_SELF_METHODS)
# ALTI+ (Ferrando et al. 2022b, spec section 10): ALTI of the self-attention block (kobattr.attribute on self_attn) and
# of the cross block with its residual p_i as one more part (cross_alti, a (T, S + 1) map); asked for by name or "all"
CROSS_ALTI = "cross_alti"
DECODER_PEERS = ("alti", CROSS_ALTI)


def decoder_methods(placement: str) -> tuple[str, ...]:
    """Every method a decoder layer of this placement offers: its self-attention methods, the cross maps, then the
    peers' ALTI of both blocks."""
    if placement not in DECODER_SELF_METHODS:
        raise LayerInputError(f"a decoder layer's placement is one of {PLACEMENTS}, got {placement!r}.")
    return DECODER_SELF_METHODS[placement] + tuple(CROSS_METHODS) + DECODER_PEERS


def check_decoder_methods(methods, placement: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(self-attention methods, cross methods) of a request (None: the defaults, every method but the peers';
    "all"; a name or names); alti joins the self-attention methods, cross_alti the cross ones."""
    available = decoder_methods(placement)
    if methods is None:
        names = tuple(m for m in available if m not in DECODER_PEERS)
    elif isinstance(methods, str) and methods.strip().lower() == "all":
        names = available
    else:
        if isinstance(methods, str):
            methods = (methods,)
        if not isinstance(methods, (list, tuple)) or any(not isinstance(m, str) for m in methods):
            raise ValueError(f"methods must be a name, a list of names or 'all', got {methods!r}.")
        names = tuple(dict.fromkeys(m.strip().lower().replace("-", "_") for m in methods))
        if not names:
            raise ValueError("no methods requested; name at least one or ask for 'all'.")
        for m in names:
            if m not in available:
                raise ValueError(f"unknown method {m!r} for a {placement}-LN decoder layer; choose from "
                                 f"{', '.join(available)} or 'all'.")
    cross = tuple(m for m in names if m in CROSS_METHODS or m == CROSS_ALTI)
    return tuple(m for m in names if m not in cross), cross


# ----------------------------------------------------------------------------- inputs
@dataclass
class CrossAttention(AttentionShapes):
    """The cross-attention block of one decoder layer, as the model computed it.

    q: (B, H, T, Dh) queries (after any norm the queries read: LN_c in pre-LN models).
    k, v: (B, KV, S, Dh) keys and values from the encoder output e (b_V inside v); H % KV == 0.
    w_o: (H, Dh, D) the output projection per head; b_o: (D,) its bias b_Oc, optional.
    p: (B, T, D) the decoder stream entering the block, the residual (post-LN: LN_s(x + SelfAttn); pre-LN:
        x + SelfAttn).
    norm: g, the norm that reads y = p + CrossAttn (post-LN: LN_c; pre-LN: the pre-FFN norm LN_f).
    scale: the softmax scale (None: Dh ** -0.5).
    source_valid: (B, S) bool, False for source padding; target_valid: (B, T) bool, False for target padding
        (no attribution from a padding row). Every real target position sees every real source position.
    head_outputs: (B, H, T, Dh) optional, sum_j alpha^h_ij v_j as the model's attention computed it.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    w_o: Tensor
    p: Tensor
    norm: Norm
    b_o: Optional[Tensor] = None
    scale: Optional[float] = None
    source_valid: Optional[Tensor] = None
    target_valid: Optional[Tensor] = None
    head_outputs: Optional[Tensor] = None

    @property
    def target_len(self) -> int:
        return self.q.shape[2]

    @property
    def source_len(self) -> int:
        return self.k.shape[2]

    @property
    def d_model(self) -> int:
        return self.p.shape[-1]

    @property
    def sources(self) -> Tensor:
        """(B, S) bool source validity (all True without padding)."""
        if self.source_valid is None:
            return torch.ones(self.batch, self.source_len, dtype=torch.bool, device=self.q.device)
        return self.source_valid

    @property
    def targets(self) -> Tensor:
        """(B, T) bool target validity (all True without padding)."""
        if self.target_valid is None:
            return torch.ones(self.batch, self.target_len, dtype=torch.bool, device=self.q.device)
        return self.target_valid

    @property
    def out_bias(self) -> Tensor:
        return self.b_o if self.b_o is not None else self.p.new_zeros(self.d_model)

    def visible(self, rows: Optional[Tensor] = None) -> Tensor:
        """(B, R, S) bool: source j visible to target row i (both real); rows None = all T."""
        targets = self.targets if rows is None else self.targets[:, rows.to(self.q.device)]
        return targets[:, :, None] & self.sources[:, None, :]

    def validate(self) -> "CrossAttention":
        """Raise LayerInputError with a sentence naming the problem, or return self."""
        for name, t, nd in (("q", self.q, 4), ("k", self.k, 4), ("v", self.v, 4), ("w_o", self.w_o, 3), ("p", self.p, 3)):
            if not isinstance(t, Tensor):
                raise LayerInputError(f"cross.{name} must be a torch.Tensor, got {type(t).__name__}.")
            if t.dim() != nd or not t.is_floating_point():
                raise LayerInputError(f"cross.{name} must be a floating tensor with {nd} dimensions, got {t.dtype} "
                                      f"{tuple(t.shape)}.")
        B, H, T, Dh = self.q.shape
        KV, S = self.k.shape[1], self.k.shape[2]
        if B == 0 or T == 0 or S == 0:
            raise LayerInputError(f"cross-attention needs a batch, target and source tokens; got B={B}, T={T}, S={S}.")
        if self.k.shape != (B, KV, S, Dh) or self.v.shape != self.k.shape:
            raise LayerInputError(f"cross.k and cross.v must be (B, KV, S, Dh) = ({B}, KV, S, {Dh}) alike, got "
                                  f"{tuple(self.k.shape)} and {tuple(self.v.shape)}.")
        if KV == 0 or H % KV:
            raise LayerInputError(f"the number of query heads ({H}) must be a multiple of the number of key/value heads ({KV}).")
        D = self.p.shape[-1]
        if self.p.shape != (B, T, D):
            raise LayerInputError(f"cross.p must be (B, T, D) = ({B}, {T}, D), got {tuple(self.p.shape)}.")
        if self.w_o.shape != (H, Dh, D):
            raise LayerInputError(f"cross.w_o must be (H, Dh, D) = ({H}, {Dh}, {D}), got {tuple(self.w_o.shape)}.")
        tensors = (self.q, self.k, self.v, self.w_o, self.p)
        if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
            raise LayerInputError("cross.q, k, v, w_o and p must share one dtype and one device.")
        if not isinstance(self.norm, Norm) or self.norm.kind not in NORM_KINDS:
            raise LayerInputError(f"cross.norm must be a Norm with kind in {NORM_KINDS}.")
        for name, t, shape in (("b_o", self.b_o, (D,)), ("norm.weight", self.norm.weight, (D,)),
                               ("norm.bias", self.norm.bias, (D,))):
            if t is not None and (tuple(t.shape) != shape or t.device != self.p.device):
                raise LayerInputError(f"cross.{name} must have shape {shape} on {self.p.device}, got {tuple(t.shape)} on {t.device}.")
        for name, t, shape in (("source_valid", self.source_valid, (B, S)), ("target_valid", self.target_valid, (B, T))):
            if t is not None and (t.dtype != torch.bool or tuple(t.shape) != shape):
                raise LayerInputError(f"cross.{name} must be a bool tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}.")
        if self.head_outputs is not None and (not isinstance(self.head_outputs, Tensor)
                                              or self.head_outputs.shape != self.q.shape
                                              or not self.head_outputs.is_floating_point()):
            raise LayerInputError(f"cross.head_outputs must be a floating (B, H, T, Dh) = {tuple(self.q.shape)} tensor like q.")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise LayerInputError(f"cross.scale must be a finite positive number, got {self.scale}.")
        for f in fields(self):
            t = getattr(self, f.name)
            if isinstance(t, Tensor) and t.is_floating_point() and not all_finite(t):
                raise LayerInputError(f"cross.{f.name} contains NaN or inf values.")
        return self

    def to(self, dtype: Optional[torch.dtype] = None, device=None) -> "CrossAttention":
        """A copy with every floating tensor (also in the norm) moved / cast."""
        def cast(t):
            if isinstance(t, Tensor):
                return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)
            if isinstance(t, Norm):
                return replace(t, weight=cast(t.weight), bias=cast(t.bias))
            return t

        return replace(self, **{f.name: cast(getattr(self, f.name)) for f in fields(self)})

    def select(self, index: int) -> "CrossAttention":
        """The block of batch element ``index`` alone (batch dimension kept, of size 1)."""
        one = slice(index, index + 1)
        pick = lambda t: None if t is None else t[one]  # noqa: E731
        return replace(self, q=self.q[one], k=self.k[one], v=self.v[one], p=self.p[one],
                       source_valid=pick(self.source_valid), target_valid=pick(self.target_valid),
                       head_outputs=pick(self.head_outputs))

    def scores(self, rows: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """(B, H, R, S) the attention logits of the target rows ``rows`` (None: all), -inf where invisible."""
        dtype = dtype or self.q.dtype
        q = self.q if rows is None else self.q[:, :, rows.to(self.q.device)]
        B, H, R, Dh = q.shape
        KV = self.n_kv_heads
        scores = (q.to(dtype).reshape(B, KV, H // KV * R, Dh) @ self.k.to(dtype).transpose(-1, -2)).view(B, H, R, -1)
        return (scores * self.softmax_scale).masked_fill(~self.visible(rows)[:, None], float("-inf"))

    def alpha(self, rows: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """(B, H, R, S) the attention weights of the target rows ``rows`` (None: all), 0 where invisible."""
        return torch.softmax(self.scores(rows, dtype), -1).nan_to_num(0.0)

    def value_vectors(self, keys: slice = slice(None), dtype: Optional[torch.dtype] = None) -> Tensor:
        """f_c^h(e_j) = v_j W_O^h for the source positions ``keys``: (B, C, H, D)."""
        dtype = dtype or self.q.dtype
        v = self.v[:, :, keys].to(dtype).repeat_interleave(self.n_heads // self.n_kv_heads, 1)
        return torch.einsum("bhcd,hde->bche", v, self.w_o.to(dtype))

    def forward(self) -> dict:
        """An independent plain forward of the block from q, k and v: attn (CrossAttn, b_Oc included), y = p + attn,
        out = g(y)."""
        alpha = self.alpha()
        v = self.v.repeat_interleave(self.n_heads // self.n_kv_heads, 1)
        attn = torch.einsum("bhtd,hde->bte", alpha @ v, self.w_o) + self.out_bias
        y = self.p + attn
        return dict(attn=attn, y=y, out=self.norm(y))


@dataclass
class DecoderLayer:
    """One decoder layer of an encoder-decoder model (spec section 7; structures in the module docstring).

    self_attn: the self-attention block as a kobattr Layer (causal, target padding as key_valid; its head_outputs
        from the model's call). Only the attention-side methods of DECODER_SELF_METHODS are ever asked of it. Layer
        needs ln2 and an FFN to validate: post-LN: ln1 = LN_s, ln2 = LN_f (placeholder); pre-LN: ln1 = LN_s, ln2 = LN_c
        (so that Layer.forward()'s "mid" is the cross-attention's query input); its ffn is the decoder FFN. Its
        forward()'s "y" (x + SelfAttn) and "mid" are real states; "out" is not this layer's output.
    cross: the cross-attention block (p and g included).
    ffn, ln_self (LN_s), ln_cross (LN_c), ln_ffn (LN_f): the layer's FFN and norms, for the whole-layer map.
    placement: "post" (Marian, BART) or "pre" (M2M-100, NLLB, mBART).
    states: the model's own hidden states recorded during capture (B, T, D) each: self_y (x + SelfAttn), self_mid
        (self_attn.forward()'s mid), p, cross_y (y), cross_g (g(y), the FFN input) and out (the layer output).
    """

    self_attn: Layer
    cross: CrossAttention
    ffn: FeedForward
    ln_self: Norm
    ln_cross: Norm
    ln_ffn: Norm
    placement: str = "post"
    states: dict = field(default_factory=dict)

    @property
    def x(self) -> Tensor:
        return self.self_attn.x

    def validate(self) -> "DecoderLayer":
        if self.placement not in PLACEMENTS:
            raise LayerInputError(f"a decoder layer's placement is one of {PLACEMENTS}, got {self.placement!r}.")
        self.self_attn.validate()
        self.cross.validate()
        if not self.self_attn.causal:
            raise LayerInputError("a decoder layer's self-attention must be causal.")
        B, T, D = self.self_attn.x.shape
        if self.cross.p.shape != (B, T, D):
            raise LayerInputError(f"cross.p must be (B, T, D) = ({B}, {T}, {D}) like the layer input, got {tuple(self.cross.p.shape)}.")
        if not torch.equal(self.self_attn.valid, self.cross.targets):
            raise LayerInputError("the self-attention's key_valid and the cross-attention's target_valid must be the same "
                                  "target padding.")
        expected = self.ln_cross if self.placement == "post" else self.ln_ffn
        if not _same_norm(self.cross.norm, expected):
            raise LayerInputError("cross.norm must be the norm after the cross block's residual: ln_cross (LN_c) in a "
                                  "post-LN decoder, ln_ffn (LN_f) in a pre-LN one.")
        return self

    def to(self, dtype: Optional[torch.dtype] = None, device=None) -> "DecoderLayer":
        """A copy with every floating tensor (blocks, FFN, norms, states) moved / cast."""
        def cast_norm(norm):
            return replace(norm, weight=None if norm.weight is None else norm.weight.to(device=device, dtype=dtype),
                           bias=None if norm.bias is None else norm.bias.to(device=device, dtype=dtype))

        ffn = replace(self.ffn, **{f.name: getattr(self.ffn, f.name).to(device=device, dtype=dtype)
                                   for f in fields(self.ffn) if isinstance(getattr(self.ffn, f.name), Tensor)})
        return replace(self, self_attn=self.self_attn.to(dtype, device), cross=self.cross.to(dtype, device), ffn=ffn,
                       ln_self=cast_norm(self.ln_self), ln_cross=cast_norm(self.ln_cross), ln_ffn=cast_norm(self.ln_ffn),
                       states={k: v.to(device=device, dtype=dtype) for k, v in self.states.items()})

    def select(self, index: int) -> "DecoderLayer":
        """The layer of batch element ``index`` alone (batch dimension kept, of size 1)."""
        return replace(self, self_attn=self.self_attn.select(index), cross=self.cross.select(index),
                       states={k: v[index:index + 1] for k, v in self.states.items()})

    def forward(self) -> dict:
        """An independent plain forward of the layer from the captured q, k, v, weights and norms:
        self_y = x + SelfAttn, p (the stream entering the cross block), cross_attn, y = p + cross_attn, mid (the FFN
        input = g(y)), ffn_out (FF(mid)) and out (the layer output)."""
        states = self.self_attn.forward()
        self_y = states["y"]
        p = self.ln_self(self_y) if self.placement == "post" else self_y
        cross_attn = self.cross.forward()["attn"]
        y = p + cross_attn
        mid = self.cross.norm(y)
        ffn_out = self.ffn(mid)
        out = self.ln_ffn(mid + ffn_out) if self.placement == "post" else y + ffn_out
        return dict(self_y=self_y, p=p, cross_attn=cross_attn, y=y, mid=mid, ffn_out=ffn_out, out=out)


def _same_norm(a: Norm, b: Norm) -> bool:
    def same(s, t):
        return (s is None and t is None) or (s is not None and t is not None and s.shape == t.shape and torch.equal(s, t))

    return a is b or (a.kind == b.kind and a.eps == b.eps and same(a.weight, b.weight) and same(a.bias, b.bias))


# ----------------------------------------------------------------------------- results
@dataclass
class CrossAttribution:
    """The cross maps of one decoder layer (B batch, T target rows, S source columns, H heads).

    maps[m]          (B, T, S), or (B, T, S + 1) for cross_attnres_n / cross_attnresln_n / cross_alti (last column: p_i)
    head_maps[m]     (B, H, T, S) per head for cross_attn_w (alpha) and cross_attn_n (alpha ||f_c^h(e_j)||), heads=True
    ratios[m]        (B, T) cross-block mixing ratio for cross_attnres_n / cross_attnresln_n; for cross_alti the
                     sources' share 1 - C_i,S (NaN on padding rows)
    value_norms      (B, H, S) ||f_c^h(e_j)|| (0 on source padding)
    bias_norms[m]    (B, T) norm of what goes to no token (b_Oc; through g: g_i(b_Oc) + beta)
    completeness[m]  (B, T) ||sum of the parts + bias - real state|| / ||real state|| (y for cross_attnres_n, g(y) for
                     cross_attnresln_n; real: the ``targets`` given, else the block's own forward)
    model_error      (B, T) relative error of the block's y and g(y) from the captured tensors vs the targets
    spot_check[m]    (B,) largest relative error of the sampled rows vs cross_reference (verify > 0)
    placement        the decoder's placement ("post" / "pre"), which cross_alti depends on; None without cross_alti
    """

    methods: tuple
    maps: dict
    ratios: dict
    value_norms: Tensor
    bias_norms: dict
    completeness: dict
    model_error: Tensor
    head_maps: dict = field(default_factory=dict)
    spot_check: dict = field(default_factory=dict)
    placement: Optional[str] = None


@dataclass
class DecoderAttribution:
    """The maps of one decoder layer: the self-attention block's (a kobattr LayerAttribution, None when no
    self-attention method was asked for) and the cross maps (None when none was)."""

    methods: tuple
    self_attn: Optional[object]
    cross: Optional[CrossAttribution]

    def _merged(self, name: str) -> dict:
        merged = {}
        for part in (self.self_attn, self.cross):
            if part is not None:
                merged.update(getattr(part, name))
        return merged

    @property
    def maps(self) -> dict:
        return self._merged("maps")

    @property
    def head_maps(self) -> dict:
        return self._merged("head_maps")

    @property
    def ratios(self) -> dict:
        return self._merged("ratios")


# ----------------------------------------------------------------------------- the cross maps
def _check_cross_methods(methods, placement: Optional[str] = None) -> tuple[str, ...]:
    """The cross methods of a request (None or "all": every Kobayashi cross map, and cross_alti where the placement
    is known); cross_alti needs the placement (which state it decomposes)."""
    if placement is not None and placement not in PLACEMENTS:
        raise LayerInputError(f"a decoder layer's placement is one of {PLACEMENTS}, got {placement!r}.")
    if methods is None or (isinstance(methods, str) and methods.strip().lower() == "all"):
        return tuple(CROSS_METHODS) + ((CROSS_ALTI,) if placement is not None else ())
    names = (methods,) if isinstance(methods, str) else methods
    if not isinstance(names, (list, tuple)) or any(not isinstance(m, str) for m in names):
        raise ValueError(f"methods must be a cross method name, a list of them or 'all', got {methods!r}.")
    names = tuple(dict.fromkeys(m.strip().lower().replace("-", "_") for m in names))
    unknown = [m for m in names if m not in CROSS_METHODS and m != CROSS_ALTI]
    if unknown or not names:
        raise ValueError(f"unknown cross method {unknown[0] if unknown else None!r}; choose from "
                         f"{', '.join(CROSS_METHODS + (CROSS_ALTI,))} or 'all'.")
    if CROSS_ALTI in names and placement is None:
        raise LayerInputError("cross_alti decomposes y_i (pre-LN) or LN_c(y_i) (post-LN); pass placement='post' or 'pre'.")
    return names


def cross_alti_map(cross: CrossAttention, post: bool, norm: Norm, inv_s: Optional[Tensor], real: Tensor, dtype,
                   budget: int = DEFAULT_BUDGET) -> tuple[Tensor, Tensor, Tensor]:
    """ALTI of the cross block with its residual (ALTI+, Ferrando et al. 2022b): (map (B, T, S + 1), bias term
    (B, T, D), sum of the parts (B, T, D)), never a (T, S, D) tensor.

    The parts of row i are T_i(e_j) = g_i(c_ij) for each source j and T_i(p) = g_i(p_i), the residual, as column S;
    g_i is LN_c split with row i's statistic in a post-LN decoder (``post``, inv_s = 1 / s(y_i)) and the identity in a
    pre-LN one; ``real`` is the state they sum to with the bias term (post: LN_c(y_i), bias g_i(b_Oc) + beta; pre: y_i,
    bias b_Oc). c_ij = max(0, ||y||_1 - ||y - T_i||_1) against real, rows normalised to sum 1 over the S + 1 parts.
    As mt-upc/transformer-contributions-nmt@0af8538 wrappers/transformer_wrapper.py __get_contributions_module (the
    residual concatenated as one more value vector in the encoder attention; pre-LN raw parts against
    x + attention, post-LN the parts through the LN's centring and gamma over its std) and normalize_contrib
    'min_sum'. One difference: their std is torch's Bessel-corrected one of (y + eps), kobattr's the model's own
    LN statistic, so its parts sum to the model's LN_c output (theirs miss it by about 1 / (2 D) relative)."""
    B, H, T, _ = cross.q.shape
    S, D = cross.source_len, cross.d_model
    device = cross.q.device
    vis = cross.visible()  # (B, T, S)
    valid_t = cross.targets

    real = real.to(dtype)
    out = torch.zeros(B, T, S + 1, dtype=torch.float64, device=device)  # normalised in float64
    p = cross.p.to(dtype)
    parts = norm.split(p) * inv_s[..., None] if post else p.clone()  # the residual part, then the sum of every part
    b_o = cross.out_bias.to(dtype)
    bias = (norm.split(b_o) * inv_s[..., None] + norm.bias_vector(D, real)) if post else b_o.expand(B, T, D)
    # f_c^h(e_j) of every source (norm split: g is linear per row up to its scale), kept when it fits the budget
    cached = B * S * H * D <= 4 * budget
    split = norm.split if post else (lambda f: f)
    values = split(cross.value_vectors(slice(None), dtype)) if cached else None
    size = max(1, min(T, budget // max(1, B * H * S)))
    for start in range(0, T, size):
        rows = torch.arange(start, min(start + size, T), device=device)
        R = len(rows)
        alpha = cross.alpha(rows, dtype)  # (B, H, R, S)
        y_rows = real[:, rows]
        norm_y = y_rows.abs().sum(-1, dtype=torch.float64)  # the L1 sums in float64: ||y|| - ||y - T|| cancels
        # parts still holds the residual part alone for these rows (the tiles join it below)
        kept = (norm_y - (y_rows - parts[:, rows]).abs().sum(-1, dtype=torch.float64)).clamp_min(0)
        out[:, rows, S] = kept * valid_t[:, rows]
        step = max(1, min(S, budget // max(1, 4 * B * R * D)))
        for c0 in range(0, S, step):
            keys = slice(c0, min(c0 + step, S))
            f = values[:, keys] if cached else split(cross.value_vectors(keys, dtype))  # (B, C, H, D)
            tile = (alpha[..., keys].permute(0, 3, 2, 1) @ f).transpose(1, 2)  # (B, R, C, D): g(c_ij) unscaled
            if post:
                tile = tile * inv_s[:, rows, None, None]
            parts[:, rows] += tile.sum(2)
            dist = (y_rows[:, :, None] - tile).abs().sum(-1, dtype=torch.float64)
            out[:, rows, keys] = (norm_y[..., None] - dist).clamp_min(0) * vis[:, rows, keys]
    return row_normalize(out).to(dtype), bias, parts


def attribute_cross(cross: CrossAttention, methods=None, heads: bool = False, targets: Optional[dict] = None,
                    verify: int = 2, verify_seed: int = 0, budget: int = DEFAULT_BUDGET,
                    placement: Optional[str] = None) -> CrossAttribution:
    """The cross maps of one decoder layer's cross-attention block, without any (T, S, D) tensor.

    methods: names of CROSS_METHODS or cross_alti (None or "all": every one; cross_alti only with ``placement``, the
    decoder's "post" or "pre"). heads: per-head maps of cross_attn_w / cross_attn_n.
    targets: the model's real states {"y": (B, T, D) the input of g, "out": g(y)} that completeness is measured against
    (missing ones come from the block's plain forward). verify: target rows per batch element recomputed by
    cross_reference (0 disables); kobattr.VerificationError above the dtype's tolerance.
    """
    cross.validate()
    methods = _check_cross_methods(methods, placement)
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise LayerInputError(f"verify must be a number of sampled rows >= 0 (0 disables the spot check), got {verify!r}.")
    dtype = torch.float64 if cross.q.dtype == torch.float64 else torch.float32
    B, H, T, Dh = cross.q.shape
    S, D = cross.source_len, cross.d_model
    device = cross.q.device
    valid_t, valid_s = cross.targets, cross.sources
    norm = replace(cross.norm, weight=None if cross.norm.weight is None else cross.norm.weight.to(dtype),
                   bias=None if cross.norm.bias is None else cross.norm.bias.to(dtype))
    alti_post = CROSS_ALTI in methods and placement == "post"  # ALTI of the post-LN cross block goes through LN_c
    want_norm = alti_post or any(CROSS_METHODS[m].norm for m in methods if m in CROSS_METHODS)

    # per source position: Gram matrices of f_c^h(e_j) and of its norm split, (B, S, H, H) each, in key blocks
    grams = [torch.zeros(B, S, H, H, dtype=dtype, device=device) for _ in range(2 if want_norm else 1)]
    step = max(1, (1 << 22) // max(1, B * H * D))
    for start in range(0, S, step):
        keys = slice(start, min(start + step, S))
        f = cross.value_vectors(keys, dtype)  # (B, C, H, D)
        grams[0][:, keys] = f @ f.transpose(-1, -2)
        if want_norm:
            split = norm.split(f)
            grams[1][:, keys] = split @ split.transpose(-1, -2)
    value_norms = grams[0].diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().transpose(1, 2) * valid_s[:, None]  # (B, H, S)

    # the row sums: sum_j c_ij from the model's attention output, or recomputed
    w_o = cross.w_o.to(dtype)
    if cross.head_outputs is not None:
        heads_out = torch.where(valid_t[:, None, :, None], cross.head_outputs.to(dtype), 0.0)
    else:
        v = cross.v.to(dtype).repeat_interleave(H // cross.n_kv_heads, 1)
        heads_out = torch.empty(B, H, T, Dh, dtype=dtype, device=device)
        size = max(1, budget // max(1, B * H * S))
        for start in range(0, T, size):
            rows = torch.arange(start, min(start + size, T), device=device)
            heads_out[:, :, rows] = cross.alpha(rows, dtype) @ v
    c_sum = torch.einsum("bhtd,hde->bte", heads_out, w_o)  # (B, T, D)
    p, b_o = cross.p.to(dtype), cross.out_bias.to(dtype)
    y = p + c_sum + b_o
    inv_s = norm.inv_std(y) if want_norm else None

    # the maps, in blocks of target rows: alpha^T G_j alpha per (i, j)
    M = len(grams)
    g_all = torch.cat(grams, -1).reshape(B * S, H, M * H)  # per key one (H, M * H) matrix
    quads = torch.zeros(B, M, T, S, dtype=dtype, device=device)
    mean_alpha = torch.zeros(B, T, S, dtype=dtype, device=device) if "cross_attn_w" in methods else None
    want_heads = heads and any(CROSS_METHODS[m].heads for m in methods if m in CROSS_METHODS)
    alphas = torch.zeros(B, H, T, S, dtype=dtype, device=device) if want_heads else None
    size = max(1, min(T, budget // max(1, B * S * H * M)))
    for start in range(0, T, size):
        rows = torch.arange(start, min(start + size, T), device=device)
        alpha = cross.alpha(rows, dtype)  # (B, H, R, S)
        R = len(rows)
        a = alpha.permute(0, 3, 2, 1).reshape(B * S, R, H)
        ga = torch.bmm(a, g_all).view(B, S, R, M, H)
        quads[:, :, rows] = (ga * a.view(B, S, R, 1, H)).sum(-1).permute(0, 3, 2, 1)
        if mean_alpha is not None:
            mean_alpha[:, rows] = alpha.mean(1)
        if alphas is not None:
            alphas[:, :, rows] = alpha
    vis = cross.visible()
    norms = quads.clamp_min(0).sqrt() * vis[:, None]  # (B, M, T, S)

    real_y = y if targets is None or "y" not in targets else targets["y"].to(dtype)
    real_out = None
    if want_norm or (targets and "out" in targets):
        real_out = norm(y) if targets is None or "out" not in targets else targets["out"].to(dtype)
    model_error = torch.zeros(B, T, dtype=dtype, device=device)
    if targets:
        model_error = torch.maximum(model_error, _relative_error(y, real_y, valid_t))
        if "out" in targets:
            model_error = torch.maximum(model_error, _relative_error(norm(y), real_out, valid_t))

    nan_pad = torch.where(valid_t, 0.0, float("nan")).to(dtype)
    rowmask = valid_t.to(dtype)
    maps, ratios, bias_norms, completeness, head_maps = {}, {}, {}, {}, {}
    for m in methods:
        if m == CROSS_ALTI:
            real = real_out if alti_post else real_y
            maps[m], bias, parts = cross_alti_map(cross, alti_post, norm, inv_s, real, dtype, budget)
            ratios[m] = torch.where(maps[m].sum(-1) > 0, 1 - maps[m][..., -1], 0.0) + nan_pad
            bias_norms[m] = bias.norm(dim=-1) * rowmask
            completeness[m] = _relative_error(parts + bias, real, valid_t)
            continue
        spec = CROSS_METHODS[m]
        if spec.kind == "weights":
            maps[m] = mean_alpha
            if want_heads:
                head_maps[m] = alphas
            continue
        if spec.norm:
            s = inv_s[..., None]
            c, keep, bias = norm.split(c_sum) * s, norm.split(p) * s, norm.split(b_o) * s + norm.bias_vector(D, y)
            pairs, real = norms[:, 1] * inv_s[..., None], real_out
        else:
            c, keep, bias, pairs, real = c_sum, p, b_o.expand_as(y), norms[:, 0], real_y
        if spec.residual:
            maps[m] = torch.cat([pairs, (keep.norm(dim=-1) * rowmask)[..., None]], -1)
            ratios[m] = vector_ratio(c, keep) + nan_pad
            completeness[m] = _relative_error(c + keep + bias, real, valid_t)
        else:
            maps[m] = pairs
            if want_heads:
                head_maps[m] = alphas * value_norms[:, :, None, :]
        bias_norms[m] = bias.norm(dim=-1) * rowmask
    result = CrossAttribution(methods=methods, maps=maps, ratios=ratios, value_norms=value_norms, bias_norms=bias_norms,
                              completeness=completeness, model_error=model_error, head_maps=head_maps,
                              placement=placement if CROSS_ALTI in methods else None)
    if verify:
        result.spot_check = _spot_check(cross, result, verify, verify_seed)
    return result


def _spot_check(cross: CrossAttention, result: CrossAttribution, k: int, seed: int) -> dict:
    """{method: (B,) error} of ``k`` sampled real target rows per batch element against cross_reference (float64 for
    float64 blocks, float32 otherwise; computed with the model's attention output where the block has it, which is
    checked itself as kobattr.verify checks a layer's); VerificationError above the dtype's tolerance."""
    from .verify import VerificationError, row_errors, sample_rows, tolerance, verify_head_outputs

    B, T = cross.batch, cross.target_len
    reference_dtype = torch.float64 if cross.q.dtype == torch.float64 else torch.float32
    errors = {m: torch.zeros(B, dtype=torch.float64) for m in result.methods}
    samples = []
    everything = torch.arange(T, device=cross.q.device)
    for b in range(B):
        rows = everything[sample_rows(everything, cross.targets[b], k, seed * 1_000_003 + b).to(cross.q.device)]
        samples.append(rows)
        one = cross.select(b).to(reference_dtype)
        attention_output = None
        if one.head_outputs is not None:
            verify_head_outputs(one.head_outputs[:, :, rows], one.scores(rows), one.v, cross.q.dtype,
                                f"batch element {b}, sampled target rows {rows.tolist()} of the cross-attention")
            attention_output = torch.einsum("bhrd,hde->bre", one.head_outputs[:, :, rows], one.w_o)
        ref = cross_reference(one, result.methods, dtype=reference_dtype, rows=rows, attention_output=attention_output,
                              placement=result.placement)
        for m in result.methods:
            err = row_errors(result.maps[m][b, rows], ref["maps"][m][0].to(cross.q.device)).max()
            if m in result.head_maps:
                err = torch.maximum(err, row_errors(result.head_maps[m][b][:, rows],
                                                    ref["head_maps"][m][0].to(cross.q.device)).max())
            errors[m][b] = err.item()
    tol = tolerance(cross.q.dtype)
    for m, err in errors.items():
        worst = int(err.argmax())
        if not err[worst] <= tol:
            raise VerificationError(f"spot check failed: {m} differs from cross_reference by {err[worst]:.2e} (relative) on "
                                    f"batch element {worst}, sampled target rows {samples[worst].tolist()}; the tolerance "
                                    f"for {str(cross.q.dtype).replace('torch.', '')} is {tol:.0e}.")
    return errors


def cross_reference(cross: CrossAttention, methods=None, dtype: torch.dtype = torch.float64,
                    rows: Optional[Tensor] = None, attention_output: Optional[Tensor] = None,
                    placement: Optional[str] = None) -> dict:
    """The cross maps, materialised: builds the (B, R, S, D) pair vectors c_ij explicitly (small inputs only).
    cross_alti (with ``placement``) comes from kobattr.reference.cross_alti_reference.
    ``attention_output`` (B, R, D): sum_h o^h_i W_O^h of the rows from the model's own head outputs (b_Oc excluded),
    which y_i (g's statistic) then reads instead of sum_j c_ij, as attribute_cross does (its spot checks).

    Returns a dict (R = T without ``rows``):
      maps[m]       (B, R, S) or (B, R, S + 1) (0 where j is padding or i is)
      head_maps[m]  (B, H, R, S) for cross_attn_w (alpha) and cross_attn_n (alpha ||f_c^h(e_j)||)
      ratios[m]     (B, R) cross-block mixing ratio of the residual methods (NaN on padding rows)
      bias[m]       (B, R, D) the part of row i that goes to no token (vector methods)
      total[m]      (B, R, D) the sum of row i's parts plus its bias: y_i, or g(y_i) for cross_attnresln_n
      alpha         (B, H, R, S); value_norms (B, H, S); y, out (B, R, D) the block's y and g(y)
    """
    methods = _check_cross_methods(methods, placement)
    L = cross.validate().to(dtype)
    B, H, T, Dh = L.q.shape
    S, D = L.source_len, L.d_model
    rows = torch.arange(T, device=L.q.device) if rows is None else torch.as_tensor(rows, device=L.q.device).long()
    if B * len(rows) * S * D > 1 << 31:
        raise LayerInputError(f"cross_reference materialises (B, R, S, D) = ({B}, {len(rows)}, {S}, {D}) tensors, too large; "
                              "use attribute_cross, which never builds them.")
    valid = L.targets[:, rows]
    alpha = L.alpha(rows)  # (B, H, R, S), 0 where invisible
    f = L.value_vectors()  # (B, S, H, D): f_c^h(e_j)
    c = torch.einsum("bhrs,bshd->brsd", alpha, f)  # c_ij = sum_h alpha^h_ij f_c^h(e_j)
    p = L.p[:, rows]
    b_o = L.out_bias
    y = p + (c.sum(2) if attention_output is None else attention_output) + b_o
    g = L.norm
    inv_s = g.inv_std(y)[..., None]  # the statistic of the whole real input y_i
    gc = g.split(c) * inv_s[..., None]
    gp = g.split(p) * inv_s
    gb = g.split(b_o) * inv_s + g.bias_vector(D, y)
    rowmask = valid[..., None].to(dtype)
    nan_pad = torch.where(valid, 0.0, float("nan")).to(dtype)
    value_norms = f.norm(dim=-1).transpose(1, 2) * L.sources[:, None].to(dtype)  # (B, H, S)
    out = dict(maps={}, head_maps={}, ratios={}, bias={}, total={}, alpha=alpha, value_norms=value_norms, y=y, out=g(y))
    for m in methods:
        if m == CROSS_ALTI:
            from .reference import cross_alti_reference

            alti = cross_alti_reference(L, placement, dtype, rows, attention_output)
            out["maps"][m], out["total"][m] = alti["map"], alti["total"] * rowmask
            out["bias"][m] = alti["bias"] * rowmask
            continue
        spec = CROSS_METHODS[m]
        if spec.kind == "weights":
            out["maps"][m] = alpha.mean(1)
            out["head_maps"][m] = alpha
            continue
        vec, keep, bias = (gc, gp, gb) if spec.norm else (c, p, b_o.expand_as(y))
        if spec.residual:
            out["maps"][m] = torch.cat([vec.norm(dim=-1), keep.norm(dim=-1)[..., None] * rowmask], -1)
            out["ratios"][m] = vector_ratio(vec.sum(2), keep) + nan_pad
        else:
            out["maps"][m] = vec.norm(dim=-1)
            out["head_maps"][m] = alpha * value_norms[:, :, None, :]
        out["bias"][m] = bias * rowmask
        out["total"][m] = (vec.sum(2) + keep + bias) * rowmask if spec.residual else (vec.sum(2) + bias) * rowmask
    return out


# ----------------------------------------------------------------------------- a decoder layer
def attribute_decoder(layer: DecoderLayer, methods=None, heads: bool = False, backend="auto", verify: int = 2,
                      verify_seed: int = 0, budget: int = DEFAULT_BUDGET) -> DecoderAttribution:
    """The maps of one decoder layer: the self-attention methods (kobattr.attribute on layer.self_attn, with the model's
    own self_y / self_mid states as targets where capture recorded them) and the cross maps (attribute_cross, targets
    cross_y / cross_g). methods: names of decoder_methods(layer.placement) (None or "all": every one)."""
    layer.validate()
    self_methods, cross_methods = check_decoder_methods(methods, layer.placement)
    states = layer.states or {}
    self_result = cross_result = None
    if self_methods:
        from .core import attribute

        targets = {key: states[name] for key, name in (("y", "self_y"), ("mid", "self_mid")) if name in states}
        self_result = attribute(layer.self_attn, methods=self_methods, heads=heads, backend=backend,
                                targets=targets or None, verify=verify, verify_seed=verify_seed)
    if cross_methods:
        targets = {key: states[name] for key, name in (("y", "cross_y"), ("out", "cross_g")) if name in states}
        cross_result = attribute_cross(layer.cross, cross_methods, heads=heads, targets=targets or None, verify=verify,
                                       verify_seed=verify_seed, budget=budget, placement=layer.placement)
    return DecoderAttribution(methods=self_methods + cross_methods, self_attn=self_result, cross=cross_result)
