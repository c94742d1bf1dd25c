"""Attention-side pair kernels: map[b, m, i, j] = row_scale_im * sqrt(kappa_ij^T G_jm kappa_ij).

Notation and output modes: kobattr/backends/base.py (``attention_maps``). Two passes, the
flash-attention pattern: ``row_lse`` (kernels/rows.py) computes the row log-sum-exp of the
scaled logits, then the pair kernel recomputes alpha tile by tile from q, k and that statistic, so
neither alpha (N x N x H) nor the map has to exist in memory unless it is the requested output. The
query rows, the keys they see and alpha come from kernels/rows.py, shared with kernels/ff_pairs.py.

Why the pair kernels look the way they do:
- The quadratic form needs all H alphas of a pair at once, so a tile holds alpha for every head:
  S = Q K^T is one batched ``tl.dot`` over heads, (HP, BM, Dh) @ (HP, Dh, BN) -> (HP, BM, BN),
  accumulated over Dh in a (not unrolled) loop of BLOCK_D = 16 chunks: Dh = 80 is five chunks, no
  padding to 128; any other Dh masks d < DH in its last chunk. GQA indexes K head h // KV_GROUP.
- kappa^T G_j kappa for every (i, j) of the tile is a second batched ``tl.dot``, batched over
  the keys: (BN, BM, HP) @ (BN, HP, HP) -> T = G_j alpha_ij, then sum_h T * alpha. That runs the
  (H+1)^2-per-pair work on tensor cores instead of CUDA-core FMAs. The residual slot [i == j]
  would make the head dimension H + 1 (33 -> padded 64 for H = 32), so it is kept out of the
  dot: it only touches diagonal pairs, added as 2 [i==j] G[H, :] . alpha + G[H, H] (G symmetric) in
  the tiles that contain the diagonal (a runtime branch).
- HP = max(16, next power of two of H) (tl.dot needs >= 16). The register tile is HP x BM x BN,
  so ``pair_settings`` shrinks BM x BN as H grows, and takes BM = 16 (twice the keys) for up to 16
  rows, which would leave most of a 32-row tile masked; the cost that remains is re-reading the
  (H+1)^2 x M Gram block of a key once per query block (L2 traffic ~ 4 M (H+1)^2 / BM bytes per pair).
- The grid is (query blocks, B, key splits). Query blocks alone are a handful of programs for rows=
  or short inputs (rows= of 8 rows on an H100: 1 program per batch element for 132 SMs), so each
  block's visible keys are cut into contiguous shares of whole tiles (rows.key_split), their number
  chosen by the launcher (rows.key_splits) to give ~4 programs per SM, 1 when the query blocks alone
  do. Splits cost little here: no program state is carried between key tiles except the row sums.
- fp32 dots use ``DOT_PRECISION`` (rows.dot_settings: "tf32x3" for fp32 models, near-fp32 accuracy
  on tensor cores; "tf32" for fp16/bf16 models, whose own rounding dominates). q and k are dotted in
  their own dtype with fp32 accumulation, except ``QK_FP32`` upcasts first: the interpreter's
  bf16 dot is wrong, so it is set when TRITON_INTERPRET=1.
- One query-major pair kernel, constexpr flags choosing what it does with each tile: store map
  and/or alpha tiles, sum map rows, or contract: w[k, rows] @ map_tile by ``tl.dot``, atomically
  added into out[:, :, k, cols] (key-major programs would avoid atomics, but the compiler then
  hoists the Gram block of their keys for all M out of the query loop into shared memory:
  M BLOCK_N HP^2 4 bytes, beyond sm_80 for H >= 32). normalize_rows = a row-sum pass first (each key
  split atomically adds its partial sums), folded into the weights (w[k, i] / rowsum[m, i]). Every pass
  runs over the same selected rows, the contraction too (weights gathered at those rows by the launcher).
- Tiles, warps and pipelining stages (``pair_settings``) are the fastest of ten candidates per head
  count timed on an H200 (benchmarks/gpu_tiles.py, results in benchmarks/results/): the tiles are
  register-bound, so 8 warps pay off at 32 heads and a second stage only at 16 or fewer.
- Causal, sliding-window and symmetric-window (radius) tiles that see nothing are skipped via the
  loop bounds, which the key splits share out (a split past a block's last visible tile does nothing);
  outputs start zeroed. All pointer offsets are int64 (N up to 128k).
- Logit soft-capping (SOFTCAP) is a constexpr flag of the shared alpha helpers, not a kernel of its
  own: rows.capped_logits caps the logits in both passes.
"""

