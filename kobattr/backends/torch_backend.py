"""The streaming PyTorch backend: the pair primitives of base.py in query blocks (CPU or CUDA).

A query block holds full rows of alpha, (B, H, block, N), so the softmax needs no second pass.
Attention maps evaluate kappa^T G_j kappa per pair (H^2 work, no D); FF maps build the
(block, key block, F) pre-activation parts from the per-key parts and reduce the GEMM with W_out
to norms right away. Block sizes keep every intermediate under ``budget`` elements and blocks
under max(N / 8, 32) rows and keys, so from N = 256 on no intermediate comes near N * N * D.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..layer import cap_logits
from .base import Attention, Backend, FFParts, visible_block

DEFAULT_BUDGET = 1 << 23  # elements per intermediate (32 MiB in fp32)


def _blocks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def block_scores(attn: Attention, rows: Tensor, dtype: torch.dtype, cols: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(logits (B, H, R, C), -inf where invisible; visible (B, R, C)) of the query rows ``rows`` against the
    keys ``cols`` (None: all), in ``dtype``."""
    q = attn.q[:, :, rows].to(dtype)
    k = attn.k.to(dtype) if cols is None else attn.k[:, :, cols].to(dtype)
    B, H, R, Dh = q.shape
    KV = k.shape[1]
    # GQA without copying K: group the query heads that share a KV head
    scores = cap_logits((q.view(B, KV, H // KV * R, Dh) @ k.transpose(-1, -2)).view(B, H, R, -1) * attn.scale, attn.softcap)
    vis = visible_block(attn, rows, torch.arange(attn.k.shape[2], device=k.device) if cols is None else cols)
    return scores.masked_fill(~vis[:, None], float("-inf")), vis


def block_alpha(attn: Attention, rows: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(alpha (B, H, R, N), visible (B, R, N)) for the query rows ``rows``, in ``dtype``."""
    scores, vis = block_scores(attn, rows, dtype)
    return torch.softmax(scores, -1).nan_to_num(0.0), vis


def kappa_diag_mask(rows: Tensor, cols: Tensor, vis: Tensor) -> Tensor:
    """(B, R, C) [i == j] for visible pairs: the residual coefficient."""
    return (rows[:, None] == cols[None, :])[None] & vis


class _Output:
    """Collects block results as rows of a map or as a weighted contraction."""

    def __init__(self, lead: tuple, n_rows: int, n_cols: int, weights: Optional[Tensor], normalize_rows: bool,
                 dtype, device):
        self.weights, self.normalize_rows = weights, normalize_rows
        shape = lead + ((weights.shape[1] if weights is not None else n_rows), n_cols)
        self.out = torch.zeros(shape, dtype=dtype, device=device)

    def add(self, block: Tensor, rows: Tensor, start: int, stop: int) -> None:
        """block: (B, M, r, N) map rows ``rows`` (positions start:stop of the requested rows)."""
        if self.weights is None:
            self.out[:, :, start:stop] = block
            return
        if self.normalize_rows:
            sums = block.sum(-1, keepdim=True)
            block = torch.where(sums > 0, block / torch.where(sums > 0, sums, torch.ones_like(sums)), 0.0)
        self.out += torch.einsum("bkr,bmrn->bmkn", self.weights[:, :, rows].to(block.dtype), block)


class TorchBackend(Backend):
    name = "torch"
    primitives = ("attention_maps", "ff_maps", "row_stats")
    ff_gemm_dtypes = (None, torch.bfloat16)  # attribute(ff_gemm="bfloat16"): the W_2 product in bfloat16

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget

    @staticmethod
    def compute_dtype(attn: Attention) -> torch.dtype:
        return torch.float64 if attn.q.dtype == torch.float64 else torch.float32

    @staticmethod
    def _rows(attn: Attention, rows: Optional[Tensor]) -> Tensor:
        return torch.arange(attn.q.shape[2], device=attn.q.device) if rows is None else rows.to(attn.q.device)

    def row_lse(self, attn):
        return self._lse(attn, self._rows(attn, None), self.compute_dtype(attn))

    def _lse(self, attn, rows: Tensor, dtype) -> Tensor:
        """(B, H, R) natural-log row log-sum-exp of the query rows ``rows``, in query blocks within the budget."""
        B, H, N, _ = attn.q.shape
        lse = torch.empty(B, H, len(rows), dtype=dtype, device=attn.q.device)
        size = max(1, min(len(rows), self.budget // max(1, B * H * N)))
        for start, stop in _blocks(len(rows), size):
            scores, _ = block_scores(attn, rows[start:stop], dtype)
            lse[:, :, start:stop] = torch.logsumexp(scores, -1)
        return lse

    def attention_maps(self, attn, grams, row_scale, rows=None, weights=None, normalize_rows=False, want_alpha=False):
        dtype = self.compute_dtype(attn)
        B, H, N, _ = attn.q.shape
        M = grams.shape[2]
        rows = self._rows(attn, rows)
        grams, row_scale = grams.to(dtype), row_scale.to(dtype)
        # per key j one (H, M * H) matrix, so a block is one batched matmul over keys
        g_heads = grams[..., :H, :H].permute(0, 1, 3, 2, 4).reshape(B * N, H, M * H).contiguous()
        g_cross = grams[..., :H, H]  # (B, N, M, H): alpha-residual cross terms
        g_self = grams[..., H, H]  # (B, N, M)
        result = _Output((B, M), len(rows), N, weights, normalize_rows, dtype, attn.q.device)
        alphas = torch.zeros(B, H, len(rows), N, dtype=dtype, device=attn.q.device) if want_alpha else None
        size = max(1, min(self.budget // max(1, B * N * H * M), max(N // 8, 32)))
        cols = torch.arange(N, device=attn.q.device)
        keep_lse = attn.row_lse is None and len(rows) == N and torch.equal(rows, cols)  # every row: keep statistics
        lse = torch.empty(B, H, N, dtype=dtype, device=attn.q.device) if keep_lse else None
        for start, stop in _blocks(len(rows), size):
            r = rows[start:stop]
            scores, vis = block_scores(attn, r, dtype)
            alpha = torch.softmax(scores, -1).nan_to_num(0.0)  # (B, H, R, N); rows seeing no key: 0
            if keep_lse:
                lse[:, :, start:stop] = torch.logsumexp(scores, -1)
            R = len(r)
            a = alpha.permute(0, 3, 2, 1).reshape(B * N, R, H).contiguous()  # per key, the rows' head coefficients
            ga = torch.bmm(a, g_heads).view(B, N, R, M, H)
            quad = (ga * a.view(B, N, R, 1, H)).sum(-1).permute(0, 3, 2, 1)  # (B, M, R, N)
            # the residual row of kappa: [i == j] (2 alpha^T G[:, H] + G[H, H]) on the diagonal
            diag = kappa_diag_mask(r, cols, vis)  # (B, R, N)
            b_idx, r_idx, j_idx = diag.nonzero(as_tuple=True)
            extra = 2 * torch.einsum("nh,nmh->nm", alpha[b_idx, :, r_idx, j_idx], g_cross[b_idx, j_idx]) + g_self[b_idx, j_idx]
            quad[b_idx, :, r_idx, j_idx] += extra
            maps = quad.clamp_min(0).sqrt() * row_scale[:, r].permute(0, 2, 1)[..., None] * vis[:, None]
            result.add(maps, r, start, stop)
            if want_alpha:
                alphas[:, :, start:stop] = alpha
        if keep_lse:
            attn.row_lse = lse
        return result.out, alphas

    def ff_maps(self, attn, parts: FFParts, rows=None, weights=None, normalize_rows=False):
        """Key blocks outermost: each block's per-key parts are made once (FFParts.block), then every query
        block pairs with it, alpha coming from the row log-sum-exp. Peak memory: one key block's parts and
        one (B, R, C, max(F, D)) tile, whatever N is. A contraction of normalised rows takes a first pass
        for the row sums."""
        dtype = self.compute_dtype(attn)
        B, H, N, _ = attn.q.shape
        rows = self._rows(attn, rows)
        p = {k: (v.to(dtype) if isinstance(v, Tensor) else v) for k, v in vars(parts).items()
             if k not in ("ff_parts", "gate_parts", "res_parts")}
        F, D = parts.w_out.shape
        S = parts.n_scopes
        lse = self._lse(attn, rows, dtype)  # (B, H, R)
        # a (query block x key block) tile holds (B, R, C, max(F, D)) elements, within half the budget: the
        # default's 16 MiB tiles stay in a server's L3 between the FFN's two products (0.67 -> 0.8 of sgemm)
        pair_budget = max(1, self.budget // (2 * B * max(F, D)))
        row_size = max(1, min(len(rows), int(pair_budget ** 0.5), max(N // 8, 32)))
        col_size = max(1, min(pair_budget // row_size, max(N // 8, 32)))
        cols_all = torch.arange(N, device=attn.q.device)
        w_out_gemm = p["w_out"] if parts.gemm_dtype in (None, dtype) else p["w_out"].to(parts.gemm_dtype)

        def tile(r0, r1, c0, c1, key_parts) -> Tensor:
            """(B, S, R, C) scope norms of query rows rows[r0:r1] against keys c0:c1. The pair tensors are key-major,
            (B, C, R, ...): the per-key products then write their outputs contiguously, and the (B C R, F) view
            for W_out needs no copy."""
            r, cols = rows[r0:r1], cols_all[c0:c1]
            ff_p, gate_p, res_p = (None if t is None else t.to(dtype) for t in key_parts)
            scores, vis = block_scores(attn, r, dtype, cols)
            alpha = torch.exp(scores - lse[:, :, r0:r1, None]).nan_to_num(0.0) * vis[:, None]  # (B, H, R, C)
            diagonal = kappa_diag_mask(r, cols, vis).transpose(1, 2).to(dtype)[..., None]
            kappa = torch.cat([alpha.permute(0, 3, 2, 1), diagonal], -1)  # (B, C, R, H+1)
            in_scale = p["in_scale"][:, None, r, None]
            # in place: the (B, C, R, F) tiles are the largest temporaries
            hidden = (kappa @ ff_p).mul_(in_scale * p["coef_in"][:, None, r])
            if gate_p is not None:
                hidden += (kappa @ gate_p).mul_(in_scale * p["coef_gate"][:, None, r])
            # one (B C R, F) @ (F, D) product: a 4-D @ 2-D matmul would run as C small batched ones; with the
            # opt-in gemm_dtype its inputs are rounded and its sums stay float32 (oneDNN, cuBLAS); .to() of the
            # dtype a tensor already has returns it, copying nothing
            ff = (hidden.view(-1, F).to(w_out_gemm.dtype) @ w_out_gemm).to(dtype).view(B, c1 - c0, r1 - r0, D)
            del hidden
            total = ff + (kappa @ res_p).mul_(p["res_scale"][:, None, r, None])
            block = torch.empty(B, S, c1 - c0, r1 - r0, dtype=dtype, device=attn.q.device)
            block[:, 0] = ff.norm(dim=-1)
            block[:, 1] = total.norm(dim=-1)
            if S == 3:
                if parts.out_center:
                    total -= total.mean(-1, keepdim=True)
                if p["out_weight"] is not None:
                    total *= p["out_weight"]
                block[:, 2] = total.norm(dim=-1) * p["out_scale"][:, None, r]
            return block.transpose(-1, -2) * vis[:, None]

        def each_tile():
            for c0, c1 in _blocks(N, col_size):
                if not visible_block(attn, rows, cols_all[c0:c1]).any():
                    continue  # causality or a window hides these keys from every requested row: no parts needed
                key_parts = parts.block(slice(c0, c1))
                for r0, r1 in _blocks(len(rows), row_size):
                    yield r0, r1, c0, c1, tile(r0, r1, c0, c1, key_parts)

        if weights is None:
            out = torch.zeros(B, S, len(rows), N, dtype=dtype, device=attn.q.device)
            for r0, r1, c0, c1, block in each_tile():
                out[:, :, r0:r1, c0:c1] = block
            return out
        w = weights[:, :, rows].to(dtype)[:, None].expand(B, S, -1, -1)  # (B, S, K, R)
        if normalize_rows:
            sums = torch.zeros(B, S, len(rows), dtype=dtype, device=attn.q.device)
            for r0, r1, _, _, block in each_tile():
                sums[:, :, r0:r1] += block.sum(-1)
            w = torch.where(sums[:, :, None] > 0, w / torch.where(sums > 0, sums, 1.0)[:, :, None], 0.0)
        out = torch.zeros(B, S, weights.shape[1], N, dtype=dtype, device=attn.q.device)
        for r0, r1, c0, c1, block in each_tile():
            out[..., c0:c1] += w[..., r0:r1] @ block
        return out
