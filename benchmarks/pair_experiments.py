"""An alternative attention pair kernel to time on a GPU beside kernels/attention_pairs.py: heads streamed.

map[b, i, j] = row_scale[b, i] sqrt(kappa_ij^T G_j kappa_ij) for one Gram (M = 1, ATTNRESLN-N alone), written
as a squared norm: with G_j = L_j L_j^T, L_j lower triangular with the residual slot last,
kappa^T G_j kappa = || sum_h alpha_h L_j[h, :] + [i == j] L_j[H, :] ||^2. So a tile never needs the alphas of
all heads at once: it loops over heads, one 2D ``tl.dot`` q_h k_h^T each (flash attention's shape), and adds
alpha_h times row h of L_j to V (BM x BN x CP, CP = pow2(H) columns c < H; column H of L_j is zero but for the
residual row, which adds L_j[H, H]^2 on the diagonal). The quadratic form costs H x CP CUDA-core
multiply-adds per pair instead of the production kernel's batched tensor-core dot, but there is no 3D
batched dot, no transpose of alpha through shared memory and no Gram tile in shared memory.

Not used by kobattr: an experiment for benchmarks/gpu_profile.py (which checks it against the production
kernel and times both). Supports causal masking and GQA, every key valid, no rows=, windows or soft-capping.
``benchmarks/kernel_static.py``-style numbers from a triton 3.6 sm_90 compile (bf16, 32 x 16 tiles): Llama-7B
212 registers, no spills, 27 issue cycles per pair; BERT-base 219 registers, 5.5 cycles. The production
kernel: 10 and 3.2 cycles, but measured at 149 and 21 on an H200, so it mostly waits.
"""

import torch
import triton
import triton.language as tl

from kobattr.kernels.rows import LOG2E, pow2


@triton.jit
def _streamed_pairs_kernel(
    q_ptr,  # (B, H, N, DH)
    k_ptr,  # (B, H // KV_GROUP, N, DH)
    lse_ptr,  # (B, H, N) fp32, base 2 (kernels/rows.row_lse)
    factor_ptr,  # (B, N, H + 1, CP) fp32: rows of L_j, columns c < H
    residual_ptr,  # (B, N) fp32: L_j[H, H]^2
    row_scale_ptr,  # (B, N) fp32
    map_ptr,  # (B, N, N) fp32, written
    N, scale_log2,
    H: tl.constexpr, KV_GROUP: tl.constexpr, DH: tl.constexpr, DP: tl.constexpr, CP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
):
    """map[b, i, j] = row_scale[b, i] || sum_h alpha_hij L_j[h, :] + [i == j] L_j[H, :] ||, alpha_hij =
    exp2(scale_log2 q^h_i . k^{h // KV_GROUP}_j - lse[b, h, i]) for visible pairs (j <= i if CAUSAL), else 0.

    One program per (BLOCK_M query rows, b); each key tile loops over the heads."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    d = tl.arange(0, DP)
    c = tl.arange(0, CP)
    key_hi = N
    if CAUSAL:
        key_hi = tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, N)
    scale = tl.load(row_scale_ptr + b * N + rows, mask=row_ok, other=0.0)
    for start in range(0, key_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        visible = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        factor_rows = (b * N + cols) * ((H + 1) * CP)  # (BN,)
        v = tl.zeros((BLOCK_M, BLOCK_N, CP), tl.float32)
        for h in range(H):
            q = tl.load(q_ptr + ((b * H + h) * N + rows)[:, None] * DH + d[None, :],
                        mask=row_ok[:, None] & (d < DH)[None, :], other=0.0)
            k = tl.load(k_ptr + ((b * (H // KV_GROUP) + h // KV_GROUP) * N + cols)[None, :] * DH + d[:, None],
                        mask=col_ok[None, :] & (d < DH)[:, None], other=0.0)
            lse = tl.load(lse_ptr + (b * H + h) * N + rows, mask=row_ok, other=0.0)
            alpha = tl.where(visible, tl.exp2(tl.dot(q, k) * scale_log2 - lse[:, None]), 0.0)
            factor = tl.load(factor_ptr + factor_rows[:, None] + h * CP + c[None, :], mask=col_ok[:, None], other=0.0)
            v += alpha[:, :, None] * factor[None, :, :]
        diagonal = visible & (rows[:, None] == cols[None, :])
        factor = tl.load(factor_ptr + factor_rows[:, None] + H * CP + c[None, :], mask=col_ok[:, None], other=0.0)
        v += tl.where(diagonal, 1.0, 0.0)[:, :, None] * factor[None, :, :]
        residual = tl.load(residual_ptr + b * N + cols, mask=col_ok, other=0.0)
        quad = tl.sum(v * v, 2) + tl.where(diagonal, residual[None, :], 0.0)
        tl.store(map_ptr + (b * N + rows)[:, None] * N + cols[None, :], scale[:, None] * tl.sqrt(quad),
                 mask=row_ok[:, None] & col_ok[None, :])


def gram_factors(grams, chunk=4096):
    """(factor (B, N, H + 1, CP), residual (B, N)) for Grams (B, N, H + 1, H + 1): the rows of a lower-triangular
    L with L L^T = G (the residual slot last), columns c < H, and L[H, H]^2. In float64: G = U diag(lam) U^T,
    F = U sqrt(max(lam, 0)) (a PSD Gram may be singular, and its float32 rounding slightly indefinite), then
    F^T = Q R, so G = R^T R and L = R^T."""
    B, N, S, _ = grams.shape
    H = S - 1
    CP = pow2(H)
    flat = grams.reshape(B * N, S, S)
    lower = torch.empty(B * N, S, S, dtype=torch.float64)
    for start in range(0, B * N, chunk):
        g = flat[start:start + chunk].double().cpu()
        lam, u = torch.linalg.eigh((g + g.transpose(-1, -2)) / 2)
        lower[start:start + chunk] = torch.linalg.qr((u * lam.clamp_min(0).sqrt()[:, None, :]).transpose(-1, -2)).R.transpose(-1, -2)
    factor = torch.zeros(B * N, S, CP, dtype=torch.float32)
    factor[:, :, :H] = lower[:, :, :H].float()
    residual = lower[:, H, H].square().float()
    return factor.reshape(B, N, S, CP).to(grams.device).contiguous(), residual.reshape(B, N).to(grams.device)


def streamed_settings(H):
    """BLOCK_M, BLOCK_N, num_warps: 32 x 16 pairs, 8 warps from 32 heads on (V is BM x BN x CP fp32)."""
    return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8 if pow2(H) >= 32 else 4)


def streamed_maps(q, k, causal, scale, factor, residual, row_scale, lse2, tile=None):
    """(B, N, N) float32 map of one Gram from q (B, H, N, Dh), k (B, KV, N, Dh), gram_factors' output, row_scale
    (B, N) float32 and lse2 (B, H, N), the base-2 row log-sum-exp of kernels/rows.row_lse (every key valid)."""
    B, H, N, DH = q.shape
    tile = dict(tile or streamed_settings(H))
    warps = tile.pop("num_warps")
    out = torch.zeros(B, N, N, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(N, tile["BLOCK_M"]), B)
    _streamed_pairs_kernel[grid](q, k, lse2, factor, residual, row_scale, out, N, scale * LOG2E, H=H,
                                 KV_GROUP=H // k.shape[1], DH=DH, DP=pow2(DH), CP=factor.shape[-1], CAUSAL=causal,
                                 num_warps=warps, **tile)
    return out