import torch
import triton
import triton.language as tl

from .rows import LOG2E, alpha_tile, dot_settings, key_split, key_splits, key_tile, pow2, query_block, row_lse


@triton.jit
def _norm_tile(alpha_t, grams_ptr, row_scale_ptr, b, m, rows, row_ok, cols, col_ok, vis, has_diagonal, N,
               H: tl.constexpr, M: tl.constexpr, HP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """map[i, j] = row_scale[i, m] sqrt(max(kappa_ij^T G_jm kappa_ij, 0)) if visible else 0 -> (BM, BN).

    alpha_t (BN, BM, HP) fp32; grams_ptr (B, N, M, H+1, H+1) fp32; row_scale_ptr (B, N, M) fp32.
    """
    heads = tl.arange(0, HP)
    head_ok = heads < H
    gram_base = ((b * N + cols) * M + m) * ((H + 1) * (H + 1))  # (BN,)
    gram = tl.load(grams_ptr + gram_base[:, None, None] + heads[None, :, None] * (H + 1) + heads[None, None, :],
                   mask=col_ok[:, None, None] & head_ok[None, :, None] & head_ok[None, None, :], other=0.0)
    quad = tl.sum(tl.dot(alpha_t, gram, input_precision=DOT_PRECISION) * alpha_t, 2)  # (BN, BM)
    if has_diagonal:
        # kappa's last slot is [i == j]: 2 G[H, :H] . alpha + G[H, H] on the diagonal only (G is a symmetric Gram)
        res_row = tl.load(grams_ptr + gram_base[:, None] + H * (H + 1) + heads[None, :],
                          mask=col_ok[:, None] & head_ok[None, :], other=0.0)
        res_diag = tl.load(grams_ptr + gram_base + H * (H + 1) + H, mask=col_ok, other=0.0)
        residual = 2.0 * tl.sum(alpha_t * res_row[:, None, :], 2) + res_diag[:, None]
        quad = quad + tl.where(cols[:, None] == rows[None, :], residual, 0.0)
    scale = tl.load(row_scale_ptr + (b * N + rows) * M + m, mask=row_ok, other=0.0)
    return tl.where(vis, scale[:, None] * tl.sqrt(tl.maximum(tl.trans(quad), 0.0)), 0.0)


@triton.jit
def _attention_pairs_kernel(
    q_ptr,  # (B, H, N, DH)
    k_ptr,  # (B, H // KV_GROUP, N, DH)
    valid_ptr,  # (B, N) int8
    rows_ptr,  # (R,) int64, read if HAS_ROWS
    lse_ptr,  # (B, H, R) fp32 from rows.row_lse
    grams_ptr,  # (B, N, M, H+1, H+1) fp32
    row_scale_ptr,  # (B, N, M) fp32
    map_ptr,  # (B, M, R, N) fp32, written if STORE_MAP
    row_sum_ptr,  # (B, M, R) fp32, zeroed, accumulated into if SUM_ROWS
    alpha_ptr,  # (B, H, R, N) fp32, written if WRITE_ALPHA
    weights_ptr,  # (B, M, K, R) fp32 with strides (weights_b_stride, weights_m_stride, R, 1), read if CONTRACT
    out_ptr,  # (B, M, K, N) fp32, zeroed, accumulated into if CONTRACT
    N, R, K, scale_log2, window, radius, softcap_log2, weights_b_stride, weights_m_stride,
    H: tl.constexpr, KV_GROUP: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, DH: tl.constexpr,
    HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ROWS: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SYMMETRIC: tl.constexpr,
    SOFTCAP: tl.constexpr, STORE_MAP: tl.constexpr, SUM_ROWS: tl.constexpr, CONTRACT: tl.constexpr,
    WRITE_ALPHA: tl.constexpr, BLOCK_K: tl.constexpr, QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """map[b, m, r, j] = row_scale[b, i, m] sqrt(kappa_ij^T G_jm kappa_ij), i = rows[r], and what the flags ask of it:
    STORE_MAP: the map; SUM_ROWS: row_sum[b, m, r] += sum_j map[b, m, r, j];
    CONTRACT: out[b, m, k, j] += sum_r weights[b, m, k, r] map[b, m, r, j];
    WRITE_ALPHA: alpha[b, h, r, j].

    One program per (block of BLOCK_M query rows, b, key split), looping over its share (rows.key_split)
    of the key tiles those rows can see. Row sums and the contraction add each program's share with
    atomics: key-major programs would keep the whole Gram block of their keys resident (LICM), more
    shared memory than sm_80 has for H >= 32.
    """
    b = tl.program_id(1).to(tl.int64)
    ridx, row_ok, rows, row_valid, row_first, row_last, key_lo, key_hi = query_block(
        rows_ptr, valid_ptr, b, N, R, window, radius, BLOCK_M, BLOCK_N, HAS_ROWS, CAUSAL, WINDOWED, SYMMETRIC)
    key_lo, key_hi = key_split(key_lo, key_hi, BLOCK_N)
    scopes = tl.arange(0, MP)
    heads = tl.arange(0, HP)
    sums = tl.zeros((MP, BLOCK_M), tl.float32)
    for start in range(key_lo, key_hi, BLOCK_N):
        cols, col_ok, vis, has_diagonal = key_tile(valid_ptr, b, start, rows, row_valid, row_first, row_last, N,
                                                   window, radius, BLOCK_N, CAUSAL, WINDOWED, SYMMETRIC)
        alpha = alpha_tile(q_ptr, k_ptr, lse_ptr, b, rows, ridx, row_ok, cols, col_ok, vis, N, R, scale_log2,
                           softcap_log2, H, KV_GROUP, DH, HP, BLOCK_D, QK_FP32, DOT_PRECISION, SOFTCAP)
        if WRITE_ALPHA:
            tl.store(alpha_ptr + ((b * H + heads[:, None, None]) * R + ridx[None, :, None]) * N + cols[None, None, :],
                     alpha, mask=(heads < H)[:, None, None] & row_ok[None, :, None] & col_ok[None, None, :])
        if STORE_MAP or SUM_ROWS or CONTRACT:
            alpha_t = tl.permute(alpha, (2, 1, 0))  # (BN, BM, HP): batched over keys for the Gram dot
            for m in tl.static_range(M):
                tile = _norm_tile(alpha_t, grams_ptr, row_scale_ptr, b, m, rows, row_ok, cols, col_ok, vis,
                                  has_diagonal, N, H, M, HP, DOT_PRECISION)
                if STORE_MAP:
                    tl.store(map_ptr + ((b * M + m) * R + ridx[:, None]) * N + cols[None, :], tile,
                             mask=row_ok[:, None] & col_ok[None, :])
                if SUM_ROWS:
                    sums += tl.where(scopes[:, None] == m, tl.sum(tile, 1)[None, :], 0.0)
                if CONTRACT:
                    for k0 in range(0, K, BLOCK_K):
                        kidx = k0 + tl.arange(0, BLOCK_K)
                        w = tl.load(weights_ptr + b * weights_b_stride + m * weights_m_stride + kidx[:, None] * R
                                    + ridx[None, :], mask=(kidx < K)[:, None] & row_ok[None, :], other=0.0)
                        part = tl.dot(w, tile, input_precision=DOT_PRECISION)  # (BLOCK_K, BN)
                        tl.atomic_add(out_ptr + ((b * M + m) * K + kidx[:, None]) * N + cols[None, :], part,
                                      mask=(kidx < K)[:, None] & col_ok[None, :], sem="relaxed")
    if SUM_ROWS:
        tl.atomic_add(row_sum_ptr + (b * M + scopes[:, None]) * R + ridx[None, :], sums,
                      mask=(scopes < M)[:, None] & row_ok[None, :], sem="relaxed")


def pair_settings(H, R):
    """BLOCK_M, BLOCK_N, BLOCK_D, num_warps and num_stages of _attention_pairs_kernel for H heads and R query rows.

    The alpha tile HP x BM x BN holds 64 fp32 a thread (the Gram product T and alpha_t are as large) and
    the Gram tile BN x HP x HP <= 64 KB of shared memory: BM x BN = 32 x 16 with 4 warps and 2 stages for
    HP = 16, with 8 warps and 1 stage for HP = 32 (on an H200 at N = 4096 / 16384, bf16: 0.78x / 0.83x and
    0.63x / 0.59x the time of the 32 x 16 and 32 x 8 single-stage 4-warp tiles these replaced), and 16 x 4
    for HP = 64 (not measured). Up to 16 rows (rows= of a few rows) take BM = 16 with twice the keys of the
    old tiles (32 x 8 at HP = 32), 4 warps and 1 stage, half of a 32-row tile being masked off otherwise.
    """
    HP = pow2(H)
    if R <= 16:
        block_n = 32 if HP <= 16 else 16 if HP <= 32 else 8
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_D=16, num_warps=4, num_stages=1)
    if HP <= 16:
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=16, num_warps=4, num_stages=2)
    if HP <= 32:
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=16, num_warps=8, num_stages=1)
    return dict(BLOCK_M=16, BLOCK_N=4, BLOCK_D=16, num_warps=4, num_stages=1)


