"""attribute(): every method for one layer, through a backend, without N x N x D tensors.

The work splits into O(N) preparation here (a blocked row pass for the attention output and
alpha_ii, per-key Gram matrices and FF parts, per-row norm scales and IG coefficients) and the
pair primitives of the chosen backend (kobattr/backends/base.py). Mixing ratios, bias terms and
completeness need no pairs: the sums over keys are linear in per-row vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .backends import get_backend
from .backends.base import Attention, FFParts
from .backends.torch_backend import DEFAULT_BUDGET, block_alpha
from .ig import ffn_coefficients
from .layer import Layer, LayerInputError
from .methods import (COMPONENTS, FF_METHODS, HEAD_METHODS, check_methods, contextualization_change, ff_amp,
                      methods_for, vector_ratio)


@dataclass
class LayerAttribution:
    """The attributions of one layer (shape vocabulary: B batch, R rows, N keys, H heads, K weight rows).

    maps[m]          (B, R, N) rows of method m's map (R = N for full maps), or (B, K, N) = weights @ map
    head_maps[m]     (B, H, R, N) per-head maps of attn_w / attn_n when heads=True
    ratios[m]        (B, N) context-mixing ratio of every row (NaN on padding)
    value_norms      (B, H, N) ||f^h(x_j)||
    bias_norms[m]    (B, N) norm of the part of row i that goes to no token (vector methods)
    completeness[m]  (B, N) ||sum_j vec_ij + bias_i - real hidden state_i|| / ||real_i||
    model_error      (B, N) relative error of the layer's plain forward vs the ``targets`` given
    context_change   component -> (B,) 1 - Spearman (full maps with an FF method)
    ff_amp           top-k (query, key, amplification) per batch element (full maps with an FF method)
    """

    methods: tuple
    maps: dict
    ratios: dict
    value_norms: Tensor
    bias_norms: dict
    completeness: dict
    model_error: Optional[Tensor] = None
    rows: Optional[Tensor] = None
    contracted: bool = False
    backend: str = "torch"
    head_maps: dict = field(default_factory=dict)
    context_change: dict = field(default_factory=dict)
    ff_amp: list = field(default_factory=list)


def _head_vectors(layer: Layer, keys: slice, dtype) -> Tensor:
    """f^h(x_j) = v_j W_O^h for the keys in ``keys``: (B, C, H, D)."""
    group = layer.n_heads // layer.n_kv_heads
    v = layer.v[:, :, keys].to(dtype).repeat_interleave(group, 1)  # (B, H, C, Dh)
    return torch.einsum("bhcd,hde->bche", v, layer.w_o.to(dtype))


def _row_pass(layer: Layer, attn: Attention, dtype, budget: int) -> tuple[Tensor, Tensor]:
    """(sum_j sum_h alpha^h_ij v_j W_O^h (B, N, D), alpha^h_ii (B, H, N)) in query blocks."""
    B, H, N, Dh = layer.q.shape
    group = H // layer.n_kv_heads
    w_o, v = layer.w_o.to(dtype), layer.v.to(dtype)
    attn_sum = torch.zeros(B, N, layer.d_model, dtype=dtype, device=layer.q.device)
    alpha_diag = torch.zeros(B, H, N, dtype=dtype, device=layer.q.device)
    size = max(1, budget // max(1, B * H * N))
    for start in range(0, N, size):
        rows = torch.arange(start, min(start + size, N), device=layer.q.device)
        alpha, _ = block_alpha(attn, rows, dtype)  # (B, H, R, N)
        heads = (alpha.view(B, layer.n_kv_heads, group * len(rows), N) @ v).view(B, H, len(rows), Dh)
        attn_sum[:, rows] = torch.einsum("bhrd,hde->bre", heads, w_o)
        alpha_diag[:, :, rows] = alpha[:, :, torch.arange(len(rows), device=rows.device), rows]
    return attn_sum, alpha_diag


class _Prepared:
    """Per-row vectors and per-key parts of one layer, in the compute dtype."""

    def __init__(self, layer: Layer, methods, ig: str, ig_steps: int, budget: int, targets: Optional[dict]):
        self.layer = L = layer
        self.dtype = dtype = torch.float64 if layer.x.dtype == torch.float64 else torch.float32
        self.attn = Attention(q=L.q, k=L.k, valid=L.valid, causal=L.causal, window=L.window, scale=L.softmax_scale)
        B, H, N, Dh = L.q.shape
        D = L.d_model
        x = L.x.to(dtype)
        self.b_o = L.out_bias.to(dtype)
        attn_sum, self.alpha_diag = _row_pass(L, self.attn, dtype, budget)
        group = H // L.n_kv_heads
        v_diag = L.v.to(dtype).repeat_interleave(group, 1) * self.alpha_diag[..., None]
        attn_diag = torch.einsum("bhnd,hde->bne", v_diag, L.w_o.to(dtype))  # sum_h alpha^h_ii f^h(x_i)
        y = x + attn_sum + self.b_o
        # the norm right after the residual: LN1 (post-LN), LN2 (pre-LN)
        self.norm = norm = _cast_norm(L.ln1 if L.placement == "post" else L.ln2, dtype)
        self.inv_s = norm.inv_std(y)  # (B, N)
        s = self.inv_s[..., None]

        # (sum over keys, diagonal, bias, real hidden state) of every vector method
        ln_bias = norm.split(self.b_o) * s + norm.bias_vector(D, y)
        real = _plain_forward(L, dtype, y, any(m in FF_METHODS for m in methods) or bool(targets))
        # how far this layer's own forward is from the model's real hidden states (B, N)
        self.model_error = torch.zeros_like(self.inv_s)
        for key, t in (targets or {}).items():
            self.model_error = torch.maximum(self.model_error, _relative_error(real[key], t.to(dtype), L.valid))
            real[key] = t.to(dtype)
        self.vectors = {
            "attn_n": (attn_sum, attn_diag, self.b_o.expand_as(y), real["attn"]),
            "attnres_n": (attn_sum + x, attn_diag + x, self.b_o.expand_as(y), real["y"]),
            "attnresln_n": (norm.split(attn_sum + x) * s, norm.split(attn_diag + x) * s, ln_bias, real["mid"]),
        }
        scope_vectors = {"atb": "attnresln_n" if L.placement == "post" else "attnres_n", "atbln": "attnresln_n"}
        for m, src in scope_vectors.items():
            self.vectors[m] = self.vectors[src]

        self.ff = None
        if any(m in FF_METHODS for m in methods):
            self._prepare_ff(real, x, y, ig, ig_steps)

    def _prepare_ff(self, real, x, y, ig, ig_steps):
        L, dtype = self.layer, self.dtype
        ffn = _cast_ffn(L.ffn, dtype)
        mid = real["mid"]
        coef_in, coef_gate = ffn_coefficients(ffn, mid, ig, ig_steps)
        w_sum, w_diag, w_bias, _ = self.vectors["attnresln_n"]  # the split FFN input

        def ff_linear(w):
            hidden = (w @ ffn.w_in) * coef_in
            if coef_gate is not None:
                hidden = hidden + (w @ ffn.w_gate) * coef_gate
            return hidden @ ffn.w_out

        zeros_f = mid.new_zeros(ffn.w_in.shape[1])
        bias_hidden = (w_bias @ ffn.w_in + (ffn.b_in if ffn.b_in is not None else zeros_f)) * coef_in
        if coef_gate is not None:
            bias_hidden = bias_hidden + (w_bias @ ffn.w_gate + (ffn.b_gate if ffn.b_gate is not None else zeros_f)) * coef_gate
        ff_bias = bias_hidden @ ffn.w_out + (ffn.b_out if ffn.b_out is not None else 0.0)
        ff_sum, ff_diag = ff_linear(w_sum), ff_linear(w_diag)

        # per-key parts: U_j = [f^1(x_j) .. f^H(x_j), x_j] (H+1 rows) in key blocks
        B, H, N, _ = L.q.shape
        D, F = L.d_model, ffn.w_in.shape[1]
        gated = coef_gate is not None
        ff_parts = torch.empty(B, N, H + 1, F, dtype=dtype, device=x.device)
        gate_parts = torch.empty_like(ff_parts) if gated else None
        res_parts = torch.empty(B, N, H + 1, D, dtype=dtype, device=x.device)
        step = max(1, (1 << 22) // max(1, B * (H + 1) * max(D, F)))
        for start in range(0, N, step):
            keys = slice(start, min(start + step, N))
            raw = torch.cat([_head_vectors(L, keys, dtype), x[:, keys, None]], 2)  # (B, C, H+1, D)
            split = self.norm.split(raw)
            res_parts[:, keys] = split if L.placement == "post" else raw
            ff_parts[:, keys] = split @ ffn.w_in
            if gated:
                gate_parts[:, keys] = split @ ffn.w_gate

        if L.placement == "post":
            ln2 = _cast_norm(L.ln2, dtype)
            s2 = ln2.inv_std(real["ffn_res"])
            res_sum, res_diag, res_bias = w_sum + ff_sum, w_diag + ff_diag, w_bias + ff_bias
            self.vectors["atbff"] = (ff_sum, ff_diag, ff_bias, real["ffn_out"])
            self.vectors["atbffres"] = (res_sum, res_diag, res_bias, real["ffn_res"])
            self.vectors["atbffresln"] = (ln2.split(res_sum) * s2[..., None], ln2.split(res_diag) * s2[..., None],
                                          ln2.split(res_bias) * s2[..., None] + ln2.bias_vector(D, y), real["out"])
            self.ff_scopes = ("atbff", "atbffres", "atbffresln")
            out_weight, out_center, out_scale = ln2.weight, ln2.kind == "layernorm", s2
            res_scale = self.inv_s
        else:
            u_sum, u_diag, _, _ = self.vectors["attnres_n"]
            self.vectors["atblnff"] = (ff_sum, ff_diag, ff_bias, real["ffn_out"])
            self.vectors["atblnffres"] = (u_sum + ff_sum, u_diag + ff_diag, self.b_o + ff_bias, real["out"])
            self.ff_scopes = ("atblnff", "atblnffres")
            out_weight, out_center, out_scale = None, False, torch.ones_like(self.inv_s)
            res_scale = torch.ones_like(self.inv_s)
        self.ff = FFParts(ff_parts=ff_parts, gate_parts=gate_parts, res_parts=res_parts, in_scale=self.inv_s,
                          res_scale=res_scale, out_scale=out_scale, coef_in=coef_in, coef_gate=coef_gate,
                          w_out=ffn.w_out, out_weight=out_weight, out_center=out_center,
                          n_scopes=len(self.ff_scopes))

    def grams(self, methods) -> tuple[Tensor, Tensor]:
        """Per-key Gram matrices (B, N, M, H+1, H+1) and row scales (B, N, M) of attention-side methods
        (fp32, or fp64 for an fp64 layer)."""
        L, dtype = self.layer, self.dtype
        B, H, N, _ = L.q.shape
        M = len(methods)
        grams = torch.empty(B, N, M, H + 1, H + 1, dtype=dtype, device=L.x.device)
        scales = torch.ones(B, N, M, dtype=dtype, device=L.x.device)
        weight_rows = {"attn_w": torch.cat([torch.full((H,), 1.0 / H), torch.zeros(1)]),
                       "attnres_w": torch.cat([torch.full((H,), 0.5 / H), torch.full((1,), 0.5)])}
        x = L.x.to(dtype)
        step = max(1, (1 << 22) // max(1, B * (H + 1) * L.d_model))
        for start in range(0, N, step):
            keys = slice(start, min(start + step, N))
            f = _head_vectors(L, keys, dtype)  # (B, C, H, D)
            for mi, m in enumerate(methods):
                if m in weight_rows:  # mean_h alpha (+ [i == j]) is a quadratic form of rank 1: w w^T
                    w = weight_rows[m].to(dtype=dtype, device=x.device)
                    grams[:, keys, mi] = w[:, None] * w[None, :]
                    continue
                rows = torch.cat([f, x[:, keys, None] if m != "attn_n" else torch.zeros_like(f[:, :, :1])], 2)
                if m in ("attnresln_n", "atbln") or (m == "atb" and L.placement == "post"):
                    rows = self.norm.split(rows)
                    scales[:, keys, mi] = self.inv_s[:, keys]
                grams[:, keys, mi] = rows @ rows.transpose(-1, -2)
        return grams, scales


def _plain_forward(layer: Layer, dtype, y: Tensor, with_ffn: bool) -> dict:
    """The layer's hidden states (keys as Layer.forward) from y = x + Attn(x), with no N x N tensor."""
    states = {"attn": y - layer.x.to(dtype), "y": y}
    if layer.placement == "post":
        states["mid"] = _cast_norm(layer.ln1, dtype)(y)
    else:
        states["mid"] = _cast_norm(layer.ln2, dtype)(y)
    if with_ffn:
        states["ffn_out"] = _cast_ffn(layer.ffn, dtype)(states["mid"])
        if layer.placement == "post":
            states["ffn_res"] = states["mid"] + states["ffn_out"]
            states["out"] = _cast_norm(layer.ln2, dtype)(states["ffn_res"])
        else:
            states["ffn_res"] = states["out"] = y + states["ffn_out"]
    return states


