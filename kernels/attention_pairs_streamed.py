"""Attention pair kernel, heads streamed: map[b, m, i, j] = row_scale_im * || sum_h alpha^h_ij L_jm[h, :] + [i == j] L_jm[H, :] ||.

The quadratic form of kernels/attention_pairs.py written as a squared norm: with G_jm = L_jm L_jm^T, L_jm lower
triangular with the residual slot last, kappa^T G kappa = || L^T kappa ||^2. So a tile never needs the alphas of
all heads at once: it loops over the heads, one 2D ``tl.dot`` q_h k_h^T each (flash attention's shape), and adds
alpha_h times row h of L_j to V (BM x BN x CP, CP = pow2(H) columns c < H; column H of L_j is zero but for the
residual row, which adds L_j[H, H]^2 on the diagonal). There is no 3D batched dot, no transpose of alpha through
shared memory and no Gram tile in shared memory; the price is the quadratic form on CUDA cores.

Per pair and Gram: H Dh multiply-adds for the logits (tensor cores) and H CP for V plus CP for its norm (CUDA
cores): Llama-7B (H = 32, Dh = 128) 4096 + 1056, BERT-base (12, 64) 768 + 208. Bytes per pair from L2: the
(H + 1) CP factor rows of a key, re-read by each of the N / BM query blocks, 4 (H + 1) CP / BM (Llama-7B at
BM = 32: 132 B), q re-read per key tile, H Dh itemsize / BN (512 B at BN = 16 in bfloat16), k read once per query
head (not per KV head), H Dh itemsize / BM (256 B), and the 4-byte map store. From a triton 3.6 sm_90 compile
(bfloat16, 32 x 16 tiles; benchmarks/kernel_static.py): Llama-7B 212 registers, no spills, 27 issue cycles per
pair; BERT-base 219 registers, 5.5 cycles (the production kernel: 10 and 3.2 cycles, measured at 149 and 21 on an
H200, so it mostly waits).

Visibility (rows=, padding, causal, windows) comes from kernels/rows.py (block_rows, key_tile) and the logits
from rows.capped_logits (soft-capping), as in the production kernel; one program per (query block, b, Gram m).
Output modes: the full map or rows= only (no contraction, no alpha). The factors L are made by ``gram_factors``
(float64 eigendecomposition and QR of each Gram, batched), part of every call unless given.
"""

import torch
import triton
import triton.language as tl

from .rows import LOG2E, block_rows, capped_logits, dot_settings, key_tile, pow2, row_lse


