"""The slow, obvious, materialising reference of every kobattr output, written like the spec.

It builds the (B, N, N, D) pair vectors explicitly (and, for the FF scopes, (N, F) per query row),
so it only fits small inputs. Every backend and benchmark is compared against it.
Spec: shared/spec/methods.md. Row i = query (output) token, column j = key (source) token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ig import ffn_coefficients
from .layer import Layer, LayerInputError
from .methods import COMPONENTS, FF_METHODS, check_methods, contextualization_change, ff_amp, vector_ratio


MAX_PAIR_ELEMENTS = 1 << 31  # the (B, N, N, D) tensors above this would not fit a normal machine


def reference(layer: Layer, methods=None, dtype: torch.dtype = torch.float64, ig: str = "exact",
              ig_steps: int = 20) -> dict:
    """Every output of kobattr for one layer, materialised.

    Returns a dict with
      maps[m]       (B, N, N) layer map of method m (0 where j is invisible from i or i is padding)
      head_maps[m]  (B, H, N, N) for attn_w (alpha) and attn_n (alpha ||f||)
      ratios[m]     (B, N) context-mixing ratio (NaN on padding rows)
      value_norms   (B, H, N) ||f^h(x_j)||
      bias[m]       (B, N, D) the part of row i's vector that goes to no token (vector methods)
      total[m]      (B, N, D) the sum of row i's pair vectors plus its bias (vector methods)
      alpha         (B, H, N, N)
      context_change[c]  (B,) 1 - Spearman of the maps before/after component c (with FF methods)
      ff_amp        top-k (query, key, amplification) pairs per batch element (with FF methods)
    """
    methods = check_methods(methods, layer.placement)
    B, N, D = layer.x.shape
    if B * N * N * D > MAX_PAIR_ELEMENTS:
        raise LayerInputError(f"the reference materialises (B, N, N, D) = ({B}, {N}, {N}, {D}) tensors, too large; "
                              "use kobattr.attribute, which never builds them.")
    L = layer.validate().to(dtype)
    B, H, N, Dh = L.q.shape
    group = H // L.n_kv_heads
    vis = L.visible()  # (B, N, N)
    valid = L.valid
    eye = torch.eye(N, dtype=dtype, device=L.q.device) * vis  # [i == j], 0 on padding

    # alpha^h_ij and f^h(x_j) = v_j W_O^h (b_V is inside v)
    k = L.k.repeat_interleave(group, 1)
    v = L.v.repeat_interleave(group, 1)
    scores = (L.q @ k.transpose(-1, -2)) * L.softmax_scale
    alpha = torch.softmax(scores.masked_fill(~vis[:, None], float("-inf")), -1).nan_to_num(0.0)
    f = torch.einsum("bhjd,hde->bhje", v, L.w_o)  # (B, H, N, D)

    a = torch.einsum("bhij,bhje->bije", alpha, f)  # ATTN-N vectors, (B, N, N, D)
    u = a + eye[..., None] * L.x[:, None, :, :]  # residual x_i goes wholly to cell (i, i)
    b_o = L.out_bias
    attn_out = a.sum(2) + b_o
    y = L.x + attn_out

    vectors, bias = {}, {}
    vectors["attn_n"], bias["attn_n"] = a, b_o.expand_as(attn_out)
    vectors["attnres_n"], bias["attnres_n"] = u, b_o.expand_as(y)
    vectors["atb"], bias["atb"] = u, b_o.expand_as(y)

    # the norm right after the residual: LN1 (post-LN) or LN2 (pre-LN)
    norm = L.ln1 if L.placement == "post" else L.ln2
    inv_s = norm.inv_std(y)[:, :, None, None]
    normed = norm.split(u) * inv_s  # v_ij (post) or g2_i(u_ij) (pre)
    normed_bias = norm.split(b_o)[None, None] * inv_s[..., 0] + norm.bias_vector(L.d_model, y)
    vectors["attnresln_n"], bias["attnresln_n"] = normed, normed_bias
    if L.placement == "post":
        vectors["atb"], bias["atb"] = normed, normed_bias
    else:
        vectors["atbln"], bias["atbln"] = normed, normed_bias

    if any(m in FF_METHODS for m in methods):
        ff_in = normed.sum(2) + normed_bias  # the FFN's real input, from the parts
        coef_in, coef_gate = ffn_coefficients(L.ffn, ff_in, ig, ig_steps)

        def ff_share(part: Tensor, rows: slice | int) -> Tensor:
            """((part W_in) * coef_in + (part W_gate) * coef_gate) W_out for the rows' coefficients."""
            hidden = (part @ L.ffn.w_in) * coef_in[:, rows, None]
            if coef_gate is not None:
                hidden = hidden + (part @ L.ffn.w_gate) * coef_gate[:, rows, None]
            return hidden @ L.ffn.w_out

        # one query row at a time: (B, N, F) pre-activation parts, never (B, N, N, F)
        ff = torch.stack([ff_share(normed[:, i], i) for i in range(N)], 1)  # (B, N, N, D)
        b_in = L.ffn.b_in if L.ffn.b_in is not None else ff_in.new_zeros(L.ffn.w_in.shape[1])
        bias_hidden = (normed_bias @ L.ffn.w_in + b_in) * coef_in
        if coef_gate is not None:
            b_gate = L.ffn.b_gate if L.ffn.b_gate is not None else torch.zeros_like(b_in)
            bias_hidden = bias_hidden + (normed_bias @ L.ffn.w_gate + b_gate) * coef_gate
        ff_bias = bias_hidden @ L.ffn.w_out
        if L.ffn.b_out is not None:
            ff_bias = ff_bias + L.ffn.b_out
        if L.placement == "post":
            res, res_bias = normed + ff, normed_bias + ff_bias
            s2 = L.ln2.inv_std(ff_in + L.ffn(ff_in))[:, :, None, None]  # the true LN2 input
            out = L.ln2.split(res) * s2
            out_bias = L.ln2.split(res_bias) * s2[..., 0] + L.ln2.bias_vector(L.d_model, y)
            for m, vec, bv in (("atbff", ff, ff_bias), ("atbffres", res, res_bias), ("atbffresln", out, out_bias)):
                vectors[m], bias[m] = vec, bv
        else:
            vectors["atblnff"], bias["atblnff"] = ff, ff_bias
            vectors["atblnffres"], bias["atblnffres"] = u + ff, b_o + ff_bias

    rowmask = valid[:, :, None].to(dtype)
    out = dict(maps={}, head_maps={}, ratios={}, bias={}, total={}, alpha=alpha,
               value_norms=f.norm(dim=-1) * valid[:, None].to(dtype))
    diag_alpha = torch.diagonal(alpha, dim1=-2, dim2=-1).mean(1)  # mean_h alpha^h_ii, (B, N)
    nan_pad = torch.where(valid, 0.0, float("nan")).to(dtype)
    for m in methods:
        if m == "attn_w":
            out["maps"][m] = alpha.mean(1)
            out["head_maps"][m] = alpha
            out["ratios"][m] = 1 - diag_alpha + nan_pad
        elif m == "attnres_w":
            out["maps"][m] = 0.5 * alpha.mean(1) + 0.5 * eye
            out["ratios"][m] = 0.5 * (1 - diag_alpha) + nan_pad
        else:
            vec = vectors[m]
            out["maps"][m] = vec.norm(dim=-1)
            if m == "attn_n":
                out["head_maps"][m] = alpha * out["value_norms"][:, :, None, :]
            diag = torch.diagonal(vec, dim1=1, dim2=2).movedim(-1, 1)  # (B, N, D)
            out["ratios"][m] = vector_ratio(vec.sum(2) - diag, diag) + nan_pad
            out["bias"][m] = bias[m] * rowmask
            out["total"][m] = (vec.sum(2) + bias[m]) * rowmask
    if any(m in FF_METHODS for m in methods):
        scope_maps = {m: vec.norm(dim=-1) for m, vec in vectors.items()}
        out["context_change"] = {c: contextualization_change(scope_maps[a], scope_maps[b], vis)
                                 for c, (a, b) in COMPONENTS[L.placement].items()}
        ff_scope = "atbff" if L.placement == "post" else "atblnff"
        before = "atb" if L.placement == "post" else "atbln"
        out["ff_amp"] = ff_amp(scope_maps[before], scope_maps[ff_scope], vis)
    return out