def attention_maps(q, k, valid, causal, window, scale, grams, row_scale, rows=None, weights=None,
                   normalize_rows=False, want_alpha=False, radius=0, softcap=0.0, lse2=None):
    """The ``attention_maps`` primitive of kobattr/backends/base.py on contiguous CUDA (or interpreted) tensors.

    q (B, H, N, Dh), k (B, KV, N, Dh) in the model dtype; valid (B, N) bool; grams (B, N, M, H+1, H+1)
    and row_scale (B, N, M) float32; rows (R,) int64 or None; weights (B, K, N) float32 or None; radius
    (0 = none) and softcap (0 = none) as in base.Attention; lse2 (B, H, R) float32 or None: the base-2 row
    log-sum-exp of the selected rows if the caller has it (then no row-statistics pass runs).
    Returns (maps, alpha): maps (B, M, R, N) or, with weights, their contraction over the selected rows
    (B, M, K, N); alpha (B, H, R, N) or None.
    """
    B, H, N, DH = q.shape
    M = grams.shape[2]
    R = N if rows is None else rows.numel()
    dev, f32 = q.device, torch.float32
    if R == 0:  # nothing to launch: no rows, and a contraction over no rows is 0
        out = torch.zeros(B, M, 0 if weights is None else weights.shape[1], N, device=dev, dtype=f32)
        return out, torch.zeros(B, H, 0, N, device=dev, dtype=f32) if want_alpha else None
    valid8 = valid.to(torch.int8)
    dots = dot_settings(q.dtype)
    tile = pair_settings(H, R)
    shape = dict(H=H, KV_GROUP=H // k.shape[1], M=M, MP=pow2(M, 1), DH=DH, HP=pow2(H),
                 HAS_ROWS=rows is not None, CAUSAL=causal, WINDOWED=window > 0, SYMMETRIC=radius > 0,
                 SOFTCAP=softcap > 0, QK_FP32=dots[0], DOT_PRECISION=dots[1], **tile)
    grid = (triton.cdiv(R, tile["BLOCK_M"]), B)
    grid += (key_splits(grid[0] * B, triton.cdiv(N, tile["BLOCK_N"]), dev),)
    if lse2 is None:  # the row statistics, unless the caller has them (base 2, (B, H, R) for the selected rows)
        lse2 = row_lse(q, k, valid8, causal, window, scale, rows, dots, radius=radius, softcap=softcap)
    lse = lse2

    def run(store_map=False, sum_rows=False, write_alpha=False, weights=None):
        maps = torch.zeros(B, M, R, N, device=dev, dtype=f32) if store_map else lse
        sums = torch.zeros(B, M, R, device=dev, dtype=f32) if sum_rows else lse
        alpha = torch.zeros(B, H, R, N, device=dev, dtype=f32) if write_alpha else lse
        contract = weights is not None
        K = weights.shape[-2] if contract else 0
        out = torch.zeros(B, M, K, N, device=dev, dtype=f32) if contract else lse
        _attention_pairs_kernel[grid](
            q, k, valid8, rows if rows is not None else lse, lse, grams, row_scale, maps, sums, alpha,
            weights if contract else lse, out, N, R, K, scale * LOG2E, window, radius, softcap * LOG2E,
            weights.stride(0) if contract else 0, K * R if contract and weights.dim() == 4 else 0,
            STORE_MAP=store_map, SUM_ROWS=sum_rows, CONTRACT=contract, WRITE_ALPHA=write_alpha,
            BLOCK_K=pow2(min(K, 64)), **shape,
        )
        return (maps if store_map else None, sums if sum_rows else None, alpha if write_alpha else None,
                out if contract else None)

    if weights is None:
        maps, _, alpha, _ = run(store_map=True, write_alpha=want_alpha)
        return maps, alpha
    # the kernel reads weights by output row r: those of the selected rows, (B, K, R)
    weights = (weights if rows is None else weights[:, :, rows]).to(f32)
    if normalize_rows:
        _, sums, alpha, _ = run(sum_rows=True, write_alpha=want_alpha)
        # rows summing to 0 are all-zero: any finite weight keeps them at 0
        weights = torch.where(sums[:, :, None] > 0, weights[:, None] / sums[:, :, None].clamp_min(1e-30), 0.0)
        _, _, _, out = run(weights=weights.contiguous())
    else:
        _, _, alpha, out = run(write_alpha=want_alpha, weights=weights.contiguous())
    return out, alpha
