"""The whole decoder layer as one map (spec section 7, last item): the output out_i of a decoder layer split over the
target-prefix tokens k (through the self-attention and its residual) AND the source tokens j (through the
cross-attention), through every norm on the stream, the FFN (Integrated Gradients) and the last residual.

A row of the map has T + S columns, target columns first: column k < T is target token k, column T + j is source
token j. The per-column vectors plus the row's bias term sum exactly to the layer output (completeness).

Chains (target position i; x the layer input, e_j the encoder output, never decomposed further):

    post-LN (Marian, BART)
        x1_i  = LN_s(x_i + sum_k sum_h alpha^h_ik f^h(x_k) + b_O)                       scope "self"    (= p_i)
        y_i   = x1_i + sum_j sum_h a^h_ij f_c^h(e_j) + b_Oc                              scope "cross"   (= y_i)
        x2_i  = LN_c(y_i)                                                                 scope "ffn_in"  (= FFN input)
        FF(x2_i)                                                                          scope "ffn"
        x2_i + FF(x2_i)                                                                   scope "ffn_res"
        out_i = LN_f(x2_i + FF(x2_i))                                                     scope "out"
    pre-LN (mBART, M2M-100, NLLB; as transformers' M2M100DecoderLayer / MBartDecoderLayer)
        h_i   = x_i + sum_k sum_h alpha^h_ik f^h(LN_s(x_k)) + b_O                        scope "self"    (= p_i)
        y_i   = h_i + sum_j sum_h a^h_ij f_c^h(e_j) + b_Oc  (queries from LN_c(h_i))     scope "cross"   (= y_i)
        LN_f(y_i)                                                                         scope "ffn_in"  (= FFN input)
        FF(LN_f(y_i))                                                                     scope "ffn"
        out_i = y_i + FF(LN_f(y_i))                                                       scope "out"

with f^h(z) = (z W_V^h + b_V^h) W_O^h of the self-attention (LN_s inside it in pre-LN, shift included: the value
states are the model's) and f_c^h of the cross-attention. alpha and a are taken as given (the queries, also the
cross-attention's LN_c(h_i) in pre-LN, are not decomposed).

The general rule (spec section 6) at every step:
  * the self-attention part of target column k is sum_h alpha^h_ik f^h(.)_k, plus the residual x_i wholly in
    column k = i; the cross part of source column j is sum_h a^h_ij f_c^h(e_j); the cross block's residual adds the
    stream's own decomposition (the target columns as they are at scope "self"; source columns 0 there);
  * a norm is split by the distributive law, g_i(z) = split(z) / s(whole real input of row i): centring (LayerNorm)
    and gamma per part, one statistic per row from the whole input (every part and every bias included);
  * the FFN is split by IG on its split input (kobattr.ig.ffn_coefficients of the FFN's real input row): the share
    of a part z is ((z W_in) * coef_in + (z W_gate) * coef_gate) W_out; the bias part (everything that depends on no
    token) is carried through and takes b_in / b_gate before the coefficients and b_out after;
  * what depends on no token (b_O, b_Oc, every norm's shift, the norms' splits of bias parts, the FFN bias part) is
    the row's bias term.

Context-mixing ratio of a row i at a scope: r_i = ||c_i|| / (||c_i|| + ||o_i||), where o_i is the vector of the row's
own column (target column i) and c_i = sum of every other column's vector (the other target columns AND all source
columns); norms of summed vectors, the bias term excluded (0 when both norms are 0, NaN on padding rows).

:func:`decoder_layer_reference` materialises every (B, R, T + S, D) vector step by step (small inputs, or a few rows);
:func:`attribute_decoder_layer` never builds them for all rows at once: per block of target rows it forms the
per-column vectors from per-key pieces that already went through the row-independent parts of the chain (centring,
gamma, W_in / W_gate), applies the rows' norm scales and IG coefficients and reduces to norms, in memory
O(block x (T + S) x max(F, D)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .core import _cast_ffn, _cast_norm, _relative_error, check_rows
from .ig import _check_method, ffn_coefficients
from .layer import Layer, LayerInputError, cap_logits, head_vectors
from .methods import vector_ratio
from .seq2seq import DecoderLayer

# the scopes of each placement, in chain order; the last ("out") sums to the layer output
SCOPES = {
    "post": ("self", "cross", "ffn_in", "ffn", "ffn_res", "out"),
    "pre": ("self", "cross", "ffn_in", "ffn", "out"),
}
# the DecoderLayer.forward() state each scope's parts plus bias sum to (ffn_res: mid + ffn_out, post-LN only), and the
# capture state recording it
SCOPE_STATES = {"self": "p", "cross": "y", "ffn_in": "mid", "ffn": "ffn_out", "ffn_res": "ffn_res", "out": "out"}
RECORDED = {"p": "p", "y": "cross_y", "mid": "cross_g", "out": "out"}  # forward() key -> DecoderLayer.states key
MAX_PAIR_ELEMENTS = 1 << 31  # the reference's (B, R, T + S, max(D, F)) tensors above this would not fit
DEFAULT_BUDGET = 1 << 25  # elements of the per-block temporaries of attribute_decoder_layer


@dataclass
class DecoderLayerAttribution:
    """The whole-decoder-layer map of one decoder layer (B batch, R target rows: T without ``rows``, T target and S
    source columns; scopes: SCOPES[placement], the last is "out").

    maps[scope]          (B, R, T + S) ||per-column vector|| (target columns first); 0 in padding columns and rows
    bias_norms[scope]    (B, R) ||bias term|| (0 on padding rows)
    ratios[scope]        (B, R) context-mixing ratio ||c_i|| / (||c_i|| + ||o_i||), o_i the own column (target
                         column i), c_i the sum of all other columns, target and source (NaN on padding rows)
    completeness[scope]  (B, R) ||sum of the column vectors + bias - real state|| / ||real state|| (0 on padding
                         rows); real: layer.states where capture recorded the state (p, cross_y, cross_g, out), else
                         the layer's own forward (DecoderLayer.forward)
    model_error          (B, R) largest relative error of the layer's own forward vs the recorded states (0 without)
    map, ratio, bias_norm: the "out" scope's; target_columns(scope) / source_columns(scope): the two parts of a map.
    """

    placement: str
    scopes: tuple
    maps: dict
    bias_norms: dict
    ratios: dict
    completeness: dict
    model_error: Tensor
    target_len: int
    source_len: int
    rows: Optional[Tensor] = None
    ig: str = "exact"

    @property
    def map(self) -> Tensor:
        return self.maps["out"]

    @property
    def ratio(self) -> Tensor:
        return self.ratios["out"]

    @property
    def bias_norm(self) -> Tensor:
        return self.bias_norms["out"]

    def target_columns(self, scope: str = "out") -> Tensor:
        """(B, R, T) the target-prefix columns of a scope's map."""
        return self.maps[scope][..., :self.target_len]

    def source_columns(self, scope: str = "out") -> Tensor:
        """(B, R, S) the source columns of a scope's map."""
        return self.maps[scope][..., self.target_len:]