def _cast_norm(norm, dtype):
    from dataclasses import replace

    return replace(norm, weight=None if norm.weight is None else norm.weight.to(dtype),
                   bias=None if norm.bias is None else norm.bias.to(dtype))


def _cast_ffn(ffn, dtype):
    from dataclasses import fields, replace

    return replace(ffn, **{f.name: getattr(ffn, f.name).to(dtype) for f in fields(ffn)
                           if isinstance(getattr(ffn, f.name), Tensor)})


def _relative_error(estimate: Tensor, real: Tensor, valid: Tensor) -> Tensor:
    err = (estimate - real).norm(dim=-1) / real.norm(dim=-1).clamp_min(1e-30)
    return torch.where(valid, err, torch.zeros_like(err))


MAX_OUTPUT_ELEMENTS = 1 << 33  # 32 GiB of fp32 output


def attribute(layer: Layer, methods=None, rows=None, heads: bool = False, weights: Optional[Tensor] = None,
              normalize_rows: bool = False, backend: str = "auto", ig: str = "exact", ig_steps: int = 20,
              budget: int = DEFAULT_BUDGET, targets: Optional[dict] = None) -> LayerAttribution:
    """Attributions of one layer.

    methods: names from kobattr.methods (default DEFAULT_METHODS; "all" for every method of the
        layer's placement). rows: query rows to return (None = all). heads: also per-head maps of
        attn_w and attn_n. weights: (B, K, N) or (K, N) to get weights @ map instead of the map
        (rollout vectors, column sums) without building it; normalize_rows divides each map row by
        its sum first. ig: "exact" (closed form / quadrature) or "riemann" with ig_steps steps.
        targets: the model's real hidden states (keys of Layer.forward, e.g. {"out": ...}) that
        completeness is measured against; missing ones come from a plain forward of the layer.
    """
    layer.validate()
    methods = check_methods(methods, layer.placement)
    B, H, N, _ = layer.q.shape
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long, device=layer.q.device).flatten()
        if rows.numel() == 0 or rows.min() < 0 or rows.max() >= N:
            raise LayerInputError(f"rows must be non-empty query indices in [0, {N}), got {rows.tolist()}.")
    if weights is not None:
        if rows is not None or heads:
            raise LayerInputError("weights (a contraction over query rows) cannot be combined with rows or heads.")
        weights = torch.as_tensor(weights, device=layer.q.device)
        if weights.dim() == 2:
            weights = weights.expand(B, *weights.shape)
        if weights.dim() != 3 or weights.shape[0] != B or weights.shape[2] != N:
            raise LayerInputError(f"weights must be (K, N) or (B, K, N) with B = {B}, N = {N}, got {tuple(weights.shape)}.")
        if not torch.isfinite(weights).all():
            raise LayerInputError("weights contains NaN or inf values.")
    need_ff = any(m in FF_METHODS for m in methods)
    full = rows is None and weights is None
    n_rows = N if rows is None else len(rows)
    out_elements = B * n_rows * N * (len(methods) + (H if heads else 0))
    if weights is None and out_elements > MAX_OUTPUT_ELEMENTS:
        raise LayerInputError(f"the requested maps hold {out_elements / 2**30:.1f} G values ({B} x {n_rows} rows x {N} keys x "
                              f"{len(methods)} methods{' + heads' if heads else ''}); ask for fewer rows= or use weights= "
                              "to contract them.")
    prep = _Prepared(layer, methods, ig, ig_steps, budget, targets)
    impl = get_backend(backend, prep.attn, need_ff)

    # attention-side maps (an FF run with full maps also computes every scope, for the component analysis)
    scope_methods = methods_for(layer.placement)[5:] if need_ff and full else ()
    attn_methods = [m for m in dict.fromkeys(methods + scope_methods) if m not in FF_METHODS]
    maps = {}
    want_alpha = heads and any(m in HEAD_METHODS for m in methods)
    alpha = None
    if attn_methods or want_alpha:
        grams, scales = prep.grams(attn_methods or ["attn_w"])
        out, alpha = impl.attention_maps(prep.attn, grams, scales, rows=rows, weights=weights,
                                         normalize_rows=normalize_rows, want_alpha=want_alpha)
        maps.update({m: out[:, i] for i, m in enumerate(attn_methods)})
    if need_ff:
        out = impl.ff_maps(prep.attn, prep.ff, rows=rows, weights=weights, normalize_rows=normalize_rows)
        maps.update({m: out[:, i] for i, m in enumerate(prep.ff_scopes)})

    valid = layer.valid
    nan_pad = torch.where(valid, 0.0, float("nan")).to(prep.dtype)
    value_norms = _value_norms(layer, prep.dtype) * valid[:, None]
    result = LayerAttribution(methods=methods, maps={m: maps[m] for m in methods}, ratios={}, value_norms=value_norms,
                              bias_norms={}, completeness={}, model_error=prep.model_error, rows=rows, contracted=weights is not None,
                              backend=impl.name)
    mean_self = prep.alpha_diag.mean(1)
    for m in methods:
        if m == "attn_w":
            result.ratios[m] = 1 - mean_self + nan_pad
        elif m == "attnres_w":
            result.ratios[m] = 0.5 * (1 - mean_self) + nan_pad
        else:
            total, diag, bias, real = prep.vectors[m]
            result.ratios[m] = vector_ratio(total - diag, diag) + nan_pad
            result.bias_norms[m] = bias.norm(dim=-1) * valid
            result.completeness[m] = _relative_error(total + bias, real, valid)
    if want_alpha:
        if "attn_w" in methods:
            result.head_maps["attn_w"] = alpha
        if "attn_n" in methods:
            result.head_maps["attn_n"] = alpha * value_norms[:, :, None, :]
    if need_ff and full:
        vis = layer.visible()
        result.context_change = {c: contextualization_change(maps[a], maps[b], vis)
                                 for c, (a, b) in COMPONENTS[layer.placement].items()}
        before, after = ("atb", "atbff") if layer.placement == "post" else ("atbln", "atblnff")
        result.ff_amp = ff_amp(maps[before], maps[after], vis)
    return result


def _value_norms(layer: Layer, dtype) -> Tensor:
    """||f^h(x_j)|| (B, H, N) without an (N, H, D) tensor: ||v W_O^h||^2 = v (W_O^h W_O^h^T) v^T."""
    group = layer.n_heads // layer.n_kv_heads
    v = layer.v.to(dtype).repeat_interleave(group, 1)  # (B, H, N, Dh)
    w_o = layer.w_o.to(dtype)
    gram = w_o @ w_o.transpose(-1, -2)  # (H, Dh, Dh)
    return torch.einsum("bhnd,hde,bhne->bhn", v, gram, v).clamp_min(0).sqrt()