@triton.jit
def _streamed_pairs_kernel(
    q_ptr,  # (B, H, N, DH)
    k_ptr,  # (B, H // KV_GROUP, N, DH)
    valid_ptr,  # (B, N) int8
    rows_ptr,  # (R,) int64, read if HAS_ROWS
    lse_ptr,  # (B, H, R) fp32, base 2 (kernels/rows.row_lse)
    factor_ptr,  # (B, M, N, H + 1, CP) fp32: rows of L_jm, columns c < H
    residual_ptr,  # (B, M, N) fp32: L_jm[H, H]^2
    row_scale_ptr,  # (B, N, M) fp32
    map_ptr,  # (B, M, R, N) fp32, zeroed, written
    N, R, scale_log2, window, radius, softcap_log2,
    H: tl.constexpr, KV_GROUP: tl.constexpr, M: tl.constexpr, DH: tl.constexpr, DP: tl.constexpr,
    CP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ROWS: tl.constexpr, CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr, SYMMETRIC: tl.constexpr, SOFTCAP: tl.constexpr, QK_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """map[b, m, r, j] = row_scale[b, i, m] || sum_h alpha^h_ij L_jm[h, :] + [i == j] L_jm[H, :] ||, i = rows[r],
    alpha^h_ij = exp2(capped_logits(q^h_i . k^{h // KV_GROUP}_j) - lse[b, h, r]) for visible pairs, else 0.

    One program per (BLOCK_M query rows, b, m); each key tile loops over the heads."""
    b = tl.program_id(1).to(tl.int64)
    m = tl.program_id(2)
    ridx, row_ok, rows, row_valid, row_first, row_last, key_lo, key_hi = block_rows(
        tl.program_id(0), rows_ptr, valid_ptr, b, N, R, window, radius, BLOCK_M, BLOCK_N, HAS_ROWS, CAUSAL,
        WINDOWED, SYMMETRIC)
    d = tl.arange(0, DP)
    c = tl.arange(0, CP)
    scale = tl.load(row_scale_ptr + (b * N + rows) * M + m, mask=row_ok, other=0.0)
    for start in range(key_lo, key_hi, BLOCK_N):
        cols, col_ok, vis, _ = key_tile(valid_ptr, b, start, rows, row_valid, row_first, row_last, N, window, radius,
                                        BLOCK_N, CAUSAL, WINDOWED, SYMMETRIC)
        factor_rows = ((b * M + m) * N + cols) * ((H + 1) * CP)  # (BN,)
        v = tl.zeros((BLOCK_M, BLOCK_N, CP), tl.float32)
        for h in range(H):
            q = tl.load(q_ptr + ((b * H + h) * N + rows)[:, None] * DH + d[None, :],
                        mask=row_ok[:, None] & (d < DH)[None, :], other=0.0)
            k = tl.load(k_ptr + ((b * (H // KV_GROUP) + h // KV_GROUP) * N + cols)[None, :] * DH + d[:, None],
                        mask=col_ok[None, :] & (d < DH)[:, None], other=0.0)
            if QK_FP32:  # the interpreter's bf16 dot is wrong; fp32 models dot in DOT_PRECISION
                q = q.to(tl.float32)
                k = k.to(tl.float32)
            lse = tl.load(lse_ptr + (b * H + h) * R + ridx, mask=row_ok, other=0.0)
            logits = capped_logits(tl.dot(q, k, input_precision=DOT_PRECISION), scale_log2, softcap_log2, SOFTCAP)
            alpha = tl.where(vis, tl.exp2(logits - lse[:, None]), 0.0)
            factor = tl.load(factor_ptr + factor_rows[:, None] + h * CP + c[None, :], mask=col_ok[:, None], other=0.0)
            v += alpha[:, :, None] * factor[None, :, :]
        diagonal = vis & (rows[:, None] == cols[None, :])
        factor = tl.load(factor_ptr + factor_rows[:, None] + H * CP + c[None, :], mask=col_ok[:, None], other=0.0)
        v += tl.where(diagonal, 1.0, 0.0)[:, :, None] * factor[None, :, :]
        residual = tl.load(residual_ptr + (b * M + m) * N + cols, mask=col_ok, other=0.0)
        quad = tl.sum(v * v, 2) + tl.where(diagonal, residual[None, :], 0.0)
        tl.store(map_ptr + ((b * M + m) * R + ridx)[:, None] * N + cols[None, :], scale[:, None] * tl.sqrt(quad),
                 mask=row_ok[:, None] & col_ok[None, :])


def gram_factors(grams):
    """(factor (B, M, N, H + 1, CP) float32, residual (B, M, N) float32) for grams (B, N, M, H + 1, H + 1): the
    rows of a lower-triangular L with L L^T = G (the residual slot last), columns c < H, and L[H, H]^2.

    In float64, one batched call each: G = U diag(lam) U^T, F = U sqrt(max(lam, 0)) (a PSD Gram may be singular,
    and its float32 rounding slightly indefinite), then F^T = Q R, so G = R^T R and L = R^T."""
    B, N, M, S, _ = grams.shape
    H = S - 1
    g = grams.double().transpose(1, 2)  # (B, M, N, S, S)
    lam, u = torch.linalg.eigh((g + g.transpose(-1, -2)) / 2)
    lower = torch.linalg.qr((u * lam.clamp_min(0).sqrt()[..., None, :]).transpose(-1, -2)).R.transpose(-1, -2)
    factor = torch.zeros(B, M, N, S, pow2(H), dtype=torch.float32, device=grams.device)
    factor[..., :H] = lower[..., :H]
    return factor, lower[..., H, H].square().float().contiguous()


def streamed_settings(H):
    """BLOCK_M, BLOCK_N, num_warps: 32 x 16 pairs, 8 warps from 32 heads on (V is BM x BN x CP fp32)."""
    return dict(BLOCK_M=32, BLOCK_N=16, num_warps=8 if pow2(H) >= 32 else 4)


def streamed_constants(H, KV, DH, M, dtype, tile, has_rows=False, causal=False, windowed=False, symmetric=False,
                       softcap=False):
    """The constexpr arguments of _streamed_pairs_kernel (num_warps apart) for H query and KV key heads in ``dtype``."""
    qk_fp32, precision = dot_settings(dtype)
    return dict(H=H, KV_GROUP=H // KV, M=M, DH=DH, DP=pow2(DH), CP=pow2(H), BLOCK_M=tile["BLOCK_M"],
                BLOCK_N=tile["BLOCK_N"], HAS_ROWS=has_rows, CAUSAL=causal, WINDOWED=windowed, SYMMETRIC=symmetric,
                SOFTCAP=softcap, QK_FP32=qk_fp32, DOT_PRECISION=precision)


def attention_maps(q, k, valid, causal, window, scale, grams, row_scale, rows=None, radius=0, softcap=0.0,
                   lse2=None, tile=None, factors=None):
    """The full-map (or rows=) ``attention_maps`` of kobattr/backends/base.py, heads streamed, on contiguous CUDA
    (or interpreted) tensors: (B, M, R, N) float32.

    q (B, H, N, Dh), k (B, KV, N, Dh) in the model dtype; valid (B, N) bool; grams (B, N, M, H+1, H+1) and
    row_scale (B, N, M) float32; rows (R,) int64 or None; lse2 (B, H, R) float32 or None: the base-2 row
    log-sum-exp of the selected rows if the caller has it; ``tile``: streamed_settings' keys (None: those);
    ``factors``: gram_factors(grams) if the caller has them (benchmarks/gpu_profile.py times the kernel alone)."""
    B, H, N, DH = q.shape
    M = grams.shape[2]
    R = N if rows is None else rows.numel()
    out = torch.zeros(B, M, R, N, device=q.device, dtype=torch.float32)
    if R == 0:
        return out
    tile = tile or streamed_settings(H)
    valid8 = valid.to(torch.int8)
    if lse2 is None:
        lse2 = row_lse(q, k, valid8, causal, window, scale, rows, dot_settings(q.dtype), radius=radius,
                       softcap=softcap)
    factor, residual = gram_factors(grams) if factors is None else factors
    consts = streamed_constants(H, k.shape[1], DH, M, q.dtype, tile, rows is not None, causal, window > 0, radius > 0,
                                softcap > 0)
    _streamed_pairs_kernel[(triton.cdiv(R, tile["BLOCK_M"]), B, M)](
        q, k, valid8, rows if rows is not None else lse2, lse2, factor, residual, row_scale, out, N, R,
        scale * LOG2E, window, radius, softcap * LOG2E, num_warps=tile["num_warps"], **consts)
    return out
