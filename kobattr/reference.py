"""The slow, obvious, materialising reference of every kobattr output, written like the spec.

It builds the (B, R, N, D) pair vectors explicitly (and, for the FF scopes, (N, F) per query row),
so it only fits small inputs, or a few query rows (``rows=``: the spot checks of kobattr.verify).
Every implementation, test and benchmark is compared against it. Definitions: docs/methods.md.
Row i = query (output) token, column j = key (source) token.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ig import ffn_coefficients
from .layer import Layer, LayerInputError, cap_logits
from .methods import (STRUCTURES, Form, check_methods, contextualization_change, ff_amp, ff_methods, form, row_normalize,
                      vector_ratio)

MAX_PAIR_ELEMENTS = 1 << 31  # the (B, R, N, D) tensors above this would not fit a normal machine


def reference(layer: Layer, methods=None, dtype: torch.dtype = torch.float64, ig: str = "exact",
              ig_steps: int = 20, rows: Optional[Tensor] = None) -> dict:
    """Every output of kobattr for one layer, materialised, for all query rows or only ``rows`` (R,).

    Returns a dict with (R = N without rows)
      maps[m]       (B, R, N) layer map of method m (0 where j is invisible from i or i is padding)
      head_maps[m]  (B, H, R, N) for attn_w (alpha), attn_n and attn_n_prenorm (alpha ||f||, after / before a norm
                    after attention)
      ratios[m]     (B, R) context-mixing ratio (NaN on padding rows)
      value_norms   (B, H, N) ||f^h(x_j)||
      bias[m]       (B, R, D) the part of row i's vector that goes to no token (vector and ff methods)
      total[m]      (B, R, D) the sum of row i's pair vectors plus its bias (vector and ff methods)
      alpha         (B, H, R, N)
      context_change[c]  (B,) 1 - Spearman of the maps before/after component c (FF methods, all rows)
      ff_amp        top-k (query, key, amplification) pairs per batch element (FF methods, all rows)
    """
    methods = check_methods(methods, layer.structure)
    B, N, D = layer.x.shape
    R = N if rows is None else len(rows)
    if B * R * N * D > MAX_PAIR_ELEMENTS:
        raise LayerInputError(f"the reference materialises (B, R, N, D) = ({B}, {R}, {N}, {D}) tensors, too large; "
                              "use kobattr.attribute, which never builds them.")
    return materialise(layer.validate().to(dtype), methods, ig, ig_steps, rows)


def materialise(L: Layer, methods: tuple, ig: str, ig_steps: int, rows: Optional[Tensor],
                with_heads: bool = True, attention_output: Optional[Tensor] = None) -> dict:
    """reference() for a validated layer already in the compute dtype and checked method names;
    without ``with_heads`` the value norms and head maps (another pass over every f^h(x_j)) are left out.
    ``attention_output`` (B, R, D): sum_h o^h_i W_O^h of the rows from the model's own head outputs o^h_i
    (Layer.head_outputs, b_O excluded), the reference computed the model's way: the real hidden states (y, every
    norm's statistic, the FFN input) then read it instead of the sum of the pair vectors, as kobattr.attribute
    does with head_outputs (the spot checks; kobattr.verify checks the head outputs themselves)."""
    structure = L.structure
    struct = STRUCTURES[structure]
    dtype = L.x.dtype
    B, H, N, Dh = L.q.shape
    D = L.d_model
    rows = torch.arange(N, device=L.q.device) if rows is None else torch.as_tensor(rows, device=L.q.device).long()
    R = len(rows)
    full = R == N and torch.equal(rows, torch.arange(N, device=rows.device))
    group = H // L.n_kv_heads
    vis = L.visible(rows)  # (B, R, N)
    valid = L.valid
    eye = (rows[:, None] == torch.arange(N, device=rows.device)[None]).to(dtype) * vis  # [i == j]
    x_rows = L.x[:, rows]
    diagonal = (slice(None), torch.arange(R, device=rows.device), rows)  # cell (i, i) of each returned row i

    # alpha^h_ij and f^h(x_j) = v_j W_O^h (b_V is inside v)
    k = L.k.repeat_interleave(group, 1)
    v = L.v.repeat_interleave(group, 1)
    scores = cap_logits((L.q[:, :, rows] @ k.transpose(-1, -2)) * L.softmax_scale, L.softcap)
    alpha = torch.softmax(scores.masked_fill(~vis[:, None], float("-inf")), -1).nan_to_num(0.0)

    a = torch.empty(B, R, N, D, dtype=dtype, device=L.q.device)  # ATTN-N vectors sum_h alpha^h_ij f^h(x_j)
    value_norms = torch.zeros(B, H, N, dtype=dtype, device=L.q.device)
    p1 = L.attn_out_norm
    split_value_norms = torch.zeros_like(value_norms)  # ||P1 f^h(x_j)|| under a norm after attention
    step = max(1, (1 << 24) // (B * H * D))  # f^h(x_j) (B, keys, H, D) a block at a time, never (B, N, H, D) beside a
    for keys in (slice(s, min(s + step, N)) for s in range(0, N, step)):
        f = torch.einsum("bhjd,hde->bjhe", v[:, :, keys], L.w_o)
        # per key j: (R x H) alpha^h_ij times (H x D) f^h(x_j)
        a[:, :, keys] = (alpha[..., keys].permute(0, 3, 2, 1).to(f.dtype) @ f).transpose(1, 2)
        if with_heads:
            value_norms[..., keys] = f.norm(dim=-1).transpose(1, 2)
            if p1 is not None:
                split_value_norms[..., keys] = p1.split(f.to(dtype)).norm(dim=-1).transpose(1, 2)

    # t_ij: what attention adds to the stream, through the norm after attention with the statistic of the
    # whole attention output a_i + b_O
    b_o = L.out_bias
    a_total = (a.sum(2) if attention_output is None else attention_output) + b_o  # the real attention output
    if p1 is None:
        t, t_bias, s1 = a, b_o.expand_as(a_total), None
    else:
        s1 = p1.inv_std(a_total)  # (B, R)
        t = p1.split(a) * s1[..., None, None]
        t_bias = p1.split(b_o)[None, None] * s1[..., None] + p1.bias_vector(D, a_total)
    u = t.clone()
    u[diagonal] += eye[diagonal][..., None] * x_rows  # the residual x_i goes wholly to cell (i, i)
    y = x_rows + (a_total if p1 is None else p1(a_total))  # = x_i + sum_j t_ij + t_bias without attention_output

    def real_state(spec_form) -> Tensor:
        """The real hidden state (B, R, D) an attention-side vector form's parts plus bias sum to."""
        return y if spec_form.norm is None else getattr(L, spec_form.norm)(y)

    def vector_form(spec_form) -> tuple[Tensor, Tensor]:
        """(pair vectors (B, R, N, D), bias (B, R, D)) of an attention-side vector form."""
        if spec_form.prenorm:  # a_ij before the norm after attention
            return a, b_o.expand_as(a_total)
        vec, bias = (u if spec_form.residual else t), t_bias
        if spec_form.norm is not None:
            norm = getattr(L, spec_form.norm)
            inv_s = norm.inv_std(y)[:, :, None]  # statistic of the whole real norm input y_i
            vec = norm.split(vec) * inv_s[..., None]
            bias = norm.split(bias) * inv_s + norm.bias_vector(L.d_model, y)
        return vec, bias

    vectors, bias = {}, {}
    for m in methods + (struct.scopes if ff_methods(methods, structure) and full else ()):
        spec_form = form(m, structure)
        if spec_form.kind == "vector":
            vectors[m], bias[m] = vector_form(spec_form)

    if ff_methods(methods, structure):
        if struct.ff_input is not None:  # the FFN reads the sum of these pairs
            normed, normed_bias = vector_form(form(struct.ff_input, structure))
            ff_in = real_state(form(struct.ff_input, structure))  # the FFN's real input
        else:  # parallel: the FFN reads ln2(x_i), token i alone, all in cell (i, i)
            ln2 = L.ln2
            normed = torch.zeros_like(a)
            if ln2 is None:
                normed[diagonal] = x_rows * eye[diagonal][..., None]
                normed_bias = torch.zeros_like(x_rows)
            else:
                normed[diagonal] = ln2.split(x_rows) * ln2.inv_std(x_rows)[..., None] * eye[diagonal][..., None]
                normed_bias = ln2.bias_vector(D, x_rows).expand_as(x_rows)
            ff_in = normed.sum(2) + normed_bias
        coef_in, coef_gate = ffn_coefficients(L.ffn, ff_in, ig, ig_steps)

        def ff_share(part: Tensor, r: int) -> Tensor:
            """((part W_in) * coef_in + (part W_gate) * coef_gate) W_out for row r's coefficients."""
            hidden = (part @ L.ffn.w_in) * coef_in[:, r, None]
            if coef_gate is not None:
                hidden = hidden + (part @ L.ffn.w_gate) * coef_gate[:, r, None]
            return hidden @ L.ffn.w_out

        # one query row at a time: (B, N, F) pre-activation parts, never (B, R, N, F)
        ff = torch.stack([ff_share(normed[:, r], r) for r in range(len(rows))], 1)  # (B, R, N, D)
        b_in = L.ffn.b_in if L.ffn.b_in is not None else ff_in.new_zeros(L.ffn.w_in.shape[1])
        bias_hidden = (normed_bias @ L.ffn.w_in + b_in) * coef_in
        if coef_gate is not None:
            b_gate = L.ffn.b_gate if L.ffn.b_gate is not None else torch.zeros_like(b_in)
            bias_hidden = bias_hidden + (normed_bias @ L.ffn.w_gate + b_gate) * coef_gate
        ff_bias = bias_hidden @ L.ffn.w_out
        if L.ffn.b_out is not None:
            ff_bias = ff_bias + L.ffn.b_out
        p2 = L.ffn_out_norm
        if p2 is not None:  # the norm after the FFN, with the statistic of the whole real FFN output
            s2 = p2.inv_std(L.ffn(ff_in))[:, :, None]
            ff = p2.split(ff) * s2[..., None]
            ff_bias = p2.split(ff_bias) * s2 + p2.bias_vector(D, y)
        # the residual stream the FFN output is added to
        stream, stream_bias = vector_form(form(struct.ff_stream, structure))
        res, res_bias = stream + ff, stream_bias + ff_bias
        scope_vectors = [(ff, ff_bias), (res, res_bias)]
        if struct.out_norm is not None:
            out_norm = getattr(L, struct.out_norm)
            real_ff = L.ffn(ff_in) if p2 is None else p2(L.ffn(ff_in))
            s3 = out_norm.inv_std(real_state(form(struct.ff_stream, structure)) + real_ff)[:, :, None]  # its true input
            scope_vectors.append((out_norm.split(res) * s3[..., None],
                                  out_norm.split(res_bias) * s3 + out_norm.bias_vector(L.d_model, y)))
        for m in struct.scopes:
            spec_form = form(m, structure)
            if spec_form.kind == "ff":
                vectors[m], bias[m] = scope_vectors[spec_form.ff_scope]

    rowmask = valid[:, rows, None].to(dtype)
    out = dict(maps={}, head_maps={}, ratios={}, bias={}, total={}, alpha=alpha,
               value_norms=value_norms * valid[:, None].to(dtype))
    diag_alpha = (alpha * eye[:, None]).sum(-1).mean(1)  # mean_h alpha^h_ii, (B, R)
    nan_pad = torch.where(valid[:, rows], 0.0, float("nan")).to(dtype)
    for m in methods:
        spec_form = form(m, structure)
        if spec_form.kind == "peer":  # the peers' measures (spec section 10)
            out["maps"][m] = peer_map(L, spec_form, vector_form, a, y, x_rows, vis, alpha, rows, a_total)
            if spec_form.target is not None:  # ALTI: the parts T_i(x_j) and the bias sum to the block output
                parts, parts_bias = vector_form(Form("vector", True, spec_form.target, spec_form.norm))
                out["bias"][m], out["total"][m] = parts_bias * rowmask, (parts.sum(2) + parts_bias) * rowmask
            total = out["maps"][m].sum(-1)
            share = 1 - out["maps"][m][diagonal] / torch.where(total > 0, total, torch.ones_like(total))
            out["ratios"][m] = torch.where(total > 0, share, torch.zeros_like(share)) + nan_pad
            continue
        if spec_form.kind == "weights":
            share = 0.5 if spec_form.residual else 1.0  # ATTNRES-W: 0.5 mean_h A + 0.5 I
            out["maps"][m] = share * alpha.mean(1) + (1 - share) * eye
            out["ratios"][m] = share * (1 - diag_alpha) + nan_pad
        else:
            vec = vectors[m]
            out["maps"][m] = vec.norm(dim=-1)
            diag = vec[diagonal] * eye[diagonal][..., None]  # (B, R, D): the vector of cell (i, i)
            out["ratios"][m] = vector_ratio(vec.sum(2) - diag, diag) + nan_pad
            out["bias"][m] = bias[m] * rowmask
            out["total"][m] = (vec.sum(2) + bias[m]) * rowmask
        if with_heads and m == "attn_w":
            out["head_maps"][m] = alpha
        elif with_heads and m == "attn_n":  # alpha^h_ij times the norm of head h's vector as it reaches the stream
            out["head_maps"][m] = (alpha * out["value_norms"][:, :, None, :] if p1 is None else
                                   alpha * split_value_norms[:, :, None, :] * s1[:, None, :, None] * valid[:, None, None, :])
        elif with_heads and m == "attn_n_prenorm":  # alpha^h_ij ||f^h(x_j)||, before the norm after attention
            out["head_maps"][m] = alpha * out["value_norms"][:, :, None, :]
    if ff_methods(methods, structure) and full:
        scope_maps = {m: vec.norm(dim=-1) for m, vec in vectors.items()}
        out["context_change"] = {c: contextualization_change(scope_maps[before], scope_maps[after], vis)
                                 for c, (before, after) in struct.components.items()}
        out["ff_amp"] = ff_amp(scope_maps[struct.ff_amp[0]], scope_maps[struct.ff_amp[1]], vis)
    return out