# ----------------------------------------------------------------------------- shared pieces
def _self_alpha(sa: Layer, rows: Tensor, dtype) -> Tensor:
    """(B, H, R, T) the self-attention weights of the target rows ``rows`` (0 where invisible)."""
    group = sa.n_heads // sa.n_kv_heads
    k = sa.k.to(dtype).repeat_interleave(group, 1)
    scores = cap_logits((sa.q[:, :, rows].to(dtype) @ k.transpose(-1, -2)) * sa.softmax_scale, sa.softcap)
    scores = scores.masked_fill(~sa.visible(rows)[:, None], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0)


def _check_ig(ig, ig_steps) -> None:
    try:
        _check_method(ig, ig_steps)
    except ValueError as err:
        raise LayerInputError(str(err)) from None


def _rows(rows, n: int, device) -> Tensor:
    checked = check_rows(rows, n, device)
    return torch.arange(n, device=device) if checked is None else checked


# ----------------------------------------------------------------------------- the reference
def decoder_layer_reference(layer: DecoderLayer, dtype: torch.dtype = torch.float64, rows=None, ig: str = "exact",
                            ig_steps: int = 20) -> dict:
    """The whole-decoder-layer map, materialised step by step exactly as the module docstring writes the chain
    (slow, obvious: (B, R, T + S, D) vectors per scope; small inputs or a few rows only).

    Returns a dict (R = T without ``rows``; scopes = SCOPES[layer.placement]):
      scopes           the scope names in chain order
      vectors[scope]   (B, R, T + S, D) the per-column vectors (target columns first)
      maps[scope]      (B, R, T + S) their norms (0 in padding columns and on padding rows)
      bias[scope]      (B, R, D) the row's bias term
      total[scope]     (B, R, D) sum of the vectors + bias (the scope's hidden state, see SCOPE_STATES)
      ratios[scope]    (B, R) context-mixing ratio (own column: target column i; NaN on padding rows)
      parts            (B, R, T + S, D) the first-stage parts: sum_h alpha^h_ik f^h(.)_k + [i == k] x_i (target),
                       sum_h a^h_ij f_c^h(e_j) (source), before any norm
      alpha_self       (B, Hs, R, T); alpha_cross (B, Hc, R, S); rows (R,)
      map, ratio       the "out" scope's
    Padding rows are zeroed in vectors, maps, bias and total.
    """
    L = layer.validate().to(dtype)
    _check_ig(ig, ig_steps)
    sa, cr = L.self_attn, L.cross
    B, T, D = sa.x.shape
    S = cr.source_len
    F = L.ffn.w_in.shape[1]
    device = sa.x.device
    rows = _rows(rows, T, device)
    R = len(rows)
    if B * R * (T + S) * max(D, F) > MAX_PAIR_ELEMENTS:
        raise LayerInputError(f"decoder_layer_reference materialises (B, R, T + S, max(D, F)) = ({B}, {R}, {T + S}, "
                              f"{max(D, F)}) tensors, too large; use attribute_decoder_layer, or fewer rows=.")
    row_valid = sa.valid[:, rows]  # (B, R)

    # the self-attention part of target column k: sum_h alpha^h_ik f^h(.)_k, plus the residual x_i in column k = i
    alpha = _self_alpha(sa, rows, dtype)  # (B, Hs, R, T)
    f = head_vectors(sa, slice(None), dtype)  # (B, T, Hs, D): f^h of every target token (v is the model's)
    u = torch.einsum("bhrk,bkhe->brke", alpha, f)
    own = (rows[:, None] == torch.arange(T, device=device)[None])[None] & row_valid[:, :, None]  # (B, R, T)
    u = u + own[..., None].to(dtype) * sa.x[:, None]  # x_k at k == i only, i.e. x_i in column i
    # the cross part of source column j: sum_h a^h_ij f_c^h(e_j)
    a = cr.alpha(rows, dtype)  # (B, Hc, R, S)
    c = torch.einsum("bhrs,bshe->brse", a, cr.value_vectors(dtype=dtype))
    zeros_t, zeros_s = torch.zeros_like(u), torch.zeros_like(c)

    def split(norm, vec, bias, whole=None):
        """A norm's distributive split: each part centred (LayerNorm) and scaled by gamma, all parts divided by the
        statistic of the norm's whole real input ``whole`` (default: the parts plus the bias), the shift added to the
        bias."""
        whole = vec.sum(2) + bias if whole is None else whole
        inv = norm.inv_std(whole)[..., None]  # (B, R, 1)
        return norm.split(vec) * inv[..., None], norm.split(bias) * inv + norm.bias_vector(D, whole)

    scopes: dict = {}
    post = L.placement == "post"
    # the self block: its residual x_i and the self-attention parts; b_O to the bias
    vec, bias = torch.cat([u, zeros_s], 2), sa.out_bias.expand(B, R, D)
    if post:
        vec, bias = split(L.ln_self, vec, bias)  # x1_i = LN_s(...)
    scopes["self"] = vec, bias
    # the cross block: its residual is the stream's own decomposition; the source parts; b_Oc to the bias
    vec, bias = vec + torch.cat([zeros_t, c], 2), bias + cr.out_bias
    scopes["cross"] = vec, bias
    # the FFN input: LN_c(y) (post) or LN_f(y) (pre)
    ffn_in, ffn_in_bias = split(L.ln_cross if post else L.ln_ffn, vec, bias)
    scopes["ffn_in"] = ffn_in, ffn_in_bias
    ff, ff_bias = _ffn_split(L.ffn, ffn_in, ffn_in_bias, ig, ig_steps)
    scopes["ffn"] = ff, ff_bias
    if post:  # out = LN_f(x2 + FF(x2))
        res, res_bias = ffn_in + ff, ffn_in_bias + ff_bias
        scopes["ffn_res"] = res, res_bias
        # LN_f's real input is x2 + FF(x2) with the real FFN output (the shares sum to it exactly with the exact IG,
        # approximately with the Riemann option)
        real_mid = ffn_in.sum(2) + ffn_in_bias
        scopes["out"] = split(L.ln_ffn, res, res_bias, whole=real_mid + L.ffn(real_mid))
    else:  # out = y + FF(LN_f(y))
        scopes["out"] = vec + ff, bias + ff_bias

    rowmask = row_valid[..., None].to(dtype)
    nan_pad = torch.where(row_valid, 0.0, float("nan")).to(dtype)
    out = dict(scopes=SCOPES[L.placement], vectors={}, maps={}, bias={}, total={}, ratios={}, rows=rows,
               parts=torch.cat([u, c], 2) * rowmask[..., None], alpha_self=alpha, alpha_cross=a)
    diagonal = (slice(None), torch.arange(R, device=device), rows)  # the own column of each returned row
    for name in SCOPES[L.placement]:
        vec, bias = scopes[name]
        vec = vec * rowmask[..., None]
        out["vectors"][name] = vec
        out["maps"][name] = vec.norm(dim=-1)
        out["bias"][name] = bias * rowmask
        out["total"][name] = (vec.sum(2) + bias) * rowmask
        own_vec = vec[diagonal]  # (B, R, D)
        out["ratios"][name] = vector_ratio(vec.sum(2) - own_vec, own_vec) + nan_pad
    out["map"], out["ratio"] = out["maps"]["out"], out["ratios"]["out"]
    return out


