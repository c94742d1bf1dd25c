"""The methods kobattr computes, their names, and the small helpers every implementation shares.

| name         | paper                   | map (row i = query, column j = key)            |
|--------------|-------------------------|------------------------------------------------|
| attn_w       | Clark et al. 2019       | mean_h alpha^h_ij                              |
| attnres_w    | Kobayashi et al. 2021   | 0.5 mean_h alpha^h_ij + 0.5 [i == j]           |
| attn_n       | Kobayashi et al. 2020   | ||sum_h alpha^h_ij f^h(x_j)||                  |
| attnres_n    | Kobayashi et al. 2021   | ||u_ij||, u_ij = attn part + [i == j] x_i       |
| attnresln_n  | Kobayashi et al. 2021   | ||g_i(u_ij)||, g from the norm after the residual (LN1 post-LN, LN2 pre-LN) |
| atb...       | Kobayashi et al. 2024   | the FF scopes (post-LN: atb, atbff, atbffres, atbffresln; pre-LN: atb, atbln, atblnff, atblnffres) |
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHT_METHODS = ("attn_w", "attnres_w")
ATTENTION_METHODS = WEIGHT_METHODS + ("attn_n", "attnres_n", "attnresln_n")
POST_LN_SCOPES = ("atb", "atbff", "atbffres", "atbffresln")
PRE_LN_SCOPES = ("atb", "atbln", "atblnff", "atblnffres")
FF_METHODS = ("atbff", "atbffres", "atbffresln", "atblnff", "atblnffres")
HEAD_METHODS = ("attn_w", "attn_n")
DEFAULT_METHODS = ("attn_w", "attn_n", "attnres_n", "attnresln_n")

# contextualization change of a component: (map before, map after), spec section 4
COMPONENTS = {
    "post": {"ff": ("atb", "atbff"), "res": ("atbff", "atbffres"), "ln": ("atbffres", "atbffresln")},
    "pre": {"ln": ("atb", "atbln"), "ff": ("atbln", "atblnff"), "res": ("atblnff", "atblnffres")},
}


def methods_for(placement: str) -> tuple[str, ...]:
    scopes = POST_LN_SCOPES if placement == "post" else PRE_LN_SCOPES
    return ATTENTION_METHODS + tuple(s for s in scopes if s not in ATTENTION_METHODS)


def check_methods(methods, placement: str) -> tuple[str, ...]:
    """Normalise a method list ("all", a name, or names) for a layer placement, or raise ValueError."""
    available = methods_for(placement)
    if methods is None:
        return DEFAULT_METHODS
    if isinstance(methods, str):
        methods = available if methods == "all" else (methods,)
    methods = tuple(dict.fromkeys(m.lower().replace("-", "_") for m in methods))
    for m in methods:
        if m not in available:
            other = "pre" if placement == "post" else "post"
            hint = f" ({m} is defined for {other}-LN layers)" if m in methods_for(other) else ""
            raise ValueError(f"unknown method {m!r} for a {placement}-LN layer{hint}; choose from {', '.join(available)} or 'all'.")
    if not methods:
        raise ValueError("no methods requested.")
    return methods


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