def peer_map(L: Layer, spec_form: Form, vector_form, a: Tensor, y: Tensor, x_rows: Tensor, vis: Tensor, alpha: Tensor,
             rows: Tensor, a_total: Tensor) -> Tensor:
    """(B, R, N) a peers' measure (spec section 10), materialised for the query rows ``rows``: ``vector_form`` gives a
    vector form's pair vectors (B, R, N, D), ``a`` holds sum_h alpha^h_ij f^h(x_j) (B, R, N, D), ``y`` the stream
    x_i + attention (B, R, D), ``alpha`` (B, H, R, N), ``a_total`` the real attention output a_i + b_O (B, R, D:
    materialise's, the model's with attention_output)."""
    measure = spec_form.measure
    if measure in ("alti", "alti_l2"):
        block = form("alti", L.structure)  # the block ALTI decomposes (a rollout's own form names none)
        T, _ = vector_form(Form("vector", True, block.target, block.norm))  # T_i(x_j)
        out = y if block.norm is None else getattr(L, block.norm)(y)  # the real block output y_i
        p = 2 if measure == "alti_l2" else 1
        distance = (out[:, :, None] - T).double().norm(p=p, dim=-1)
        contribution = (out.double().norm(p=p, dim=-1)[..., None] - distance).clamp_min(0) * vis
        return row_normalize(contribution).to(y.dtype)
    if measure == "globenc":
        part, _ = vector_form(Form("vector", True, "mid", "ln1"))  # the ATTNRES-LN part, no bias
        mid = L.ln1(y)
        inv_s2 = L.ln2.inv_std(mid + L.ffn(mid))  # LN2's real input: the FFN output included
        return (L.ln2.split(part) * inv_s2[..., None, None]).norm(dim=-1) * vis
    if measure == "value_zeroing":
        from dataclasses import replace

        rest = replace(L, x=x_rows)
        full = a_total  # row i's attention output
        real = rest.stream(full)["out"]
        def unit(v):
            return v.double() / v.double().norm(dim=-1, keepdim=True)

        # 1 - cos(z, o) = ||z / |z| - o / |o|||^2 / 2 (no cancellation for nearly parallel vectors), one zeroed key at a time
        distance = torch.stack([(unit(rest.stream(full - a[:, :, j])["out"]) - unit(real)).pow(2).sum(-1) / 2
                                for j in range(a.shape[2])], -1)
        return row_normalize(distance * vis).to(y.dtype)
    if measure == "flow_attn":
        # every (key j, head h) part alpha^h_ij f^h(x_j) (through the norm after attention), and the residual x_i
        B, H, R, N = alpha.shape
        f = torch.einsum("bhjd,hde->bjhe", L.v.repeat_interleave(H // L.n_kv_heads, 1), L.w_o)  # (B, N, H, D)
        parts = alpha.permute(0, 2, 3, 1)[..., None] * f[:, None]  # (B, R, N, H, D)
        if L.attn_out_norm is not None:
            s1 = L.attn_out_norm.inv_std(a_total)
            parts = L.attn_out_norm.split(parts) * s1[..., None, None, None]
        y_norm = y.abs().sum(-1)
        prox = (y_norm[..., None, None] - (y[:, :, None, None] - parts).abs().sum(-1)).clamp_min(1e-5)  # (B, R, N, H)
        prox = prox * L.valid[:, None, :, None]  # padded keys have no parts
        res = (y_norm - (y - x_rows).abs().sum(-1)).clamp_min(1e-5)  # the residual part
        token = prox.sum(-1)
        token[:, torch.arange(R), rows] += res  # the residual edge joins the attention edge (i, i)
        return token / (prox.sum((2, 3)) + res)[..., None] * L.valid[:, rows, None]
    raise ValueError(f"no reference for the peers' measure {measure!r}.")


def cross_alti_reference(cross, placement: str, dtype: torch.dtype = torch.float64, rows: Optional[Tensor] = None,
                         attention_output: Optional[Tensor] = None) -> dict:
    """ALTI of a decoder's cross block with its residual (ALTI+, spec section 10), materialised for the target rows
    ``rows`` (R; None: all T): the (B, R, S + 1, D) parts T_i(e_j) = g_i(c_ij) (source j) and T_i(p) = g_i(p_i)
    (column S), g_i = LN_c with row i's statistic post-LN and nothing pre-LN, each compared in L1 with the block's
    output (post: LN_c(y_i); pre: y_i). ``attention_output`` (B, R, D) stands for sum_j c_ij in y_i, as in
    kobattr.seq2seq.cross_reference.

    Returns {"map": (B, R, S + 1) rows normalised to sum 1, "parts": (B, R, S + 1, D), "bias": (B, R, D) (post: g_i(b_Oc)
    + beta; pre: b_Oc), "total": parts summed plus bias (B, R, D), "real": the block output (B, R, D)}."""
    if placement not in ("post", "pre"):
        raise LayerInputError(f"a decoder layer's placement is 'post' or 'pre', got {placement!r}.")
    L = cross.validate().to(dtype)
    B, H, T, _ = L.q.shape
    S, D = L.source_len, L.d_model
    rows = torch.arange(T, device=L.q.device) if rows is None else torch.as_tensor(rows, device=L.q.device).long()
    if B * len(rows) * (S + 1) * D > MAX_PAIR_ELEMENTS:
        raise LayerInputError(f"cross_alti_reference materialises (B, R, S + 1, D) = ({B}, {len(rows)}, {S + 1}, {D}) "
                              "tensors, too large; use kobattr.seq2seq.attribute_cross.")
    c = torch.einsum("bhrs,bshd->brsd", L.alpha(rows), L.value_vectors())  # c_ij
    p = L.p[:, rows]
    parts = torch.cat([c, p[:, :, None]], 2)  # the residual is one more part
    b_o = L.out_bias
    y = p + (c.sum(2) if attention_output is None else attention_output) + b_o
    if placement == "post":
        g = L.norm
        inv_s = g.inv_std(y)
        parts = g.split(parts) * inv_s[..., None, None]
        bias, real = g.split(b_o) * inv_s[..., None] + g.bias_vector(D, y), g(y)
    else:
        bias, real = b_o.expand_as(y), y
    visible = torch.cat([L.visible(rows), L.targets[:, rows, None]], -1)  # the residual column on every real row
    distance = (real[:, :, None] - parts).abs().sum(-1)
    contribution = (real.abs().sum(-1)[..., None] - distance).clamp_min(0) * visible
    return dict(map=row_normalize(contribution), parts=parts, bias=bias, total=parts.sum(2) + bias, real=real)


def alti_plus_reference(encoder_maps: Tensor, self_maps: Tensor, cross_maps: Tensor) -> Tensor:
    """ALTI+ written as its authors' loop (spec section 10), one pair at a time: the encoder's per-layer ALTI maps
    (Le, B, S, S) rolled out (R = C^Le ... C^1), each decoder layer's joint map over [source; target prefix]
    ([C_cross[:, :S] R, C_self * C_cross[:, S]]) and the decoder rollout of those rows, every row renormalised after
    the first layer. Returns (L, B, T, T + S) in kobattr's column order, target columns first."""
    L, B, T, _ = self_maps.shape
    S = encoder_maps.shape[-1]
    out = torch.zeros(L, B, T, T + S, dtype=torch.float64)
    for b in range(B):
        enc = encoder_maps[0, b].double()
        for layer in encoder_maps[1:, b].double():
            enc = layer @ enc
        previous = None
        for li in range(L):
            cross, own = cross_maps[li, b].double(), self_maps[li, b].double()
            joint = torch.cat([cross[:, :S] @ enc, own * cross[:, S:]], -1)  # [source; target], as the authors'
            if previous is not None:
                rolled = torch.zeros_like(joint)
                for i in range(T):
                    for k in range(T):  # target token k passes on what its previous-layer row held
                        rolled[i] += joint[i, S + k] * previous[k]
                    rolled[i, :S] += joint[i, :S]
                total = rolled.sum(-1, keepdim=True)
                joint = torch.where(total > 0, rolled / torch.where(total > 0, total, 1.0), 0.0)
            previous = joint
            out[li, b] = torch.cat([joint[:, S:], joint[:, :S]], -1)
    return out