def _ffn_split(ffn, vec: Tensor, bias: Tensor, ig: str, ig_steps: int) -> tuple[Tensor, Tensor]:
    """(shares (B, R, C, D), bias share (B, R, D)) of the FFN by IG on its split input vec (B, R, C, D) + bias
    (B, R, D): the coefficients of each row come from the row's real FFN input (the sum of its parts); one row at a
    time, never (B, R, C, F)."""
    z = vec.sum(2) + bias  # the FFN's real input rows
    coef_in, coef_gate = ffn_coefficients(ffn, z, ig, ig_steps)  # (B, R, F)

    def share(part, r):
        hidden = (part @ ffn.w_in) * coef_in[:, r, None]
        if coef_gate is not None:
            hidden = hidden + (part @ ffn.w_gate) * coef_gate[:, r, None]
        return hidden @ ffn.w_out

    shares = torch.stack([share(vec[:, r], r) for r in range(vec.shape[1])], 1)
    zeros_f = z.new_zeros(ffn.w_in.shape[1])
    hidden = (bias @ ffn.w_in + (ffn.b_in if ffn.b_in is not None else zeros_f)) * coef_in
    if coef_gate is not None:
        hidden = hidden + (bias @ ffn.w_gate + (ffn.b_gate if ffn.b_gate is not None else zeros_f)) * coef_gate
    bias_share = hidden @ ffn.w_out
    if ffn.b_out is not None:
        bias_share = bias_share + ffn.b_out
    return shares, bias_share


