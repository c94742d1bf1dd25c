"""Attention-side pair kernels: map[b, m, i, j] = row_scale_im * sqrt(kappa_ij^T G_jm kappa_ij).

Notation and output modes: kobattr/backends/base.py (``attention_maps``). Two passes, the
flash-attention pattern: ``_row_lse_kernel`` stores the row log-sum-exp of the scaled logits, then
the pair kernels recompute alpha tile by tile from q, k and that statistic, so neither alpha
(N x N x H) nor the map has to exist in memory unless it is the requested output.

Why the pair kernels look the way they do:
- The quadratic form needs all H alphas of a pair at once, so a tile holds alpha for every head:
  S = Q K^T is one batched ``tl.dot`` over heads, (HP, BM, Dh) @ (HP, Dh, BN) -> (HP, BM, BN),
  accumulated over Dh in a (not unrolled) loop of BLOCK_D = 16 chunks: Dh = 80 is five chunks, no
  padding to 128; any other Dh masks d < DH in its last chunk. GQA indexes K head h // KV_GROUP.
- kappa^T G_j kappa for every (i, j) of the tile is a second batched ``tl.dot``, batched over
  the keys: (BN, BM, HP) @ (BN, HP, HP) -> T = G_j alpha_ij, then sum_h T * alpha. That runs the
  (H+1)^2-per-pair work on tensor cores instead of CUDA-core FMAs. The residual slot [i == j]
  would make the head dimension H + 1 (33 -> padded 64 for H = 32), so it is kept out of the
  dot: it only touches diagonal pairs, added as 2 [i==j] G[H, :] . alpha + G[H, H] in the tiles
  that contain the diagonal (a runtime branch).
- HP = max(16, next power of two of H) (tl.dot needs >= 16). The register tile is HP x BM x BN,
  so the launcher shrinks BM x BN as H grows; the cost that remains is re-reading the (H+1)^2 x M
  Gram block of a key once per query block (L2 traffic ~ 4 M (H+1)^2 / BM bytes per pair).
- fp32 dots use ``DOT_PRECISION`` (launcher: "tf32x3" for fp32 models, near-fp32 accuracy on
  tensor cores; "tf32" for fp16/bf16 models, whose own rounding dominates). q and k are dotted in
  their own dtype with fp32 accumulation, except ``QK_FP32`` upcasts first: the interpreter's
  bf16 dot is wrong, so the launcher sets it when TRITON_INTERPRET=1.
- One query-major pair kernel, constexpr flags choosing what it does with each tile: store map
  and/or alpha tiles, sum map rows, or contract: w[k, rows] @ map_tile by ``tl.dot``, atomically
  added into out[:, :, k, cols] (key-major programs would avoid atomics, but the compiler then
  hoists the Gram block of their keys for all M out of the query loop into shared memory:
  M BLOCK_N HP^2 4 bytes, beyond sm_80 for H >= 32). normalize_rows = a row-sum pass first,
  folded into the weights (w[k, i] / rowsum[m, i]).
- Programs run with num_stages=1: the tiles are register-bound, and software pipelining of the
  3D loads would double their shared memory.
- Causal and sliding-window tiles that see nothing are skipped via the loop bounds; outputs
  start zeroed. All pointer offsets are int64 (N up to 128k).
"""

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _visible(rows, row_valid, cols, col_valid, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """visible[i, j] = valid_i & valid_j & (j <= i if causal) & (i - j < window if windowed) -> (BM, BN)."""
    vis = row_valid[:, None] & col_valid[None, :]
    diff = rows[:, None] - cols[None, :]
    if CAUSAL:
        vis = vis & (diff >= 0)
    if WINDOWED:
        vis = vis & (diff < window)
    return vis


@triton.jit
def _key_range(rows, row_ok, N, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi): the keys any of ``rows`` can see, lo aligned down to BLOCK_N."""
    lo = 0
    hi = N
    if CAUSAL:
        hi = tl.minimum(tl.max(tl.where(row_ok, rows, 0)) + 1, N)
    if WINDOWED:
        lo = tl.maximum(tl.min(tl.where(row_ok, rows, N)) - window + 1, 0) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _alpha_tile(q_ptr, k_ptr, lse_ptr, b, rows, ridx, row_ok, cols, col_ok, vis, N, R, scale_log2,
                H: tl.constexpr, KV_GROUP: tl.constexpr, DH: tl.constexpr, HP: tl.constexpr,
                BLOCK_D: tl.constexpr, QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """alpha[h, i, j] = exp2(scale_log2 q^h_i . k^{h // KV_GROUP}_j - lse2[h, i]) if visible else 0 -> (HP, BM, BN).

    q_ptr (B, H, N, DH); k_ptr (B, H // KV_GROUP, N, DH); lse_ptr (B, H, R) indexed by ``ridx``.
    """
    heads = tl.arange(0, HP)
    head_ok = heads < H
    q_rows = ((b * H + heads[:, None]) * N + rows[None, :]) * DH  # (HP, BM)
    k_rows = ((b * (H // KV_GROUP) + heads[:, None] // KV_GROUP) * N + cols[None, :]) * DH  # (HP, BN)
    q_mask = head_ok[:, None, None] & row_ok[None, :, None]
    k_mask = head_ok[:, None, None] & col_ok[None, None, :]
    logits = tl.zeros((HP, rows.shape[0], cols.shape[0]), tl.float32)
    for d0 in range(0, DH, BLOCK_D):  # a loop, not unrolled: unrolled chunks all sit in shared memory at once
        d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + q_rows[:, :, None] + d[None, None, :], mask=q_mask & (d < DH)[None, None, :], other=0.0)
        k = tl.load(k_ptr + k_rows[:, None, :] + d[None, :, None], mask=k_mask & (d < DH)[None, :, None], other=0.0)
        if QK_FP32:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        logits = tl.dot(q, k, logits, input_precision=DOT_PRECISION)
    lse = tl.load(lse_ptr + (b * H + heads[:, None]) * R + ridx[None, :], mask=head_ok[:, None] & row_ok[None, :],
                  other=0.0)
    shifted = tl.where(vis[None, :, :] & head_ok[:, None, None], logits * scale_log2 - lse[:, :, None], -float("inf"))
    return tl.exp2(shifted)


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
        # kappa's last slot is [i == j]: 2 G[H, :H] . alpha + G[H, H] on the diagonal only
        res_row = tl.load(grams_ptr + gram_base[:, None] + H * (H + 1) + heads[None, :],
                          mask=col_ok[:, None] & head_ok[None, :], other=0.0)
        res_diag = tl.load(grams_ptr + gram_base + H * (H + 1) + H, mask=col_ok, other=0.0)
        residual = 2.0 * tl.sum(alpha_t * res_row[:, None, :], 2) + res_diag[:, None]
        quad = quad + tl.where(cols[:, None] == rows[None, :], residual, 0.0)
    scale = tl.load(row_scale_ptr + (b * N + rows) * M + m, mask=row_ok, other=0.0)
    return tl.where(vis, scale[:, None] * tl.sqrt(tl.maximum(tl.trans(quad), 0.0)), 0.0)


@triton.jit
def _row_lse_kernel(
    q_ptr,  # (B, H, N, DH)
    k_ptr,  # (B, H // KV_GROUP, N, DH)
    valid_ptr,  # (B, N) int8
    rows_ptr,  # (R,) int64, read if HAS_ROWS
    lse_ptr,  # (B, H, R) fp32, written
    N, R, scale_log2, window,
    H: tl.constexpr, KV_GROUP: tl.constexpr, DH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ROWS: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
    QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """lse2[b, h, r] = log2 sum_{j visible from i = rows[r]} exp2(scale_log2 q^h_i . k^{h // KV_GROUP}_j).

    Base-2 log-sum-exp of the scaled logits, online over key tiles; 0 for rows that see no key.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    kv_head = b * (H // KV_GROUP) + (bh % H) // KV_GROUP
    ridx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = ridx < R
    if HAS_ROWS:
        rows = tl.load(rows_ptr + ridx, mask=row_ok, other=0)
    else:
        rows = ridx.to(tl.int64)
    row_valid = tl.load(valid_ptr + b * N + rows, mask=row_ok, other=0) != 0
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + (bh * N + rows)[:, None] * DH + d[None, :], mask=row_ok[:, None] & (d < DH)[None, :],
                other=0.0)
    if QK_FP32:
        q = q.to(tl.float32)
    row_max = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    lo, hi = _key_range(rows, row_ok, N, window, CAUSAL, WINDOWED, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        col_valid = tl.load(valid_ptr + b * N + cols, mask=col_ok, other=0) != 0
        k = tl.load(k_ptr + (kv_head * N + cols)[None, :] * DH + d[:, None], mask=col_ok[None, :] & (d < DH)[:, None],
                    other=0.0)
        if QK_FP32:
            k = k.to(tl.float32)
        logits = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        logits = tl.where(_visible(rows, row_valid, cols, col_valid, window, CAUSAL, WINDOWED), logits,
                          -float("inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)  # no inf - inf for rows seeing nothing yet
        row_sum = row_sum * tl.exp2(row_max - safe_max) + tl.sum(tl.exp2(logits - safe_max[:, None]), 1)
        row_max = new_max
    lse = tl.where(row_sum > 0, row_max + tl.log2(tl.where(row_sum > 0, row_sum, 1.0)), 0.0)
    tl.store(lse_ptr + bh * R + ridx, lse, mask=row_ok)


@triton.jit
def _attention_pairs_kernel(
    q_ptr,  # (B, H, N, DH)
    k_ptr,  # (B, H // KV_GROUP, N, DH)
    valid_ptr,  # (B, N) int8
    rows_ptr,  # (R,) int64, read if HAS_ROWS
    lse_ptr,  # (B, H, R) fp32 from _row_lse_kernel
    grams_ptr,  # (B, N, M, H+1, H+1) fp32
    row_scale_ptr,  # (B, N, M) fp32
    map_ptr,  # (B, M, R, N) fp32, written if STORE_MAP
    row_sum_ptr,  # (B, M, R) fp32, written if SUM_ROWS
    alpha_ptr,  # (B, H, R, N) fp32, written if WRITE_ALPHA
    weights_ptr,  # (B, M, K, R) fp32 with strides (weights_b_stride, weights_m_stride, R, 1), read if CONTRACT
    out_ptr,  # (B, M, K, N) fp32, zeroed, accumulated into if CONTRACT
    N, R, K, scale_log2, window, weights_b_stride, weights_m_stride,
    H: tl.constexpr, KV_GROUP: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, DH: tl.constexpr,
    HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ROWS: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
    STORE_MAP: tl.constexpr, SUM_ROWS: tl.constexpr, CONTRACT: tl.constexpr, WRITE_ALPHA: tl.constexpr,
    BLOCK_K: tl.constexpr, QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """map[b, m, r, j] = row_scale[b, i, m] sqrt(kappa_ij^T G_jm kappa_ij), i = rows[r], and what the flags ask of it:
    STORE_MAP: the map; SUM_ROWS: sum_j map[b, m, r, j];
    CONTRACT: out[b, m, k, j] += sum_r weights[b, m, k, r] map[b, m, r, j];
    WRITE_ALPHA: alpha[b, h, r, j].

    One program per block of BLOCK_M query rows, looping over the key tiles those rows can see.
    The contraction adds each tile's share with atomics: key-major programs would keep the whole
    Gram block of their keys resident (LICM), more shared memory than sm_80 has for H >= 32.
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ridx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = ridx < R
    if HAS_ROWS:
        rows = tl.load(rows_ptr + ridx, mask=row_ok, other=0)
    else:
        rows = ridx.to(tl.int64)
    row_valid = tl.load(valid_ptr + b * N + rows, mask=row_ok, other=0) != 0
    row_lo = tl.min(tl.where(row_ok, rows, N))
    row_hi = tl.max(tl.where(row_ok, rows, -1))
    scopes = tl.arange(0, MP)
    heads = tl.arange(0, HP)
    sums = tl.zeros((MP, BLOCK_M), tl.float32)
    lo, hi = _key_range(rows, row_ok, N, window, CAUSAL, WINDOWED, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        col_valid = tl.load(valid_ptr + b * N + cols, mask=col_ok, other=0) != 0
        vis = _visible(rows, row_valid, cols, col_valid, window, CAUSAL, WINDOWED)
        alpha = _alpha_tile(q_ptr, k_ptr, lse_ptr, b, rows, ridx, row_ok, cols, col_ok, vis, N, R, scale_log2,
                            H, KV_GROUP, DH, HP, BLOCK_D, QK_FP32, DOT_PRECISION)
        if WRITE_ALPHA:
            tl.store(alpha_ptr + ((b * H + heads[:, None, None]) * R + ridx[None, :, None]) * N + cols[None, None, :],
                     alpha, mask=(heads < H)[:, None, None] & row_ok[None, :, None] & col_ok[None, None, :])
        if STORE_MAP or SUM_ROWS or CONTRACT:
            alpha_t = tl.permute(alpha, (2, 1, 0))  # (BN, BM, HP): batched over keys for the Gram dot
            has_diagonal = (start <= row_hi) & (start + BLOCK_N > row_lo)
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
        tl.store(row_sum_ptr + (b * M + scopes[:, None]) * R + ridx[None, :], sums,
                 mask=(scopes < M)[:, None] & row_ok[None, :])


def _pow2(n, least=16):
    return max(least, triton.next_power_of_2(n))


def pair_tile_sizes(H):
    """(BLOCK_M, BLOCK_N) of the pair kernels: the alpha tile HP x BM x BN stays <= 8192 fp32 and the
    Gram tile BN x HP x HP <= 64 KB of shared memory."""
    HP = _pow2(H)
    return (32, 16) if HP <= 16 else (32, 8) if HP <= 32 else (16, 4)


def dot_settings(dtype):
    """(QK_FP32, DOT_PRECISION) for a model dtype; see the module docstring."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if dtype == torch.float32:
        return True, "tf32x3"
    return interpreting, "tf32"


def row_lse(q, k, valid, causal, window, scale, rows=None):
    """lse2 (B, H, R) float32 of the scaled logits (base 2), for ``rows`` (None = all N)."""
    B, H, N, DH = q.shape
    R = N if rows is None else rows.numel()
    lse = torch.empty(B, H, R, device=q.device, dtype=torch.float32)
    qk_fp32, precision = dot_settings(q.dtype)
    block = 64 if DH <= 64 else 32
    _row_lse_kernel[(triton.cdiv(R, block), B * H)](
        q, k, valid, rows if rows is not None else lse, lse, N, R, scale * math.log2(math.e), window,
        H=H, KV_GROUP=H // k.shape[1], DH=DH, BLOCK_M=block, BLOCK_N=block, BLOCK_D=_pow2(DH),
        HAS_ROWS=rows is not None, CAUSAL=causal, WINDOWED=window > 0, QK_FP32=qk_fp32, DOT_PRECISION=precision,
        num_stages=2,
    )
    return lse


def attention_maps(q, k, valid, causal, window, scale, grams, row_scale, rows=None, weights=None,
                   normalize_rows=False, want_alpha=False):
    """The ``attention_maps`` primitive of kobattr/backends/base.py on contiguous CUDA (or interpreted) tensors.

    q (B, H, N, Dh), k (B, KV, N, Dh) in the model dtype; valid (B, N) bool; grams (B, N, M, H+1, H+1)
    and row_scale (B, N, M) float32; rows (R,) int64 or None; weights (B, K, N) float32 or None.
    Returns (maps, alpha): maps (B, M, R, N) or, with weights, (B, M, K, N); alpha (B, H, R, N) or None.
    """
    B, H, N, DH = q.shape
    M = grams.shape[2]
    valid8 = valid.to(torch.int8)
    qk_fp32, precision = dot_settings(q.dtype)
    block_m, block_n = pair_tile_sizes(H)
    shape = dict(H=H, KV_GROUP=H // k.shape[1], M=M, MP=_pow2(M, 1), DH=DH, HP=_pow2(H), BLOCK_M=block_m,
                 BLOCK_N=block_n, BLOCK_D=16, CAUSAL=causal, WINDOWED=window > 0, QK_FP32=qk_fp32,
                 DOT_PRECISION=precision)
    scale_log2 = scale * math.log2(math.e)
    dev, f32 = q.device, torch.float32

    def run(rows, lse, store_map=False, sum_rows=False, write_alpha=False, weights=None):
        R = N if rows is None else rows.numel()
        maps = torch.zeros(B, M, R, N, device=dev, dtype=f32) if store_map else lse
        sums = torch.empty(B, M, R, device=dev, dtype=f32) if sum_rows else lse
        alpha = torch.zeros(B, H, R, N, device=dev, dtype=f32) if write_alpha else lse
        contract = weights is not None
        K = weights.shape[-2] if contract else 0
        out = torch.zeros(B, M, K, N, device=dev, dtype=f32) if contract else lse
        _attention_pairs_kernel[(triton.cdiv(R, block_m), B)](
            q, k, valid8, rows if rows is not None else lse, lse, grams, row_scale, maps, sums, alpha,
            weights if contract else lse, out, N, R, K, scale_log2, window,
            weights.stride(0) if contract else 0, K * R if contract and weights.dim() == 4 else 0,
            HAS_ROWS=rows is not None, STORE_MAP=store_map, SUM_ROWS=sum_rows, CONTRACT=contract,
            WRITE_ALPHA=write_alpha, BLOCK_K=_pow2(min(K, 64)), num_stages=1, **shape,
        )
        return (maps if store_map else None, sums if sum_rows else None, alpha if write_alpha else None,
                out if contract else None)

    lse_rows = row_lse(q, k, valid8, causal, window, scale, rows)
    if weights is None:
        maps, _, alpha, _ = run(rows, lse_rows, store_map=True, write_alpha=want_alpha)
        return maps, alpha

    lse_all = lse_rows if rows is None else row_lse(q, k, valid8, causal, window, scale)
    # alpha rides along a pass over all rows when it is over all rows, else gets its own
    alpha_here = want_alpha and rows is None
    if normalize_rows:
        _, sums, alpha, _ = run(None, lse_all, sum_rows=True, write_alpha=alpha_here)
        # rows summing to 0 are all-zero: any finite weight keeps them at 0
        weights = torch.where(sums[:, :, None] > 0, weights[:, None] / sums[:, :, None].clamp_min(1e-30), 0.0)
        _, _, _, out = run(None, lse_all, weights=weights.to(f32).contiguous())
    else:
        _, _, alpha, out = run(None, lse_all, write_alpha=alpha_here, weights=weights.to(f32).contiguous())
    if want_alpha and not alpha_here:
        _, _, alpha, _ = run(rows, lse_rows, write_alpha=True)
    return out, alpha
