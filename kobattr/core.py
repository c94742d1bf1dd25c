"""attribute(): every method for one layer, through a backend, without N x N x D tensors.

The work splits into O(N) preparation here (a blocked row pass for the attention output and
alpha_ii, per-key Gram matrices and FF parts, per-row norm scales and IG coefficients), driven by
the method registry (kobattr/methods.py), and the pair primitives of the implementations chosen per
primitive (kobattr/backends/). Mixing ratios, bias terms and
completeness need no pairs: the sums over keys are linear in per-row vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .backends import get_backend
from .backends.base import Attention, Backend, BackendUnavailable, FFParts
from .backends.torch_backend import CUDA_PARTS_SHARE, DEFAULT_BUDGET, block_alpha
from .ig import ffn_coefficients
from .layer import NORM_FIELDS, Layer, LayerInputError, all_finite, cap_logits, head_vectors
from .methods import (REGISTRY, STRUCTURES, check_methods, contextualization_change, ff_amp, ff_methods, form,
                      row_normalize, vector_ratio)
from .peers import output_maps, peer_implementation, peer_result


@dataclass
class LayerAttribution:
    """The attributions of one layer (shape vocabulary: B batch, R rows, N keys, H heads, K weight rows).

    maps[m]          (B, R, N) rows of method m's map (R = N for full maps), or (B, K, N) = contract @ map
    head_maps[m]     (B, H, R, N) per-head maps of attn_w / attn_n / attn_n_prenorm when heads=True
    ratios[m]        (B, N) context-mixing ratio of every row (NaN on padding)
    value_norms      (B, H, N) ||f^h(x_j)||
    bias_norms[m]    (B, N) norm of the part of row i that goes to no token (vector and FF methods)
    completeness[m]  (B, N) FF methods: ||sum_j vec_ij + bias_i - real hidden state_i|| / ||real_i||
    model_error      (B, N) relative error of the layer's plain forward vs the ``targets`` given
    context_change   component -> (B,) 1 - Spearman (full maps with an FF method)
    ff_amp           top-k (query, key, amplification) per batch element (full maps with an FF method)
    backends         primitive -> the implementation that computed it
    spot_check[m]    (B,) largest relative error of the sampled rows vs the reference (verify > 0)
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
    backends: dict = field(default_factory=dict)
    spot_check: dict = field(default_factory=dict)
    head_maps: dict = field(default_factory=dict)
    context_change: dict = field(default_factory=dict)
    ff_amp: list = field(default_factory=list)


GRAM_BLOCK = 1 << 22  # elements of a key block's (B, C, H, D) head rows in the Gram preparation on the CPU