# ----------------------------------------------------------------------------- the blocked implementation
def attribute_decoder_layer(layer: DecoderLayer, rows=None, ig: str = "exact", ig_steps: int = 20,
                            budget: int = DEFAULT_BUDGET) -> DecoderLayerAttribution:
    """The whole-decoder-layer map (module docstring) of every scope, without materialising (B, T, T + S, D).

    rows: target rows to return (None: all T). ig: "exact" (default) or "riemann" with ig_steps steps.
    budget: elements of the per-block temporaries; the target rows go in blocks of
    max(1, budget // (B (T + S) (3 F + 8 D))) rows. Computes in float64 for a float64 layer, float32 otherwise.

    Per block of target rows: alpha and a from q and k; the rows' real hidden states from the attention outputs
    (alpha v W_O, no pairs), hence every norm's statistic and the IG coefficients; then each column's vector as
    kappa_ic . (per-key pieces) times the row's scales, where the per-key pieces are [f^h(.)_k for h, x_k] (target)
    and [f_c^h(e_j) for h] (source), already centred / scaled by gamma for the norms that precede, and projected by
    W_in (and W_gate) for the FFN; kappa_ik = (alpha^1_ik .. alpha^H_ik, [i == k]) and kappa_ij = (a^1_ij .. a^H_ij).
    Returns a DecoderLayerAttribution.
    """
    layer.validate()
    _check_ig(ig, ig_steps)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise LayerInputError(f"budget must be a positive number of elements, got {budget!r}.")
    dtype = torch.float64 if layer.x.dtype == torch.float64 else torch.float32
    sa, cr = layer.self_attn, layer.cross
    B, T, D = sa.x.shape
    S = cr.source_len
    device = sa.x.device
    post = layer.placement == "post"
    rows_given = rows is not None
    rows = _rows(rows, T, device)
    R = len(rows)
    ln_s, ln_c, ln_f = (_cast_norm(n, dtype) for n in (layer.ln_self, layer.ln_cross, layer.ln_ffn))
    g = ln_c if post else ln_f  # the norm after the cross block's residual: it makes the FFN input
    ffn = _cast_ffn(layer.ffn, dtype)
    F = ffn.w_in.shape[1]
    gated = ffn.gated
    x = sa.x.to(dtype)
    b_o, b_oc = sa.out_bias.to(dtype), cr.out_bias.to(dtype)
    valid_t = sa.valid

    # per-key pieces through the row-independent parts of the chain
    f_self = head_vectors(sa, slice(None), dtype)  # (B, T, Hs, D)
    stream_t = torch.cat([f_self, x[:, :, None]], 2)  # (B, T, Hs + 1, D): [f^h(.)_k for h, x_k]
    if post:
        stream_t = ln_s.split(stream_t)  # in the stream after LN_s (row scale 1 / s_s(i))
    stream_c = cr.value_vectors(dtype=dtype)  # (B, S, Hc, D): f_c^h(e_j)
    in_t, in_c = g.split(stream_t), g.split(stream_c)  # the FFN input pieces (row scale 1 / s_g(i), times 1 / s_s(i))
    up_t, up_c = in_t @ ffn.w_in, in_c @ ffn.w_in  # (B, T, Hs + 1, F), (B, S, Hc, F)
    gate_t, gate_c = (in_t @ ffn.w_gate, in_c @ ffn.w_gate) if gated else (None, None)

    # the model's recorded states (rows gathered per block), else the layer's own forward
    recorded = {key: layer.states[name].to(dtype) for key, name in RECORDED.items() if name in (layer.states or {})}

    scopes = SCOPES[layer.placement]
    maps = {s: torch.zeros(B, R, T + S, dtype=dtype, device=device) for s in scopes}
    bias_norms = {s: torch.zeros(B, R, dtype=dtype, device=device) for s in scopes}
    ratios = {s: torch.zeros(B, R, dtype=dtype, device=device) for s in scopes}
    completeness = {s: torch.zeros(B, R, dtype=dtype, device=device) for s in scopes}
    model_error = torch.zeros(B, R, dtype=dtype, device=device)

    size = max(1, min(R, budget // max(1, B * (T + S) * (3 * F + 8 * D))))
    keys_t = torch.arange(T, device=device)
    for start in range(0, R, size):
        block = slice(start, min(start + size, R))
        r = rows[block]
        n = len(r)
        rv = valid_t[:, r]  # (B, n)
        alpha = _self_alpha(sa, r, dtype)  # (B, Hs, n, T)
        a = cr.alpha(r, dtype)  # (B, Hc, n, S)

        # the rows' real hidden states (no pairs): the attention outputs from alpha v W_O
        self_attn = _attention_rows(alpha, sa.v, sa.w_o, dtype) + b_o  # (B, n, D)
        cross_attn = _attention_rows(a, cr.v, cr.w_o, dtype) + b_oc
        if post:
            self_in = x[:, r] + self_attn
            s_s = ln_s.inv_std(self_in)
            p = ln_s(self_in)
        else:
            p = x[:, r] + self_attn
        y = p + cross_attn
        s_g = g.inv_std(y)
        mid = g(y)
        coef_in, coef_gate = ffn_coefficients(ffn, mid, ig, ig_steps)  # (B, n, F)
        ffn_out = ffn(mid)
        states = dict(p=p, y=y, mid=mid, ffn_out=ffn_out)
        if post:
            states["ffn_res"] = mid + ffn_out
            s_f = ln_f.inv_std(states["ffn_res"])
            states["out"] = ln_f(states["ffn_res"])
        else:
            states["out"] = y + ffn_out

        # row scales of the per-key pieces: target pieces in the stream, FFN input pieces of both kinds
        one = torch.ones_like(s_g)
        scale_stream_t = s_s if post else one
        scale_in_t = scale_stream_t * s_g

        # the bias term of each scope (everything that depends on no token)
        bias = {}
        bias["self"] = ln_s.split(b_o) * s_s[..., None] + ln_s.bias_vector(D, x) if post else b_o.expand(B, n, D)
        bias["cross"] = bias["self"] + b_oc
        bias["ffn_in"] = g.split(bias["cross"]) * s_g[..., None] + g.bias_vector(D, x)
        bias["ffn"] = _ffn_bias(ffn, bias["ffn_in"], coef_in, coef_gate)
        if post:
            bias["ffn_res"] = bias["ffn_in"] + bias["ffn"]
            bias["out"] = ln_f.split(bias["ffn_res"]) * s_f[..., None] + ln_f.bias_vector(D, x)
        else:
            bias["out"] = bias["cross"] + bias["ffn"]

        # per-column coefficients kappa: (B, n, T, Hs + 1) and (B, n, S, Hc)
        own = (r[:, None] == keys_t[None])[None] & rv[:, :, None]  # (B, n, T): [i == k]
        kappa_t = torch.cat([alpha.permute(0, 2, 3, 1), own[..., None].to(dtype)], -1)
        kappa_c = a.permute(0, 2, 3, 1)

        def combine(kappa_x, pieces, scale=None):
            """sum_r kappa[b, i, k, r] pieces[b, k, r] per (row i, key k), times a per-row scale: (B, n, C, width).
            A loop over the H (+ 1) pieces of a key: broadcast multiply-adds (a batched matmul over the keys with an
            inner size of H + 1 is many times slower on CPUs)."""
            if scale is not None:
                kappa_x = kappa_x * scale[:, :, None, None]
            out = kappa_x[..., 0, None] * pieces[:, None, :, 0]
            for piece in range(1, pieces.shape[2]):
                out += kappa_x[..., piece, None] * pieces[:, None, :, piece]
            return out

        vectors = {}
        st = combine(kappa_t, stream_t, scale_stream_t)
        sc = combine(kappa_c, stream_c)
        vectors["self"] = torch.cat([st, torch.zeros_like(sc)], 2)
        vectors["cross"] = torch.cat([st, sc], 2)
        del st, sc
        vectors["ffn_in"] = torch.cat([combine(kappa_t, in_t, scale_in_t), combine(kappa_c, in_c, s_g)], 2)
        hidden = torch.cat([combine(kappa_t, up_t, scale_in_t), combine(kappa_c, up_c, s_g)], 2) * coef_in[:, :, None]
        if gated:
            hidden += torch.cat([combine(kappa_t, gate_t, scale_in_t), combine(kappa_c, gate_c, s_g)], 2) \
                * coef_gate[:, :, None]
        vectors["ffn"] = hidden @ ffn.w_out  # (B, n, T + S, D)
        del hidden
        if post:
            vectors["ffn_res"] = vectors["ffn_in"] + vectors["ffn"]
            vectors["out"] = ln_f.split(vectors["ffn_res"]) * s_f[:, :, None, None]
        else:
            vectors["out"] = vectors["cross"] + vectors["ffn"]

        rowmask = rv.to(dtype)
        nan_pad = torch.where(rv, 0.0, float("nan")).to(dtype)
        for key, real in recorded.items():
            model_error[:, block] = torch.maximum(model_error[:, block], _relative_error(states[key], real[:, r], rv))
        for name in scopes:
            vec = vectors[name]
            maps[name][:, block] = vec.norm(dim=-1) * rowmask[..., None]
            total = vec.sum(2)
            own_vec = vec[:, torch.arange(n, device=device), r]  # (B, n, D): the own column (target column i)
            ratios[name][:, block] = vector_ratio(total - own_vec, own_vec) + nan_pad
            bias_norms[name][:, block] = bias[name].norm(dim=-1) * rowmask
            key = SCOPE_STATES[name]
            real = recorded[key][:, r] if key in recorded else states[key]
            completeness[name][:, block] = _relative_error(total + bias[name], real, rv)
    return DecoderLayerAttribution(placement=layer.placement, scopes=scopes, maps=maps, bias_norms=bias_norms,
                                   ratios=ratios, completeness=completeness, model_error=model_error, target_len=T,
                                   source_len=S, rows=rows if rows_given else None, ig=ig)


def _attention_rows(alpha: Tensor, v: Tensor, w_o: Tensor, dtype) -> Tensor:
    """sum_j sum_h alpha^h_ij v_j W_O^h for the rows of alpha (B, H, n, C): (B, n, D)."""
    B, H, n, C = alpha.shape
    KV = v.shape[1]
    heads = (alpha.reshape(B, KV, H // KV * n, C) @ v.to(dtype)).view(B, H, n, -1)
    return torch.einsum("bhnd,hde->bne", heads, w_o.to(dtype))


def _ffn_bias(ffn, part: Tensor, coef_in: Tensor, coef_gate: Optional[Tensor]) -> Tensor:
    """The FFN's share of the bias part ``part`` (B, n, D): it takes b_in / b_gate before the coefficients and b_out
    after."""
    up, gate = ffn.pre_activations(part)  # part W_in + b_in, part W_gate + b_gate
    hidden = up * coef_in
    if coef_gate is not None:
        hidden = hidden + gate * coef_gate
    out = hidden @ ffn.w_out
    return out + ffn.b_out if ffn.b_out is not None else out
