"""The streaming PyTorch backend: the pair primitives of base.py in query blocks (CPU or CUDA).

A query block holds full rows of alpha, (B, H, block, N), so the softmax needs no second pass.
Attention maps evaluate kappa^T G_j kappa per pair (H^2 work, no D); FF maps walk a work list of
the visible (query block x key block) tiles, build each tile's per-pair hidden rows in the GEMM dtype
from the per-key parts, run ONE GEMM of its visible pairs with W_out and reduce it to the scopes'
norms right away. Block sizes keep every intermediate under ``budget`` elements (on CUDA the FF tiles
take a share of the free device memory instead) and, on the CPU, blocks under max(N / 8, 32) rows
and keys, so from N = 256 on no intermediate comes near N * N * D.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
from torch import Tensor

from ..layer import cap_logits
from .base import Attention, Backend, FFParts, visible_block

DEFAULT_BUDGET = 1 << 23  # elements per intermediate (32 MiB in fp32) where budget= is None (auto)
# the share of the free CUDA memory an FF tile may take: the rest stays for the caller's tensors, the per-key
# parts of a key block and the allocator's slack
CUDA_MEMORY_SHARE = 0.4
CUDA_PARTS_SHARE = 0.2  # and a key block's per-key parts (rows= of a few rows: tiles of few rows and many keys)


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


def gemm(hidden: Tensor, w_out: Tensor, dtype: torch.dtype, tf32: bool = False) -> Tensor:
    """hidden (P, F) @ w_out (F, D) in ``dtype``: one cuBLAS / oneDNN GEMM in the operands' dtype (16-bit ones
    accumulate in float32, and on CUDA return float32 sums unrounded), float32 ones on TF32 tensor cores
    with ``tf32``."""
    if hidden.dtype == dtype:
        with _tf32_matmul() if tf32 else nullcontext():
            return hidden @ w_out
    if hidden.is_cuda:
        return torch.mm(hidden, w_out, out_dtype=torch.float32).to(dtype)
    return (hidden @ w_out).to(dtype)


@contextmanager
def _tf32_matmul():
    """torch.backends.cuda.matmul.allow_tf32 on for the block, restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


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
    # attribute(ff_gemm=...): the W_2 product in the compute dtype, bfloat16 or float16 (float32 sums), TF32 (CUDA)
    ff_gemm_dtypes = (None, torch.bfloat16, torch.float16, "tf32")

    def __init__(self, budget: Optional[int] = None):
        self.budget = budget  # elements per intermediate; None: DEFAULT_BUDGET, and FF tiles sized by CUDA memory

    @property
    def elements(self) -> int:
        return self.budget or DEFAULT_BUDGET

    def refusals(self, primitive, attn, ff_gemm_dtype=None, outputs=frozenset()):
        reasons = super().refusals(primitive, attn, ff_gemm_dtype, outputs)
        if primitive == "ff_maps" and ff_gemm_dtype == "tf32" and attn.q.device.type != "cuda":
            reasons.append(f"{self.name} computes TF32 products on CUDA tensors only (CPUs have no TF32); "
                           "use ff_gemm='bfloat16' or 'float32' there.")
        return reasons

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
        size = max(1, min(len(rows), self.elements // max(1, B * H * N)))
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
        size = max(1, min(self.elements // max(1, B * N * H * M), max(N // 8, 32)))
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

    def ff_pairs(self, device: torch.device, B: int, F: int, D: int, gemm_bytes: int) -> int:
        """Pairs (i, j) per FF tile, the rows of one GEMM with W_out: on CUDA what CUDA_MEMORY_SHARE of the free
        device memory holds (torch.cuda.mem_get_info), on the CPU a cache-sized tile of (B, R, C, max(F, D))
        within half the budget (16 MiB at the default: it stays in a server's L3 between the FFN's two products,
        0.67 -> 0.8 of sgemm); an explicit budget caps both."""
        budget = max(1, self.elements // (2 * B * max(F, D)))
        if device.type != "cuda":
            return budget
        # per pair: the float32 prologue product and its gemm-dtype copy, its compacted rows, and a few D-wide rows
        per_pair = B * (F * (8 + 2 * gemm_bytes) + 6 * D * 4)
        fits = max(1, int(torch.cuda.mem_get_info(device)[0] * CUDA_MEMORY_SHARE) // per_pair)
        return fits if self.budget is None else min(fits, budget)

    def ff_keys(self, device: torch.device, B: int, H: int, F: int, D: int) -> Optional[int]:
        """Keys per FF key block on CUDA: what CUDA_PARTS_SHARE of the free memory holds of their parts and raw
        rows, (H+1) (2 F + 2 D) float32 per key (gated); None on the CPU, whose cache tiles bound them."""
        if device.type != "cuda":
            return None
        per_key = B * (H + 1) * (2 * F + 2 * D) * 4
        return max(1, int(torch.cuda.mem_get_info(device)[0] * CUDA_PARTS_SHARE) // per_key)

    def ff_tiles(self, attn: Attention, rows: Tensor, pairs: int, keys: Optional[int] = None) -> list:
        """The work list: (r0, r1, c0, c1) of the (query block x key block) tiles of rows[r0:r1] against the keys
        c0:c1 that hold at least one visible pair, key blocks outermost; whole tiles hidden by causality, a
        window or padding are never computed. Tiles of about ``pairs`` pairs and at most ``keys`` keys (None:
        any), at most max(N / 8, 32) rows and keys on the CPU (the cache tiles measured there)."""
        N = attn.q.shape[2]
        cap = N if attn.q.device.type == "cuda" else max(N // 8, 32)
        col_limit = max(1, min(N, cap, keys or N))
        row_size = max(1, min(len(rows), cap, max(math.isqrt(pairs), pairs // col_limit)))
        col_size = max(1, min(col_limit, pairs // row_size))
        cols = torch.arange(N, device=attn.q.device)
        tiles = []
        for c0, c1 in _blocks(N, col_size):
            seen = visible_block(attn, rows, cols[c0:c1]).any(0).any(1)  # (R,): rows that see some of these keys
            tiles += [(r0, r1, c0, c1) for r0, r1 in _blocks(len(rows), row_size) if seen[r0:r1].any()]
        return tiles

    def ff_prologue(self, attn: Attention, p: dict, rows: Tensor, cols: Tensor, lse: Tensor, vis: Tensor,
                    ff_p: Tensor, gate_p: Optional[Tensor], gemm_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(kappa (B, C, R, H+1), hidden (B, C, R, F) in ``gemm_dtype``) of the query rows ``rows`` against the
        keys ``cols`` (their row log-sum-exp ``lse`` (B, H, R), visibility ``vis`` (B, R, C), per-key parts
        ff_p, gate_p (B, C, H+1, F)): hidden_ij = in_scale_i (coef_in_i sum_r kappa_ij[r] ff_j[r] + coef_gate_i
        sum_r kappa_ij[r] gate_j[r]). Key-major, (B, C, R, ...): the per-key products write contiguously, and
        the (B C R, F) view for W_out needs no copy. Hidden rows of invisible pairs are never read (an
        implementation may leave them unwritten); kappa is 0 there."""
        dtype = lse.dtype
        scores, _ = block_scores(attn, rows, dtype, cols)
        alpha = torch.exp(scores - lse[..., None]).nan_to_num(0.0) * vis[:, None]  # (B, H, R, C)
        diagonal = kappa_diag_mask(rows, cols, vis).transpose(1, 2).to(dtype)[..., None]
        kappa = torch.cat([alpha.permute(0, 3, 2, 1), diagonal], -1)  # (B, C, R, H+1)
        in_scale = p["in_scale"][:, None, rows, None]
        # in place: the (B, C, R, F) tiles are the largest temporaries
        hidden = (kappa @ ff_p).mul_(in_scale * p["coef_in"][:, None, rows])
        if gate_p is not None:
            hidden += (kappa @ gate_p).mul_(in_scale * p["coef_gate"][:, None, rows])
        return kappa, hidden.to(gemm_dtype)  # .to() of the dtype a tensor already has copies nothing

    def ff_epilogue(self, p: dict, parts: FFParts, rows: Tensor, kappa: Tensor, res_p: Tensor, ff: Tensor,
                    idx: Optional[Tensor]) -> Tensor:
        """(B, C, R, S) scope norms of a tile from its GEMM rows ff (P, D), P = the pairs idx of the (B C R)
        key-major tile (None: all of them; the others are invisible and get 0): res_ij = res_scale_i
        sum_r kappa_ij[r] res_j[r] from kappa (B, C, R, H+1) and res_p (B, C, H+1, D), then ||ff||,
        ||res + ff|| and out_scale_i ||C(res + ff) * out_weight||."""
        B, C, R = kappa.shape[:3]
        S, D = parts.n_scopes, ff.shape[1]
        res = (kappa.to(ff.dtype) @ res_p).mul_(p["res_scale"][:, None, rows, None]).view(-1, D)  # (B C R, D)
        total = ff + (res if idx is None else res.index_select(0, idx))
        del res
        norms = torch.empty(ff.shape[0], S, dtype=ff.dtype, device=ff.device)
        norms[:, 0] = ff.norm(dim=-1)
        norms[:, 1] = total.norm(dim=-1)
        if S == 3:
            if parts.out_center:
                total -= total.mean(-1, keepdim=True)
            if p["out_weight"] is not None:
                total *= p["out_weight"]
            scale = p["out_scale"][:, None, rows].expand(B, C, R).reshape(-1)
            norms[:, 2] = total.norm(dim=-1) * (scale if idx is None else scale[idx])
        if idx is not None:
            norms = torch.zeros(B * C * R, S, dtype=ff.dtype, device=ff.device).index_copy_(0, idx, norms)
        return norms.view(B, C, R, S)

    def ff_maps(self, attn, parts: FFParts, rows=None, weights=None, normalize_rows=False):
        """The work list's tiles (ff_tiles), key blocks outermost: each block's per-key parts are made once
        (FFParts.block), then every visible tile of it runs ff_prologue (alpha from the row log-sum-exp, the
        per-pair hidden rows in the GEMM dtype), ONE GEMM of its visible pairs' hidden rows with W_out, and the
        epilogue (the residual part, the scopes' norms). Peak memory: one key block's parts and one tile. A
        contraction of normalised rows takes a first pass for the row sums."""
        dtype = self.compute_dtype(attn)
        B, H, N, _ = attn.q.shape
        rows = self._rows(attn, rows)
        p = {k: (v.to(dtype) if isinstance(v, Tensor) else v) for k, v in vars(parts).items()
             if k not in ("ff_parts", "gate_parts", "res_parts")}
        F, D = parts.w_out.shape
        S = parts.n_scopes
        lse = self._lse(attn, rows, dtype)  # (B, H, R)
        gemm_dtype = dtype if parts.gemm_dtype in (None, "tf32") else parts.gemm_dtype
        w_out_gemm = p["w_out"].to(gemm_dtype)
        tf32 = parts.gemm_dtype == "tf32"
        cols_all = torch.arange(N, device=attn.q.device)

        def tile(r0, r1, c0, c1, key_parts) -> Tensor:
            """(B, S, R, C) scope norms of query rows rows[r0:r1] against keys c0:c1."""
            r, cols = rows[r0:r1], cols_all[c0:c1]
            ff_p, gate_p, res_p = (None if t is None else t.to(dtype) for t in key_parts)
            vis = visible_block(attn, r, cols)  # (B, R, C)
            kappa, hidden = self.ff_prologue(attn, p, r, cols, lse[:, :, r0:r1], vis, ff_p, gate_p, gemm_dtype)
            # the GEMM takes the visible pairs only (causal and windowed tiles on the diagonal, padding)
            pick = vis.transpose(1, 2).reshape(-1)
            idx = None if bool(pick.all()) else pick.nonzero().squeeze(1)
            hidden = hidden.view(-1, F)
            if idx is not None:
                hidden = hidden.index_select(0, idx)
            ff = gemm(hidden, w_out_gemm, dtype, tf32)  # (P, D)
            del hidden
            return self.ff_epilogue(p, parts, r, kappa, res_p, ff, idx).permute(0, 3, 2, 1)

        pairs = self.ff_pairs(attn.q.device, B, F, D, w_out_gemm.element_size())
        work = self.ff_tiles(attn, rows, pairs, self.ff_keys(attn.q.device, B, H, F, D))

        def each_tile():
            key_block, key_parts = None, None
            for r0, r1, c0, c1 in work:
                if key_block != (c0, c1):  # the work list runs key block by key block: parts made once per block
                    key_block, key_parts = (c0, c1), parts.block(slice(c0, c1))
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
