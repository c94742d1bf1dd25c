"""Materialising fp64 oracle of the two backend primitives (kobattr/backends/base.py), for kernel tests.

Builds every (i, j) vector explicitly: only for small shapes. The method-level reference that ties
these primitives to the papers' definitions is kobattr.reference.
"""

import torch

from kobattr.backends.base import Attention, FFParts, visible_block


def _logits(attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """((B, H, N, N) float64 capped logits cap(scale q^h_i . k_j), -inf where j is invisible from i; (B, N, N) vis)."""
    q, k = attn.q.double(), attn.k.double()
    B, H, N, _ = q.shape
    k = k.repeat_interleave(H // k.shape[1], 1)
    idx = torch.arange(N, device=q.device)
    vis = visible_block(attn, idx, idx)  # (B, N, N)
    s = (q @ k.transpose(-1, -2)) * attn.scale
    if attn.softcap:  # Gemma 2's logit soft-capping, before masking
        s = attn.softcap * torch.tanh(s / attn.softcap)
    return s.masked_fill(~vis[:, None], float("-inf")), vis


def oracle_kappa(attn: Attention) -> torch.Tensor:
    """(B, N, N, H+1) float64: alpha^h_ij for h < H and [i == j] in the last slot; 0 where invisible."""
    s, vis = _logits(attn)
    B, N = vis.shape[:2]
    alpha = torch.softmax(s, -1).nan_to_num(0.0)  # (B, H, N, N)
    eye = torch.eye(N, dtype=torch.float64, device=vis.device).expand(B, N, N) * vis
    return torch.cat([alpha.permute(0, 2, 3, 1), eye[..., None]], -1), vis


def oracle_row_lse(attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """The row_stats primitive: ((B, H, N) float64 log sum_j exp(cap(scale q^h_i . k_j)) over the keys visible
    from i, (B, H, N) bool: the rows that see at least one key, the only ones the primitive defines)."""
    s, vis = _logits(attn)
    return torch.logsumexp(s, -1), vis.any(-1)[:, None].expand(s.shape[:3])


def _finish(maps, vis, rows, weights, normalize_rows):
    """maps (B, M, N, N) -> the requested output mode: the rows ``rows`` (all without), or with weights
    (B, K, N) their contraction sum_r weights[b, k, rows[r]] map[b, m, rows[r], j]."""
    maps = maps * vis[:, None]
    if rows is not None:
        maps = maps[:, :, rows]
    if weights is None:
        return maps
    if normalize_rows:
        sums = maps.sum(-1, keepdim=True)
        maps = torch.where(sums > 0, maps / sums.clamp_min(1e-300), torch.zeros_like(maps))
    weights = weights.double() if rows is None else weights.double()[:, :, rows]
    return torch.einsum("bkr,bmrj->bmkj", weights, maps)


def oracle_attention_maps(attn, grams, row_scale, rows=None, weights=None, normalize_rows=False):
    kappa, vis = oracle_kappa(attn)
    quad = torch.einsum("bijr,bjmrs,bijs->bmij", kappa, grams.double(), kappa).clamp_min(0)
    maps = quad.sqrt() * row_scale.double().permute(0, 2, 1)[..., None]
    return _finish(maps, vis, rows, weights, normalize_rows)


def oracle_alpha(attn, rows=None):
    kappa, _ = oracle_kappa(attn)
    alpha = kappa[..., :-1].permute(0, 3, 1, 2)
    return alpha if rows is None else alpha[:, :, rows]


def scrambled_layout(t):
    """``t`` (B, N, M, ...) with the same values, stored with axes 1 and 2 swapped (and, for the Gram
    matrices, their rows and columns): a kernel that read the storage as if it were contiguous would take
    another key's or method's values."""
    order = [0, 2, 1, *range(3, t.dim())]
    if t.dim() == 5:
        order[3:] = [4, 3]
    return t.permute(order).contiguous().permute(order)  # each swap is its own inverse


def oracle_ff_maps(attn, p: FFParts, rows=None, weights=None, normalize_rows=False):
    kappa, vis = oracle_kappa(attn)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    pre = torch.einsum("bijr,bjrf->bijf", kappa, d(p.ff_parts)) * d(p.in_scale)[:, :, None, None]
    hidden = pre * d(p.coef_in)[:, :, None]
    if p.gate_parts is not None:
        gate = torch.einsum("bijr,bjrf->bijf", kappa, d(p.gate_parts)) * d(p.in_scale)[:, :, None, None]
        hidden = hidden + gate * d(p.coef_gate)[:, :, None]
    ff = hidden @ d(p.w_out)
    res = torch.einsum("bijr,bjrd->bijd", kappa, d(p.res_parts)) * d(p.res_scale)[:, :, None, None]
    total = res + ff
    scopes = [ff.norm(dim=-1), total.norm(dim=-1)]
    if p.n_scopes == 3:
        centred = total - total.mean(-1, keepdim=True) if p.out_center else total
        if p.out_weight is not None:
            centred = centred * d(p.out_weight)
        scopes.append(centred.norm(dim=-1) * d(p.out_scale)[:, :, None])
    return _finish(torch.stack(scopes, 1), vis, rows, weights, normalize_rows)


def random_attention(B=2, H=4, KV=2, N=7, Dh=16, causal=False, window=0, pad=0, dtype=torch.float32, seed=0,
                     radius=0, softcap=0.0, logit_std=1.0):
    """A random attention pattern; the last ``pad`` tokens of batch element 0 are padding. The scaled
    logits have standard deviation ``logit_std`` (the scale is logit_std / sqrt(Dh)): several times the
    soft-cap, capping changes alpha clearly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, Dh, generator=g).to(dtype)
    k = torch.randn(B, KV, N, Dh, generator=g).to(dtype)
    valid = torch.ones(B, N, dtype=torch.bool)
    if pad:
        valid[0, N - pad:] = False
    return Attention(q=q, k=k, valid=valid, causal=causal, window=window, scale=logit_std * Dh ** -0.5,
                     radius=radius, softcap=softcap)


def random_grams(B, N, M, H, seed=1):
    """PSD Gram matrices (B, N, M, H+1, H+1), distinct for every key and method, and positive row scales
    (B, N, M)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, N, M, H + 1, 8, generator=g)
    return U @ U.transpose(-1, -2), torch.rand(B, N, M, generator=g) + 0.5


def random_ff_parts(B, N, H, D=16, F=32, gated=False, n_scopes=3, center=True, seed=2):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pos = lambda *s: torch.rand(*s, generator=g) + 0.5  # noqa: E731
    return FFParts(
        ff_parts=r(B, N, H + 1, F), gate_parts=r(B, N, H + 1, F) if gated else None,
        res_parts=r(B, N, H + 1, D), in_scale=pos(B, N), res_scale=pos(B, N), out_scale=pos(B, N),
        coef_in=r(B, N, F), coef_gate=r(B, N, F) if gated else None, w_out=r(F, D) / F ** 0.5,
        out_weight=r(D) if n_scopes == 3 else None, out_center=center, n_scopes=n_scopes,
    )