def gram_keys(device: torch.device, B: int, H: int, D: int, itemsize: int) -> int:
    """Keys per block of the Gram preparation (_Prepared.grams): on CUDA what CUDA_PARTS_SHARE of the free device
    memory holds of a key's head rows and the einsums' temporaries, 3 (B, H + 1, D) per key (Llama-7B at N = 16k:
    a few blocks of batched GEMMs instead of ~500 of 31 keys); on the CPU GRAM_BLOCK elements of head rows."""
    per_key = max(1, B * (H + 1) * D)
    if device.type == "cuda":
        return max(1, int(torch.cuda.mem_get_info(device)[0] * CUDA_PARTS_SHARE) // (3 * per_key * itemsize))
    return max(1, GRAM_BLOCK // per_key)


def _row_pass(layer: Layer, attn: Attention, dtype, budget: int, row_stats: Optional[Backend],
              defer_diagonal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """(sum_j sum_h alpha^h_ij v_j W_O^h (B, N, D), alpha^h_ii (B, H, N)).

    With the model's own attention output (Layer.head_outputs) only the row log-sum-exp is needed, for alpha_ii
    (diagonal_alpha); ``defer_diagonal`` leaves it to later (None), so that a pair primitive computing every
    row's statistics anyway can provide them. Otherwise alpha is recomputed in query blocks of at most ``budget``."""
    B, H, N, Dh = layer.q.shape
    group = H // layer.n_kv_heads
    w_o = layer.w_o.to(dtype)
    if layer.head_outputs is not None:
        attn_sum = torch.einsum("bhnd,hde->bne", layer.head_outputs.to(dtype), w_o)
        return attn_sum, None if defer_diagonal else diagonal_alpha(layer, attn, dtype, row_stats)
    v = layer.v.to(dtype)
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


def diagonal_alpha(layer: Layer, attn: Attention, dtype, row_stats: Optional[Backend]) -> Tensor:
    """alpha^h_ii = exp(logit_ii - lse_i) (B, H, N) from the row statistics: attn.row_lse where a primitive has
    left them, else from the row_stats implementation (which stores them there for the pair kernels)."""
    if attn.row_lse is None:
        attn.row_lse = row_stats.row_lse(attn)
        attn.row_stats_ran = True  # result.backends names row_stats only where it ran
    group = layer.n_heads // layer.n_kv_heads
    q, k = layer.q.to(dtype), layer.k.to(dtype).repeat_interleave(group, 1)
    logit = cap_logits((q * k).sum(-1) * attn.scale, attn.softcap)  # (B, H, N): query i against key i
    alpha_diag = torch.exp(logit - attn.row_lse.to(dtype))
    return torch.where(layer.valid[:, None], alpha_diag, 0.0)  # i sees i whenever i is a real token


def attention_of(layer: Layer) -> Attention:
    """The attention pattern of a layer, as the primitives take it."""
    return Attention(q=layer.q, k=layer.k, valid=layer.valid, causal=layer.causal, window=layer.window,
                     scale=layer.softmax_scale, radius=layer.radius, softcap=layer.softcap)


class _Prepared:
    """Per-row vectors and per-key parts of one layer, in the compute dtype, as the registry's forms need them.

    Every structure is one chain (spec section 6): t_ij = s1_i P1(a_ij) (a_ij = sum_h alpha^h_ij f^h(x_j);
    P1 the row-independent part of the norm after attention, s1_i its 1 / s of the whole attention output,
    or the identity), u_ij = t_ij + [i == j] x_i, then optionally a norm that reads y. A form's per-key rows
    are [P(P1 f^h(x_j)) for h, P(x_j) / s1_j] with row scale s_i s1_i: the residual row only meets kappa's
    [i == j], where s1_j = s1_i, so the kernels need no per-row residual coefficient.
    """

    def __init__(self, layer: Layer, methods, ig: str, ig_steps: int, budget: int, targets: Optional[dict],
                 row_stats: Optional[Backend] = None, defer_diagonal: bool = False,
                 ff_gemm_dtype: Optional[torch.dtype] = None):
        self.layer = L = layer
        self.ff_gemm_dtype = ff_gemm_dtype
        self.structure = L.structure
        self.dtype = dtype = torch.float64 if layer.x.dtype == torch.float64 else torch.float32
        self.attn = attention_of(L)
        B, H, N, Dh = L.q.shape
        self.x = x = L.x.to(dtype)
        self.b_o = L.out_bias.to(dtype)
        self.budget = budget  # elements per intermediate (the peers' measures tile with it too)
        self.attn_sum, self.alpha_diag = _row_pass(L, self.attn, dtype, budget, row_stats, defer_diagonal)
        self.row_stats, self.methods, self.ig, self.ig_steps = row_stats, methods, ig, ig_steps
        need_ff = bool(ff_methods(methods, self.structure))
        self.cast = cast = _cast_layer(L, dtype)
        self.real = cast.stream(self.attn_sum + self.b_o, with_ffn=need_ff or bool(targets))
        self.y = self.real["y"]
        self.p1 = cast.attn_out_norm
        # 1 / s of the whole attention output (b_O included) for the norm after attention
        self.s1 = None if self.p1 is None else self.p1.inv_std(self.attn_sum + self.b_o)
        self._norms: dict = {}  # Layer norm attribute -> (norm in the compute dtype, 1 / s(y) (B, N))
        # how far this layer's own forward is from the model's real hidden states (B, N)
        self.model_error = torch.zeros(B, N, dtype=dtype, device=x.device)
        for key, t in (targets or {}).items():
            self.model_error = torch.maximum(self.model_error, _relative_error(self.real[key], t.to(dtype), L.valid))
            self.real[key] = t.to(dtype)
        self.vectors: dict = {}  # method -> (sum over keys, diagonal, bias, real hidden state), each (B, N, D)
        self.ff: Optional[FFParts] = None
        self.finished = False
        if self.alpha_diag is not None:
            self.finish()

    def finish(self) -> None:
        """The parts that need alpha_ii (the diagonal vectors behind the mixing ratios, the FF parts): right away,
        or, with a deferred diagonal, after the attention maps, whose primitive may have left every row's
        statistics in self.attn.row_lse."""
        if self.finished:
            return
        L, dtype = self.layer, self.dtype
        if self.alpha_diag is None:
            self.alpha_diag = diagonal_alpha(L, self.attn, dtype, self.row_stats)
        group = L.n_heads // L.n_kv_heads
        v_diag = L.v.to(dtype).repeat_interleave(group, 1) * self.alpha_diag[..., None]
        self.attn_diag = torch.einsum("bhnd,hde->bne", v_diag, L.w_o.to(dtype))  # sum_h alpha^h_ii f^h(x_i)
        for m in self.methods:
            f = form(m, self.structure)
            if f.kind == "vector":
                self.vectors[m] = self.vector_parts(f)
        if ff_methods(self.methods, self.structure):
            self.ff = self._prepare_ff(self.ig, self.ig_steps)
        self.finished = True

    def split_norm(self, name: str):
        """(norm, 1 / s(y)) of the Layer norm ``name`` that follows the attention residual."""
        if name not in self._norms:
            norm = getattr(self.cast, name)
            self._norms[name] = (norm, norm.inv_std(self.y))
        return self._norms[name]

    def attention_parts(self, prenorm: bool = False) -> tuple:
        """(sum over keys, diagonal, bias) of t_ij, what attention adds to the stream (``prenorm``: of a_ij, before
        the norm after attention)."""
        total, diag, bias = self.attn_sum, self.attn_diag, self.b_o.expand_as(self.y)
        if self.p1 is not None and not prenorm:
            s = self.s1[..., None]
            total, diag = self.p1.split(total) * s, self.p1.split(diag) * s
            bias = self.p1.split(self.b_o) * s + self.p1.bias_vector(self.layer.d_model, self.y)
        return total, diag, bias

    def vector_parts(self, f) -> tuple:
        """(sum over keys, diagonal, bias, real hidden state) of an attention-side vector form."""
        total, diag, bias = self.attention_parts(f.prenorm)
        if f.residual:
            total, diag = total + self.x, diag + self.x
        if f.norm is not None:
            norm, inv_s = self.split_norm(f.norm)
            s = inv_s[..., None]
            total, diag = norm.split(total) * s, norm.split(diag) * s
            bias = norm.split(bias) * s + norm.bias_vector(self.layer.d_model, self.y)
        return total, diag, bias, self.real[f.target]

    def form_scale(self, f) -> Tensor:
        """(B, N) row scale of a vector form's per-key rows."""
        scale = torch.ones_like(self.y[..., 0]) if self.s1 is None or f.prenorm else self.s1
        if f.norm is not None:
            scale = scale * self.split_norm(f.norm)[1]
        return scale

    def form_rows(self, f, raw: Tensor, keys: slice) -> Tensor:
        """A vector form's per-key rows (B, C, H+1, D) from raw = [f^h(x_j) for h, x_j] of the keys ``keys``: the
        head rows through split_heads, then residual_row (zeros for a form without the residual)."""
        H = raw.shape[2] - 1
        res = self.residual_row(f, keys) if f.residual else torch.zeros_like(raw[:, :, H])
        return torch.cat([self.split_heads(f, raw[:, :, :H]), res[:, :, None]], 2)

    def _ff_input(self):
        """(rows function, row scale, sum, diagonal, bias) of the FFN input's decomposition."""
        f_in = STRUCTURES[self.structure].ff_input
        if f_in is not None:
            f = form(f_in, self.structure)
            return (lambda raw, keys: self.form_rows(f, raw, keys)), self.form_scale(f), *self.vector_parts(f)[:3]
        # parallel: the FFN reads ln2(x_i), token i alone; its part goes to kappa's [i == j] row
        ln2, x = self.cast.ln2, self.x
        if ln2 is None:
            scale, bias = torch.ones_like(x[..., 0]), torch.zeros_like(x)
            split = lambda t: t  # noqa: E731
        else:
            scale, bias, split = ln2.inv_std(x), ln2.bias_vector(self.layer.d_model, x).expand_as(x), ln2.split
        part = split(x) * scale[..., None]

        def rows(raw, keys):
            H = raw.shape[2] - 1
            return torch.cat([torch.zeros_like(raw[:, :, :H]), split(raw[:, :, H:])], 2)

        return rows, scale, part, part, bias

    def _prepare_ff(self, ig, ig_steps) -> FFParts:
        L, dtype, x, y = self.layer, self.dtype, self.x, self.y
        struct = STRUCTURES[self.structure]
        ffn = self.cast.ffn
        mid = self.real["mid"]  # the FFN's real input
        coef_in, coef_gate = ffn_coefficients(ffn, mid, ig, ig_steps)
        in_rows, in_scale, w_sum, w_diag, w_bias = self._ff_input()

        def ff_linear(w):
            """((w W_in) * coef_in + (w W_gate) * coef_gate) W_out per row, in row blocks (no (N, F) temporaries)."""
            out = torch.empty_like(w)
            size = max(1, (1 << 22) // ffn.w_in.shape[1])
            for start in range(0, w.shape[1], size):
                rows = slice(start, start + size)
                hidden = (w[:, rows] @ ffn.w_in) * coef_in[:, rows]
                if coef_gate is not None:
                    hidden += (w[:, rows] @ ffn.w_gate) * coef_gate[:, rows]
                out[:, rows] = hidden @ ffn.w_out
            return out

        # the bias part: w_bias plus b_in / b_gate before the coefficients, b_out after (linear in the part but for those)
        ff_bias = ff_linear(w_bias)
        zeros_f = mid.new_zeros(ffn.w_in.shape[1])
        if ffn.b_in is not None or ffn.b_gate is not None:
            ff_bias += ff_linear_rows(coef_in, coef_gate, ffn,
                                      ffn.b_in if ffn.b_in is not None else zeros_f,
                                      ffn.b_gate if ffn.b_gate is not None else zeros_f)
        if ffn.b_out is not None:
            ff_bias += ffn.b_out
        ff_sum, ff_diag = ff_linear(w_sum), ff_linear(w_diag)
        w_out = ffn.w_out
        p2 = self.cast.ffn_out_norm
        if p2 is not None:  # FF_ij = s2_i P2(raw FF_ij), statistic of the whole FFN output: folded into W_out and in_scale
            s2 = p2.inv_std(self.real["ffn_raw"])
            ff_sum, ff_diag = p2.split(ff_sum) * s2[..., None], p2.split(ff_diag) * s2[..., None]
            ff_bias = p2.split(ff_bias) * s2[..., None] + p2.bias_vector(L.d_model, y)
            w_out, in_scale = p2.split(w_out), in_scale * s2

        # per-key parts from U_j = [f^1(x_j) .. f^H(x_j), x_j] (H+1 rows), made for a block of keys when the
        # implementation asks (never (N, H+1, F) at once)
        stream = form(struct.ff_stream, self.structure)  # the pairs the FFN output is added to
        w_in, w_gate = ffn.w_in, (ffn.w_gate if coef_gate is not None else None)

        def key_block(keys: slice) -> tuple:
            raw = torch.cat([head_vectors(L, keys, dtype), x[:, keys, None]], 2)  # (B, C, H+1, D)
            split = in_rows(raw, keys)
            return split @ w_in, None if w_gate is None else split @ w_gate, self.form_rows(stream, raw, keys)

        s_sum, s_diag, s_bias, _ = self.vector_parts(stream)
        res_sum, res_diag, res_bias = s_sum + ff_sum, s_diag + ff_diag, s_bias + ff_bias
        scope_vectors = [(ff_sum, ff_diag, ff_bias), (res_sum, res_diag, res_bias)]
        out_weight, out_center, out_scale = None, False, torch.ones_like(in_scale)
        if struct.out_norm is not None:
            out = getattr(self.cast, struct.out_norm)
            s3 = out.inv_std(self.real["ffn_res"])[..., None]
            scope_vectors.append((out.split(res_sum) * s3, out.split(res_diag) * s3,
                                  out.split(res_bias) * s3 + out.bias_vector(L.d_model, y)))
            out_weight, out_center, out_scale = out.weight, out.kind == "layernorm", s3[..., 0]
        self.ff_scopes = []  # the FF-kind scope methods in the order of the primitive's output
        for m in struct.scopes:
            f = form(m, self.structure)
            if f.kind == "ff":
                self.vectors[m] = (*scope_vectors[f.ff_scope], self.real[f.target])
                self.ff_scopes.append(m)
        return FFParts(key_block=key_block, in_scale=in_scale, res_scale=self.form_scale(stream), out_scale=out_scale,
                       coef_in=coef_in, coef_gate=coef_gate, w_out=w_out, out_weight=out_weight, out_center=out_center,
                       n_scopes=len(scope_vectors), gemm_dtype=self.ff_gemm_dtype)

    def grams(self, methods) -> tuple[Tensor, Tensor]:
        """Per-key Gram matrices (B, N, M, H+1, H+1) and row scales (B, N, M) of attention-side methods
        (fp32, or fp64 for an fp64 layer).

        A vector form's head rows P(P1 f^h(x_j)) = v^h_j P(P1 W_O^h) (the splits are linear maps of the D
        dimension), so each form gets its own folded W_O once and the rows come from one einsum per key block,
        without splitting a (B, C, H, D) tensor; the Gram is assembled from head-head, head-residual and
        residual-residual products (form_rows's parts, without building the rows). Key blocks of gram_keys: batched
        GEMMs over whole blocks of keys, a handful of them on a GPU."""
        L, dtype = self.layer, self.dtype
        B, H, N, _ = L.q.shape
        M = len(methods)
        grams = torch.zeros(B, N, M, H + 1, H + 1, dtype=dtype, device=L.x.device)
        scales = torch.ones(B, N, M, dtype=dtype, device=L.x.device)
        group = L.n_heads // L.n_kv_heads
        forms = [form(m, self.structure) for m in methods]
        vector_forms = [(mi, f) for mi, f in enumerate(forms) if f.kind == "vector"]
        for mi, f in enumerate(forms):
            if f.kind == "weights":  # mean_h alpha (+ [i == j]) is a quadratic form of rank 1: w w^T
                share = 0.5 if f.residual else 1.0
                w = torch.cat([torch.full((H,), share / H), torch.full((1,), 1.0 - share)]).to(dtype=dtype, device=L.x.device)
                grams[:, :, mi] = w[:, None] * w[None, :]
        folded = {}
        for mi, f in vector_forms:
            scales[..., mi] = self.form_scale(f)
            folded[mi] = self.split_heads(f, L.w_o.to(dtype))  # (H, Dh, D)
        step = gram_keys(L.x.device, B, H, L.d_model, torch.empty((), dtype=dtype).element_size())
        for start in range(0, N, step):
            keys = slice(start, min(start + step, N))
            v = L.v[:, :, keys].to(dtype).repeat_interleave(group, 1)  # (B, H, C, Dh)
            for mi, f in vector_forms:
                heads = torch.einsum("bhcd,hde->bche", v, folded[mi])  # (B, C, H, D)
                gram = grams[:, keys, mi]
                gram[..., :H, :H] = torch.einsum("bchd,bcgd->bchg", heads, heads)
                if f.residual:
                    res = self.residual_row(f, keys)  # (B, C, D)
                    cross = torch.einsum("bchd,bcd->bch", heads, res)
                    gram[..., :H, H], gram[..., H, :H] = cross, cross
                    gram[..., H, H] = (res * res).sum(-1)
        return grams, scales

    def split_heads(self, f, t: Tensor) -> Tensor:
        """The row-independent splits of a vector form's head rows (P1, then the form's norm) on t (..., D): the
        rows f^h(x_j) themselves, or W_O, since the splits are linear maps of the D dimension."""
        if self.p1 is not None and not f.prenorm:
            t = self.p1.split(t)
        if f.norm is not None:
            t = self.split_norm(f.norm)[0].split(t)
        return t

    def residual_row(self, f, keys: slice) -> Tensor:
        """A vector form's residual row P(x_j) / s1_j of the keys ``keys`` (B, C, D): it meets kappa's [i == j]
        only, where s1_j = s1_i."""
        res = self.x[:, keys]
        if self.p1 is not None:
            res = res / self.s1[:, keys, None]
        if f.norm is not None:
            res = self.split_norm(f.norm)[0].split(res)
        return res


def ff_linear_rows(coef_in: Tensor, coef_gate: Optional[Tensor], ffn, b_in: Tensor, b_gate: Tensor) -> Tensor:
    """(b_in * coef_in + b_gate * coef_gate) W_out for row-independent b_in, b_gate (F,), in row blocks."""
    B, N, F = coef_in.shape
    out = coef_in.new_empty(B, N, ffn.w_out.shape[1])
    size = max(1, (1 << 22) // F)
    for start in range(0, N, size):
        rows = slice(start, start + size)
        hidden = b_in * coef_in[:, rows]
        if coef_gate is not None:
            hidden += b_gate * coef_gate[:, rows]
        out[:, rows] = hidden @ ffn.w_out
    return out


def _cast_layer(layer: Layer, dtype) -> Layer:
    """The layer's residual stream pieces (x, norms, FFN) in ``dtype``; q, k, v and W_O stay as they are."""
    from dataclasses import replace

    norms = {name: None if getattr(layer, name) is None else _cast_norm(getattr(layer, name), dtype)
             for name in NORM_FIELDS}
    return replace(layer, x=layer.x.to(dtype), ffn=_cast_ffn(layer.ffn, dtype), **norms)


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


def as_indices(value, name: str) -> list[int]:
    """A non-empty list of ints from an int, a list / tuple / range of ints, or an integer numpy array or
    torch tensor; LayerInputError with a sentence for anything else (booleans, floats, generators)."""
    what = f"{name} must be an int or a list, tuple, range or integer array of ints"
    if isinstance(value, Tensor) or type(value).__module__ == "numpy":  # numpy arrays and scalars
        array = torch.as_tensor(value)
        if array.dtype == torch.bool or array.is_floating_point() or array.is_complex():
            raise LayerInputError(f"{what}, got a {array.dtype} array.")
        items = array.flatten().tolist()
    elif isinstance(value, (list, tuple, range)):
        items = list(value)
        bad = [v for v in items if isinstance(v, bool) or not _is_int(v)]
        if bad:
            raise LayerInputError(f"{what}, got {bad[0]!r} in {items!r}.")
        items = [int(v) for v in items]
    elif _is_int(value) and not isinstance(value, bool):
        items = [int(value)]
    else:
        raise LayerInputError(f"{what}, got {type(value).__name__} {value!r}.")
    if not items:
        raise LayerInputError(f"{name} is empty; give at least one index, or None for all.")
    return items


def _is_int(v) -> bool:
    if isinstance(v, Tensor):
        return v.dim() == 0 and not v.is_floating_point() and v.dtype != torch.bool
    return isinstance(v, int) or (type(v).__module__ == "numpy" and getattr(v, "dtype", None) is not None
                                  and v.dtype.kind in "iu")


def check_rows(rows, n: int, device) -> Optional[Tensor]:
    """Query rows as an int64 tensor on ``device`` (None = all), or LayerInputError with a sentence."""
    if rows is None:
        return None
    items = as_indices(rows, "rows")
    if min(items) < 0 or max(items) >= n:
        raise LayerInputError(f"rows must be query indices in [0, {n}), got {items}.")
    return torch.tensor(items, dtype=torch.long, device=device)


def _check_contract(contract, batch: int, n: int, device) -> Optional[Tensor]:
    if contract is None:
        return None
    contract = torch.as_tensor(contract, device=device)
    if contract.dtype == torch.bool or not (contract.is_floating_point() or contract.dtype in (torch.int32, torch.int64)):
        raise LayerInputError(f"contract must be a float tensor of shape (K, N) or (B, K, N), got dtype {contract.dtype}.")
    if contract.dim() == 2:
        contract = contract.expand(batch, *contract.shape)
    if contract.dim() != 3 or contract.shape[0] != batch or contract.shape[2] != n or contract.shape[1] == 0:
        raise LayerInputError(f"contract must be (K, N) or (B, K, N) with B = {batch}, N = {n} and K >= 1, "
                              f"got {tuple(contract.shape)}.")
    if not all_finite(contract):
        raise LayerInputError("contract contains NaN or inf values.")
    return contract


def _compute_maps(prep: _Prepared, impls: dict, attn_methods, rows, contract, normalize_rows, want_alpha, peer=()):
    """{method: (B, R or K, N)} of the attention-side, FF and ``peer`` methods, and alpha (B, H, R, N) if wanted."""
    maps, alpha = {}, None
    if attn_methods or want_alpha:
        grams, scales = prep.grams(attn_methods or ["attn_w"])
        out, alpha = impls["attention_maps"].attention_maps(prep.attn, grams, scales, rows=rows, weights=contract,
                                                            normalize_rows=normalize_rows, want_alpha=want_alpha)
        maps.update({m: out[:, i] for i, m in enumerate(attn_methods)})
    prep.finish()
    if peer:  # the peers' measures (kobattr/peers.py); their bias norms and completeness land in prep.peer_checks
        maps.update(output_maps(prep, peer, rows, contract, normalize_rows))
    if prep.ff is not None:
        out = impls["ff_maps"].ff_maps(prep.attn, prep.ff, rows=rows, weights=contract, normalize_rows=normalize_rows)
        maps.update({m: out[:, form(m, prep.structure).ff_scope] for m in prep.ff_scopes})
    return maps, alpha


# ff_gemm -> FFParts.gemm_dtype; "auto" follows the model: 16-bit layers multiply in their own dtype, others in
# the compute dtype (None)
FF_GEMM_DTYPES = {"auto": None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "tf32": "tf32"}


def resolve_ff_gemm(ff_gemm: str, layer: Layer):
    """The FF product's dtype (None: the compute dtype; "tf32") of ff_gemm; dispatch then picks an ff_maps that
    takes it."""
    if ff_gemm not in FF_GEMM_DTYPES:
        raise LayerInputError(f"ff_gemm must be one of {', '.join(FF_GEMM_DTYPES)}, got {ff_gemm!r}.")
    if ff_gemm == "auto":
        return layer.x.dtype if layer.x.dtype in (torch.bfloat16, torch.float16) else None
    dtype = FF_GEMM_DTYPES[ff_gemm]
    if dtype is not None and layer.x.dtype == torch.float64:
        raise LayerInputError(f"ff_gemm={ff_gemm!r} would discard a float64 layer's precision; convert the layer "
                              "to float32 first, or keep ff_gemm='auto'.")
    return dtype


def ff_shape(layer: Layer) -> tuple:
    """(d_model, d_ff, gated) of the layer's FFN: what the tuner's key adds to the attention shapes."""
    return (layer.d_model, layer.ffn.w_in.shape[1], layer.ffn.gated)


def attribute(layer: Layer, methods=None, rows=None, heads: bool = False, contract: Optional[Tensor] = None,
              normalize_rows: bool = False, backend="auto", ig: str = "exact", ig_steps: int = 20,
              budget: Optional[int] = None, targets: Optional[dict] = None, verify: int = 2,
              verify_seed: int = 0, ff_gemm: str = "auto") -> LayerAttribution:
    """Attributions of one layer.

    methods: names from the registry (kobattr.methods; default: the registry's defaults; "all" for every
        method of the layer's block structure). rows: query rows to return (None = all). heads: also
        per-head maps of attn_w, attn_n and attn_n_prenorm. contract: (B, K, N) or (K, N) to get contract @ map instead of
        the map (rollout vectors, column sums) without building it, over the selected rows. normalize_rows:
        divide each map row by its sum first (full maps, rows= and contractions alike).
        backend: "auto", an implementation name, or {primitive: name}; what ran is in result.backends.
        ig: "exact" (closed form / quadrature) or "riemann" with ig_steps steps.
        targets: the model's real hidden states (keys of Layer.forward, e.g. {"out": ...}) that
        completeness is measured against; missing ones come from a plain forward of the layer.
        verify: recompute this many sampled query rows of every returned map per batch element with the
        materialising reference (0 disables); result.spot_check holds the errors and
        kobattr.VerificationError is raised above the dtype's tolerance. verify_seed seeds the sample.
        budget: elements per intermediate of every implementation (None: DEFAULT_BUDGET on the CPU; on CUDA the
        FF tiles then take a share of the free device memory, an explicit budget caps them).
        ff_gemm: the precision of the FF methods' (pairs, d_ff) @ (d_ff, d) products with W_2. "auto" (default)
        follows the model: bfloat16 / float16 layers take 16-bit inputs with float32 sums (where the implementation
        offers them; a named one without keeps its float32 products), float32 and float64 layers their own dtype.
        "float32": the compute dtype whatever the layer; "bfloat16" / "float16": 16-bit inputs, float32 sums
        (float32 layers: 1.7x faster on a 2-core CPU with AVX512-BF16, README); "tf32": float32 inputs on TF32
        tensor cores (CUDA only). The 16-bit products stay within twice the error of the
        reference computed in that dtype (tests/test_ff_gemm.py); the spot checks then hold the FF maps to its
        tolerance. Dispatch picks an ff_maps that takes it (Backend.ff_gemm_dtypes).
    """
    layer.validate()
    structure = layer.structure
    methods = check_methods(methods, structure)
    B, H, N, _ = layer.q.shape
    rows = check_rows(rows, N, layer.q.device)
    contract = _check_contract(contract, B, N, layer.q.device)
    if contract is not None and heads:
        raise LayerInputError("per-head maps (heads=True) cannot be contracted; drop heads or contract.")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise LayerInputError(f"budget must be a positive number of elements or None, got {budget!r}.")
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise LayerInputError(f"verify must be a number of sampled rows >= 0 (0 disables the spot check), got {verify!r}.")
    need_ff = bool(ff_methods(methods, structure))
    ff_gemm_dtype = resolve_ff_gemm(ff_gemm, layer)
    full = rows is None and contract is None
    n_rows = N if rows is None else len(rows)
    out_elements = B * n_rows * N * (len(methods) + (H if heads else 0))
    if contract is None and out_elements > MAX_OUTPUT_ELEMENTS:
        raise LayerInputError(f"the requested maps hold {out_elements / 2**30:.1f} G values ({B} x {n_rows} rows x {N} keys x "
                              f"{len(methods)} methods{' + heads' if heads else ''}); ask for fewer rows= or use contract= "
                              "to contract them.")
    want_alpha = heads and any(REGISTRY[m].heads for m in methods)
    outputs = frozenset(mode for mode, asked in (("rows", rows is not None), ("contract", contract is not None),
                                                 ("alpha", want_alpha)) if asked)
    select = dict(need_row_stats=layer.head_outputs is not None, ff_shape=ff_shape(layer), outputs=outputs,
                  budget=budget)
    try:
        impls = get_backend(backend, attention_of(layer), need_ff, ff_gemm_dtype=ff_gemm_dtype, **select)
    except BackendUnavailable:
        if ff_gemm != "auto" or ff_gemm_dtype is None:
            raise
        # "auto" asks for 16-bit products where an implementation offers them: one named without them keeps its own
        ff_gemm_dtype = None
        impls = get_backend(backend, attention_of(layer), need_ff, **select)
    # full maps: the attention primitive computes every row's statistics anyway, so alpha_ii can wait for them
    prep = _Prepared(layer, methods, ig, ig_steps, budget or DEFAULT_BUDGET, targets, row_stats=impls.get("row_stats"),
                     defer_diagonal=rows is None and contract is None, ff_gemm_dtype=ff_gemm_dtype)
    prep.peers = peer_implementation(impls["attention_maps"])  # who computes the peers' measures

    # attention-side maps (an FF run with full maps also computes every scope, for the component analysis)
    scope_methods = STRUCTURES[structure].scopes if need_ff and full else ()
    attn_methods = [m for m in dict.fromkeys(methods + scope_methods) if form(m, structure).kind not in ("ff", "peer")]
    peer = [m for m in methods if form(m, structure).kind == "peer"]
    maps, alpha = _compute_maps(prep, impls, attn_methods, rows, contract, normalize_rows, want_alpha, peer)

    valid = layer.valid
    nan_pad = torch.where(valid, 0.0, float("nan")).to(prep.dtype)
    value_norms = _value_norms(layer, prep.dtype) * valid[:, None]
    head_maps = {}
    if want_alpha:
        if "attn_w" in methods:
            head_maps["attn_w"] = alpha
        if "attn_n" in methods:  # alpha^h_ij ||f^h(x_j)||, or s1_i ||P1 f^h(x_j)|| alpha^h_ij after a norm after attention
            if prep.p1 is None:
                head_maps["attn_n"] = alpha * value_norms[:, :, None, :]
            else:
                split_norms = _value_norms(layer, prep.dtype, prep.p1) * valid[:, None]
                s1 = prep.s1 if rows is None else prep.s1[:, rows]
                head_maps["attn_n"] = alpha * split_norms[:, :, None, :] * s1[:, None, :, None]
        if "attn_n_prenorm" in methods:  # alpha^h_ij ||f^h(x_j)||, before the norm after attention
            head_maps["attn_n_prenorm"] = alpha * value_norms[:, :, None, :]
    context_change, amp = {}, []
    if need_ff and full:  # from the maps as computed, before any row normalisation
        vis = layer.visible()
        struct = STRUCTURES[structure]
        context_change = {c: contextualization_change(maps[a], maps[b], vis) for c, (a, b) in struct.components.items()}
        amp = ff_amp(maps[struct.ff_amp[0]], maps[struct.ff_amp[1]], vis)
    if normalize_rows and contract is None:  # the primitives normalise rows only inside a contraction
        maps = {m: row_normalize(t) for m, t in maps.items()}
        head_maps = {m: row_normalize(t) for m, t in head_maps.items()}
    result = LayerAttribution(methods=methods, maps={m: maps[m] for m in methods}, ratios={}, value_norms=value_norms,
                              bias_norms={}, completeness={}, model_error=prep.model_error, rows=rows,
                              contracted=contract is not None, head_maps=head_maps, context_change=context_change,
                              ff_amp=amp, backends={**{p: impl.name for p, impl in impls.items()
                                                       if p != "row_stats" or prep.attn.row_stats_ran},
                                                    **({"peers": prep.peers.name} if peer else {})})
    mean_self = prep.alpha_diag.mean(1)
    for m in methods:
        f = form(m, structure)
        if f.kind == "weights":
            share = 0.5 if f.residual else 1.0
            result.ratios[m] = share * (1 - mean_self) + nan_pad
            continue
        if f.kind == "peer":
            peer_result(prep, result, m, nan_pad)
            continue
        total, diag, bias, real = prep.vectors[m]
        result.ratios[m] = vector_ratio(total - diag, diag) + nan_pad
        result.bias_norms[m] = bias.norm(dim=-1) * valid
        if f.kind == "ff":  # an identity for the attention-side vectors; a real test through the FFN's IG split
            result.completeness[m] = _relative_error(total + bias, real, valid)
    if verify:
        from .verify import spot_check

        def rerun(sub_rows, sub_contract):
            sub_maps, _ = _compute_maps(prep, impls, [m for m in methods if form(m, structure).kind not in ("ff", "peer")],
                                        sub_rows, sub_contract, normalize_rows, False, peer)
            return sub_maps

        # TF32 keeps float16's 10-bit mantissa: its products are held to float16's tolerance
        ff_dtype = torch.float16 if ff_gemm_dtype == "tf32" else ff_gemm_dtype
        checked = {**impls, "peers": prep.peers} if peer else impls  # who computed the peers' measures
        result.spot_check = spot_check(layer, result, checked, rerun, k=verify, seed=verify_seed, contract=contract,
                                       normalize_rows=normalize_rows, ig=ig, ig_steps=ig_steps, ff_dtype=ff_dtype)
    return result


def _value_norms(layer: Layer, dtype, split_norm=None) -> Tensor:
    """||f^h(x_j)|| (B, H, N) without an (N, H, D) tensor: ||v W_O^h||^2 = v (W_O^h W_O^h^T) v^T; with
    ``split_norm`` ||P f^h(x_j)||, P its row-independent part (linear, so folded into W_O)."""
    group = layer.n_heads // layer.n_kv_heads
    v = layer.v.to(dtype).repeat_interleave(group, 1)  # (B, H, N, Dh)
    w_o = layer.w_o.to(dtype)
    if split_norm is not None:
        w_o = split_norm.split(w_o)
    gram = w_o @ w_o.transpose(-1, -2)  # (H, Dh, Dh)
    return torch.einsum("bhnd,hde,bhne->bhn", v, gram, v).clamp_min(0).sqrt()
