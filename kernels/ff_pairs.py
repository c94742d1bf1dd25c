"""Feed-forward pair kernels: ||ff_ij||, ||res_ij + ff_ij||, out_scale_i ||C(res_ij + ff_ij) * out_weight||.

Notation and output modes: kobattr/backends/base.py (``ff_maps``). The query rows, the keys they
see, the row log-sum-exp pass and the alpha tiles are those of the attention side (kernels/rows.py).

Per tile of BLOCK_M queries x BLOCK_N keys (BM * BN pairs):
- the pre-activation parts sum_r kappa_ij[r] ff_parts_j[r, f] are a batched ``tl.dot`` over the
  keys, (BN, BM, HP) @ (BN, HP, BLOCK_F), plus the residual slot [i == j] ff_parts_j[H] added on
  diagonal tiles only (same split as the attention Gram form); scaled by in_scale_i coef_in_i
  (+ the gate parts times coef_gate_i) this is a BLOCK_F slice of the hidden row of every pair;
- ff = hidden @ w_out is a tiled GEMM, (BM*BN, BLOCK_F) @ (BLOCK_F, BLOCK_DO), accumulated over
  F for one BLOCK_DO slice of the output at a time; the hidden slice is rebuilt for each output
  slice (HP / BLOCK_DO extra work) rather than kept, so nothing d_ff-wide stays in registers;
- the epilogue adds res_ij (another batched dot over res_parts) and reduces each output slice to
  sums of squares, so the D-wide vector never leaves registers either.
Centring (scope 2 with out_center) would need the mean over all of D before the sum of squares;
instead the launcher centres w_out and res_parts (C is linear) so the GEMM yields C(ff) and C(res)
directly, and scopes 0/1 add the mean back exactly, ||x||^2 = ||C(x)||^2 + D mean(x)^2, with
mean(ff_ij) = hidden_ij . mean_d(w_out) and mean(res_ij) from per-key part means: no cancellation.

The grid of each key-block launch is (query blocks, B, key splits), as in kernels/attention_pairs.py:
a pair costs a whole F x D GEMM here, so one program per query block (rows= of a few rows: one per
batch element) would leave the GPU nearly idle for the longest kernel of all; the splits share out
the key tiles of the launch's key block, and row sums are added atomically across splits and launches.
"""

import torch
import triton
import triton.language as tl

from .rows import LOG2E, alpha_tile, dot_settings, key_split, key_splits, key_tile, pow2, query_block, row_lse


@triton.jit
def _mix_parts(alpha_t, parts_ptr, b, cols, col_ok, diag, has_diagonal, offs, offs_ok, key_start, NB, width,
               H: tl.constexpr, HP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """mix[j, i, x] = sum_{h<H} alpha_t[j, i, h] parts[b, j, h, x] + diag[j, i] parts[b, j, H, x] -> (BN, BM, BX).

    alpha_t (BN, BM, HP) fp32; parts_ptr (B, NB, H+1, width), the parts of keys [key_start, key_start + NB);
    x runs over ``offs``.
    """
    heads = tl.arange(0, HP)
    base = (b * NB + (cols - key_start)) * ((H + 1) * width)  # (BN,)
    parts = tl.load(parts_ptr + base[:, None, None] + heads[None, :, None] * width + offs[None, None, :],
                    mask=col_ok[:, None, None] & (heads < H)[None, :, None] & offs_ok[None, None, :], other=0.0)
    mix = tl.dot(alpha_t, parts.to(tl.float32), input_precision=DOT_PRECISION)
    if has_diagonal:
        residual = tl.load(parts_ptr + base[:, None] + H * width + offs[None, :],
                           mask=col_ok[:, None] & offs_ok[None, :], other=0.0)
        mix = mix + diag[:, :, None] * residual.to(tl.float32)[:, None, :]
    return mix


@triton.jit
def _hidden_slice(alpha_t, ff_ptr, gate_ptr, coef_in_ptr, coef_gate_ptr, in_scale, b, rows, row_ok, cols, col_ok,
                  diag, has_diagonal, f, f_ok, N, key_start, NB, F,
                  H: tl.constexpr, HP: tl.constexpr, GATED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """hidden[j, i, f] = in_scale_i (coef_in_if sum_r kappa_ij[r] ff_j[r, f]
                                       + coef_gate_if sum_r kappa_ij[r] gate_j[r, f]).

    ff_ptr, gate_ptr (B, NB, H+1, F) (keys from key_start); coef_in_ptr, coef_gate_ptr (B, N, F);
    in_scale (BM,) -> (BN, BM, BF).
    """
    coef_offs = (b * N + rows)[:, None] * F + f[None, :]
    coef_mask = row_ok[:, None] & f_ok[None, :]
    coef = tl.load(coef_in_ptr + coef_offs, mask=coef_mask, other=0.0).to(tl.float32) * in_scale[:, None]
    hidden = _mix_parts(alpha_t, ff_ptr, b, cols, col_ok, diag, has_diagonal, f, f_ok, key_start, NB, F, H, HP,
                        DOT_PRECISION) * coef[None, :, :]
    if GATED:
        coef = tl.load(coef_gate_ptr + coef_offs, mask=coef_mask, other=0.0).to(tl.float32) * in_scale[:, None]
        hidden += _mix_parts(alpha_t, gate_ptr, b, cols, col_ok, diag, has_diagonal, f, f_ok, key_start, NB, F,
                             H, HP, DOT_PRECISION) * coef[None, :, :]
    return hidden


@triton.jit
def _ff_tile(q_ptr, k_ptr, lse_ptr, ff_ptr, gate_ptr, res_ptr, in_scale_ptr, res_scale_ptr, out_scale_ptr,
             coef_in_ptr, coef_gate_ptr, w_out_ptr, out_weight_ptr, w_out_mean_ptr, res_mean_ptr,
             b, rows, ridx, row_ok, cols, col_ok, vis, has_diagonal, N, key_start, NB, R, F, D, scale_log2,
             softcap_log2, H: tl.constexpr, KV_GROUP: tl.constexpr, DH: tl.constexpr, HP: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
             BLOCK_DO: tl.constexpr, GATED: tl.constexpr, N_SCOPES: tl.constexpr, CENTER: tl.constexpr,
             SOFTCAP: tl.constexpr, QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """s0 = ||ff_ij||, s1 = ||res_ij + ff_ij||, s2 = out_scale_i ||C(res_ij + ff_ij) * out_weight|| (zeros if
    N_SCOPES == 2): the scope norms of one tile, each (BN, BM) (key-major), 0 on invisible pairs.

    Pointers as in _ff_pairs_kernel; with CENTER, w_out_ptr and res_ptr hold the centred w_out and res_parts.
    """
    alpha = alpha_tile(q_ptr, k_ptr, lse_ptr, b, rows, ridx, row_ok, cols, col_ok, vis, N, R, scale_log2,
                       softcap_log2, H, KV_GROUP, DH, HP, BLOCK_D, QK_FP32, DOT_PRECISION, SOFTCAP)
    alpha_t = tl.permute(alpha, (2, 1, 0))  # (BN, BM, HP): batched over keys
    diag = tl.where(cols[:, None] == rows[None, :], 1.0, 0.0)
    row_offs = b * N + rows
    in_scale = tl.load(in_scale_ptr + row_offs, mask=row_ok, other=0.0).to(tl.float32)
    res_scale = tl.load(res_scale_ptr + row_offs, mask=row_ok, other=0.0).to(tl.float32)
    sq_ff = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    sq_total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    sq_out = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for d0 in range(0, D, BLOCK_DO):
        dd = d0 + tl.arange(0, BLOCK_DO)
        d_ok = dd < D
        ff = tl.zeros((BLOCK_N * BLOCK_M, BLOCK_DO), tl.float32)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            f_ok = f < F
            hidden = _hidden_slice(alpha_t, ff_ptr, gate_ptr, coef_in_ptr, coef_gate_ptr, in_scale, b, rows, row_ok,
                                   cols, col_ok, diag, has_diagonal, f, f_ok, N, key_start, NB, F, H, HP, GATED,
                                   DOT_PRECISION)
            w_out = tl.load(w_out_ptr + f[:, None] * D + dd[None, :], mask=f_ok[:, None] & d_ok[None, :], other=0.0)
            ff = tl.dot(tl.reshape(hidden, (BLOCK_N * BLOCK_M, BLOCK_F)), w_out.to(tl.float32), ff,
                        input_precision=DOT_PRECISION)
        ff = tl.reshape(ff, (BLOCK_N, BLOCK_M, BLOCK_DO))
        total = ff + _mix_parts(alpha_t, res_ptr, b, cols, col_ok, diag, has_diagonal, dd, d_ok, key_start, NB, D,
                                H, HP, DOT_PRECISION) * res_scale[None, :, None]
        sq_ff += tl.sum(ff * ff, 2)
        sq_total += tl.sum(total * total, 2)
        if N_SCOPES == 3:
            weighted = total * tl.load(out_weight_ptr + dd, mask=d_ok, other=0.0).to(tl.float32)[None, None, :]
            sq_out += tl.sum(weighted * weighted, 2)
    if CENTER:
        # add back what centring removed from scopes 0 and 1: D * mean^2
        mean_ff = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            f_ok = f < F
            hidden = _hidden_slice(alpha_t, ff_ptr, gate_ptr, coef_in_ptr, coef_gate_ptr, in_scale, b, rows, row_ok,
                                   cols, col_ok, diag, has_diagonal, f, f_ok, N, key_start, NB, F, H, HP, GATED,
                                   DOT_PRECISION)
            w_mean = tl.load(w_out_mean_ptr + f, mask=f_ok, other=0.0)
            mean_ff += tl.sum(hidden * w_mean[None, None, :], 2)
        heads = tl.arange(0, HP)
        mean_base = (b * NB + (cols - key_start)) * (H + 1)
        res_mean = tl.load(res_mean_ptr + mean_base[:, None] + heads[None, :],
                           mask=col_ok[:, None] & (heads < H)[None, :], other=0.0)
        res_mean_diag = tl.load(res_mean_ptr + mean_base + H, mask=col_ok, other=0.0)
        mean_res = (tl.sum(alpha_t * res_mean[:, None, :], 2) + diag * res_mean_diag[:, None]) * res_scale[None, :]
        sq_ff += D * mean_ff * mean_ff
        mean_total = mean_ff + mean_res
        sq_total += D * mean_total * mean_total
    vis_t = tl.trans(vis)
    out_scale = tl.load(out_scale_ptr + row_offs, mask=row_ok, other=0.0).to(tl.float32)
    return (tl.where(vis_t, tl.sqrt(sq_ff), 0.0), tl.where(vis_t, tl.sqrt(sq_total), 0.0),
            tl.where(vis_t, out_scale[None, :] * tl.sqrt(sq_out), 0.0))


@triton.jit
def _ff_pairs_kernel(
    q_ptr,  # (B, H, N, DH)
    k_ptr,  # (B, H // KV_GROUP, N, DH)
    valid_ptr,  # (B, N) int8
    rows_ptr,  # (R,) int64, read if HAS_ROWS
    lse_ptr,  # (B, H, R) fp32 from rows.row_lse
    ff_ptr,  # (B, NB, H+1, F): the parts of keys [key_start, key_stop) only, NB = key_stop - key_start
    gate_ptr,  # (B, NB, H+1, F), read if GATED
    res_ptr,  # (B, NB, H+1, D), centred over D if CENTER
    in_scale_ptr, res_scale_ptr, out_scale_ptr,  # (B, N) each
    coef_in_ptr,  # (B, N, F)
    coef_gate_ptr,  # (B, N, F), read if GATED
    w_out_ptr,  # (F, D), centred over D if CENTER
    out_weight_ptr,  # (D,), read if N_SCOPES == 3
    w_out_mean_ptr,  # (F,) mean over D of the uncentred w_out, read if CENTER
    res_mean_ptr,  # (B, NB, H+1) mean over D of the uncentred res_parts, read if CENTER
    map_ptr,  # (B, N_SCOPES, R, N) fp32, written if STORE_MAP
    row_sum_ptr,  # (B, N_SCOPES, R) fp32, zeroed, accumulated into (across key splits and launches) if SUM_ROWS
    weights_ptr,  # (B, N_SCOPES, K, R) fp32 with strides (weights_b_stride, weights_s_stride, R, 1), read if CONTRACT
    out_ptr,  # (B, N_SCOPES, K, N) fp32, zeroed, accumulated into if CONTRACT
    N, key_start, key_stop, R, K, F, D, scale_log2, window, radius, softcap_log2, weights_b_stride, weights_s_stride,
    H: tl.constexpr, KV_GROUP: tl.constexpr, DH: tl.constexpr, HP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_DO: tl.constexpr, GATED: tl.constexpr, N_SCOPES: tl.constexpr, CENTER: tl.constexpr,
    HAS_ROWS: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SYMMETRIC: tl.constexpr,
    SOFTCAP: tl.constexpr, STORE_MAP: tl.constexpr, SUM_ROWS: tl.constexpr, CONTRACT: tl.constexpr,
    BLOCK_K: tl.constexpr, QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """map[b, s, r, j] = scope s of pair (i = rows[r], j) (see _ff_tile) for the keys key_start <= j < key_stop,
    and what the flags ask of it: STORE_MAP: the map (columns j); SUM_ROWS: row_sum[b, s, r] += its sums over
    those j (so that launches over successive key blocks add up to the sums over all keys);
    CONTRACT: out[b, s, k, j] += sum_r weights[b, s, k, r] map[b, s, r, j]
    (atomically, as in kernels/attention_pairs.py).

    One program per (block of BLOCK_M query rows, b, key split), looping over its share (rows.key_split) of
    the key tiles of the block those rows can see. key_start is a multiple of BLOCK_N (the launcher's key
    blocks are), so tiles stay aligned.
    """
    b = tl.program_id(1).to(tl.int64)
    ridx, row_ok, rows, row_valid, row_first, row_last, key_lo, key_hi = query_block(
        rows_ptr, valid_ptr, b, N, R, window, radius, BLOCK_M, BLOCK_N, HAS_ROWS, CAUSAL, WINDOWED, SYMMETRIC)
    key_lo, key_hi = key_split(tl.maximum(key_lo, key_start), tl.minimum(key_hi, key_stop), BLOCK_N)
    sum0 = tl.zeros((BLOCK_M,), tl.float32)
    sum1 = tl.zeros((BLOCK_M,), tl.float32)
    sum2 = tl.zeros((BLOCK_M,), tl.float32)
    NB = key_stop - key_start
    for start in range(key_lo, key_hi, BLOCK_N):
        cols, col_ok, vis, has_diagonal = key_tile(valid_ptr, b, start, rows, row_valid, row_first, row_last, N,
                                                   window, radius, BLOCK_N, CAUSAL, WINDOWED, SYMMETRIC)
        in_block = cols < key_stop
        col_ok = col_ok & in_block
        vis = vis & in_block[None, :]
        s0, s1, s2 = _ff_tile(q_ptr, k_ptr, lse_ptr, ff_ptr, gate_ptr, res_ptr, in_scale_ptr, res_scale_ptr,
                              out_scale_ptr, coef_in_ptr, coef_gate_ptr, w_out_ptr, out_weight_ptr, w_out_mean_ptr,
                              res_mean_ptr, b, rows, ridx, row_ok, cols, col_ok, vis, has_diagonal, N, key_start,
                              NB, R, F, D,
                              scale_log2, softcap_log2, H, KV_GROUP, DH, HP, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_F,
                              BLOCK_DO, GATED, N_SCOPES, CENTER, SOFTCAP, QK_FP32, DOT_PRECISION)
        if STORE_MAP:
            offs = (b * N_SCOPES * R + ridx[None, :]) * N + cols[:, None]  # (BN, BM), scope 0
            mask = row_ok[None, :] & col_ok[:, None]
            tl.store(map_ptr + offs, s0, mask=mask)
            tl.store(map_ptr + offs + R * N, s1, mask=mask)
            if N_SCOPES == 3:
                tl.store(map_ptr + offs + 2 * R * N, s2, mask=mask)
        if SUM_ROWS:
            sum0 += tl.sum(s0, 0)
            sum1 += tl.sum(s1, 0)
            sum2 += tl.sum(s2, 0)
        if CONTRACT:
            for k0 in range(0, K, BLOCK_K):
                kidx = k0 + tl.arange(0, BLOCK_K)
                w_offs = weights_ptr + b * weights_b_stride + kidx[:, None] * R + ridx[None, :]
                w_mask = (kidx < K)[:, None] & row_ok[None, :]
                out_offs = out_ptr + (b * N_SCOPES * K + kidx[:, None]) * N + cols[None, :]
                out_mask = (kidx < K)[:, None] & col_ok[None, :]
                part = tl.dot(tl.load(w_offs, mask=w_mask, other=0.0), tl.trans(s0), input_precision=DOT_PRECISION)
                tl.atomic_add(out_offs, part, mask=out_mask, sem="relaxed")
                part = tl.dot(tl.load(w_offs + weights_s_stride, mask=w_mask, other=0.0), tl.trans(s1),
                              input_precision=DOT_PRECISION)
                tl.atomic_add(out_offs + K * N, part, mask=out_mask, sem="relaxed")
                if N_SCOPES == 3:
                    part = tl.dot(tl.load(w_offs + 2 * weights_s_stride, mask=w_mask, other=0.0), tl.trans(s2),
                                  input_precision=DOT_PRECISION)
                    tl.atomic_add(out_offs + 2 * K * N, part, mask=out_mask, sem="relaxed")
    if SUM_ROWS:  # the key splits of a row block add up
        offs = row_sum_ptr + b * N_SCOPES * R + ridx
        tl.atomic_add(offs, sum0, mask=row_ok, sem="relaxed")
        tl.atomic_add(offs + R, sum1, mask=row_ok, sem="relaxed")
        if N_SCOPES == 3:
            tl.atomic_add(offs + 2 * R, sum2, mask=row_ok, sem="relaxed")


def ff_settings(H):
    """Tile and warps of the FF kernel for H heads: BM x BN pairs, q and k chunks BLOCK_D wide, the hidden
    slice BLOCK_F wide, the output slice BLOCK_DO wide. Up to 32 heads, 8 warps hold the (BM BN, BLOCK_DO) =
    (128, 128) output accumulator at 64 fp32 a thread: the fastest of eight candidates on an H200
    (benchmarks/gpu_tiles.py; Llama-7B shape, bf16, N = 256 / 512: 0.52x / 0.55x the time of the 16 x 4 pair
    tile with 32-wide F, 64-wide output slices and 4 warps). More heads keep that smaller tile: the larger
    one's HP x 128-pair alpha tile would need more shared memory than sm_90 has. BM = 16 is already the
    least tl.dot takes, so few rows need no tile of their own."""
    if pow2(H) <= 32:
        return dict(BLOCK_M=16, BLOCK_N=8, BLOCK_D=16, BLOCK_F=64, BLOCK_DO=128, num_warps=8, num_stages=1)
    return dict(BLOCK_M=16, BLOCK_N=4, BLOCK_D=16, BLOCK_F=32, BLOCK_DO=64, num_warps=4, num_stages=1)


# a key block's parts (ff, gate and res over B x block x (H+1)) stay under this many bytes (launcher's default)
KEY_BLOCK_BYTES = 256 * 2 ** 20


def choose_key_block(B, N, H, F, D, gated, element_size, block_n, budget=None):
    """Keys per launch: a multiple of the tile's BLOCK_N whose parts (in the kernel's float32 when centred)
    fit ``budget`` bytes (KEY_BLOCK_BYTES), at least one tile, at most N rounded up to a tile."""
    per_key = B * (H + 1) * ((2 if gated else 1) * F + D) * max(element_size, 4)
    keys = max((budget or KEY_BLOCK_BYTES) // max(per_key, 1), 1)
    return max(block_n, min(keys, triton.cdiv(max(N, 1), block_n) * block_n) // block_n * block_n)


def ff_maps(q, k, valid, causal, window, scale, ff_parts, gate_parts, res_parts, in_scale, res_scale, out_scale,
            coef_in, coef_gate, w_out, out_weight, out_center, n_scopes, rows=None, weights=None,
            normalize_rows=False, radius=0, softcap=0.0, lse2=None, key_block=None, key_block_size=None,
            key_block_bytes=None):
    """The ``ff_maps`` primitive of kobattr/backends/base.py on contiguous CUDA (or interpreted) tensors.

    Shapes as in base.py; radius (0 = none) and softcap (0 = none) as in base.Attention. Returns
    (B, n_scopes, R, N) or, with weights (B, K, N), their contraction over the selected rows
    (B, n_scopes, K, N) float32.

    The per-key parts come either whole (ff_parts, gate_parts or None, res_parts: (B, N, H+1, F / D)) or from
    ``key_block``: keys (a slice) -> (ff_parts, gate_parts or None, res_parts) of those keys (B, C, H+1, F / D),
    with ff_parts = gate_parts = res_parts = None; N is q's. The kernel then runs once per block of
    ``key_block_size`` keys (a multiple of the key tile; default: whole tensors in one launch, ``key_block``
    parts in blocks of at most ``key_block_bytes``, KEY_BLOCK_BYTES if None), so only one block's parts are
    ever held.
    """
    B, H, N, DH = q.shape
    F, D = w_out.shape
    R = N if rows is None else rows.numel()
    dev, f32 = q.device, torch.float32
    if R == 0:  # nothing to launch: no rows, and a contraction over no rows is 0
        return torch.zeros(B, n_scopes, 0 if weights is None else weights.shape[1], N, device=dev, dtype=f32)
    tile = ff_settings(H)
    block_m, block_n = tile["BLOCK_M"], tile["BLOCK_N"]
    if key_block is None:
        gated = gate_parts is not None
        if key_block_size is None:
            key_block_size = max(N, 1)

        def key_block(keys):
            return ff_parts[:, keys], gate_parts[:, keys] if gated else None, res_parts[:, keys]
    else:
        assert ff_parts is None and gate_parts is None and res_parts is None, "parts come whole or by key_block"
        gated = coef_gate is not None
        if key_block_size is None:
            key_block_size = choose_key_block(B, N, H, F, D, gated, w_out.element_size(), block_n, key_block_bytes)
    step = triton.cdiv(max(int(key_block_size), 1), block_n) * block_n  # blocks start on key tiles
    grid = (triton.cdiv(R, block_m), B)
    center = bool(out_center) and n_scopes == 3
    valid8 = valid.to(torch.int8)
    w_out_mean = in_scale  # placeholder, never read unless CENTER
    if center:
        w_out_mean = w_out.to(f32).mean(1)
        w_out = (w_out.to(f32) - w_out_mean[:, None]).contiguous()
    dots = dot_settings(q.dtype)
    shape = dict(H=H, KV_GROUP=H // k.shape[1], DH=DH, HP=pow2(H), **tile, GATED=gated, N_SCOPES=n_scopes,
                 CENTER=center, HAS_ROWS=rows is not None, CAUSAL=causal, WINDOWED=window > 0, SYMMETRIC=radius > 0,
                 SOFTCAP=softcap > 0, QK_FP32=dots[0], DOT_PRECISION=dots[1])
    if lse2 is None:  # the row statistics, unless the caller has them (base 2, (B, H, R) for the selected rows)
        lse2 = row_lse(q, k, valid8, causal, window, scale, rows, dots, radius=radius, softcap=softcap)
    lse = lse2

    def block_tensors(keys):
        """The kernel's per-key and per-row pointers for the keys ``keys``: the block's parts, contiguous
        (centred over D, with their means, if CENTER)."""
        ff, gate, res = key_block(keys)
        assert (gate is not None) == gated, "gate parts must come exactly when coef_gate does"
        res_mean = in_scale  # placeholder, never read unless CENTER
        if center:
            res_mean = res.to(f32).mean(-1)
            res = res.to(f32) - res_mean[..., None]
        return tuple(t.contiguous() for t in (
            ff, gate if gated else ff, res, in_scale, res_scale, out_scale, coef_in, coef_gate if gated else coef_in,
            w_out, out_weight if out_weight is not None else in_scale, w_out_mean, res_mean))

    def sweep(store_map=False, sum_rows=False, weights=None):
        """One launch per key block, each adding its columns to the same map / row sums / contraction."""
        maps = torch.zeros(B, n_scopes, R, N, device=dev, dtype=f32) if store_map else lse
        sums = torch.zeros(B, n_scopes, R, device=dev, dtype=f32) if sum_rows else lse
        contract = weights is not None
        K = weights.shape[-2] if contract else 0
        out = torch.zeros(B, n_scopes, K, N, device=dev, dtype=f32) if contract else lse
        for key_start in range(0, N, step):
            key_stop = min(key_start + step, N)
            splits = key_splits(grid[0] * B, triton.cdiv(key_stop - key_start, block_n), dev)
            _ff_pairs_kernel[grid + (splits,)](
                q, k, valid8, rows if rows is not None else lse, lse, *block_tensors(slice(key_start, key_stop)),
                maps, sums, weights if contract else lse, out, N, key_start, key_stop, R, K, F, D, scale * LOG2E,
                window, radius, softcap * LOG2E, weights.stride(0) if contract else 0,
                K * R if contract and weights.dim() == 4 else 0,
                STORE_MAP=store_map, SUM_ROWS=sum_rows, CONTRACT=contract, BLOCK_K=pow2(min(K, 64)), **shape,
            )
        return maps if store_map else sums if sum_rows else out

    if weights is None:
        return sweep(store_map=True)
    # the kernel reads weights by output row r: those of the selected rows, (B, K, R)
    weights = (weights if rows is None else weights[:, :, rows]).to(f32)
    if normalize_rows:  # each row's sum over all keys first: a sweep over every key block, then the contraction
        sums = sweep(sum_rows=True)
        weights = torch.where(sums[:, :, None] > 0, weights[:, None] / sums[:, :, None].clamp_min(1e-30), 0.0)
    return sweep(weights=weights.contiguous())


@triton.jit
def _ff_prologue_kernel(
    q_ptr,  # (B, H, N, DH)
    k_ptr,  # (B, H // KV_GROUP, N, DH)
    valid_ptr,  # (B, N) int8
    rows_ptr,  # (R,) int64: the tile's query rows
    lse_ptr,  # (B, H, R) fp32, base 2, of those rows
    ff_ptr,  # (B, C, H+1, F): the parts of the tile's keys [key_start, key_start + C)
    gate_ptr,  # (B, C, H+1, F), read if GATED
    in_scale_ptr,  # (B, N)
    coef_in_ptr,  # (B, N, F)
    coef_gate_ptr,  # (B, N, F), read if GATED
    hidden_ptr,  # (B, C, R, F) in the GEMM dtype, written
    kappa_ptr,  # (B, C, R, H+1) fp32, written
    N, key_start, R, C, F, scale_log2, window, radius, softcap_log2,
    H: tl.constexpr, KV_GROUP: tl.constexpr, DH: tl.constexpr, HP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    GATED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SYMMETRIC: tl.constexpr,
    SOFTCAP: tl.constexpr, QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """hidden[b, c, r, f] = in_scale_i (coef_in_if sum_s kappa_ij[s] ff_j[s, f] + coef_gate_if sum_s kappa_ij[s]
    gate_j[s, f]) and kappa[b, c, r] = kappa_ij, for i = rows[r], j = key_start + c (kappa 0 where j is invisible
    from i; hidden rows of invisible pairs may be left unwritten in a sub-tile that holds no visible pair).

    The prologue of the FF GEMM (backends/triton_backend.py TritonGemmBackend): the per-pair hidden rows of one
    tile, key-major, written in the GEMM dtype, with alpha recomputed from q, k and the row statistics
    (rows.alpha_tile); the (pairs, F) @ (F, D) product with W_out and the epilogue follow in torch. One program
    per (BLOCK_M rows, BLOCK_N keys, b); the hidden slices are _hidden_slice's, BLOCK_F wide.
    """
    b = tl.program_id(2).to(tl.int64)
    ridx, row_ok, rows, row_valid, row_first, row_last, _, _ = query_block(
        rows_ptr, valid_ptr, b, N, R, window, radius, BLOCK_M, BLOCK_N, True, CAUSAL, WINDOWED, SYMMETRIC)
    start = key_start + tl.program_id(1) * BLOCK_N
    cols, col_ok, vis, has_diagonal = key_tile(valid_ptr, b, start, rows, row_valid, row_first, row_last, N, window,
                                               radius, BLOCK_N, CAUSAL, WINDOWED, SYMMETRIC)
    in_tile = cols < key_start + C
    col_ok = col_ok & in_tile
    vis = vis & in_tile[None, :]
    alpha = alpha_tile(q_ptr, k_ptr, lse_ptr, b, rows, ridx, row_ok, cols, col_ok, vis, N, R, scale_log2,
                       softcap_log2, H, KV_GROUP, DH, HP, BLOCK_D, QK_FP32, DOT_PRECISION, SOFTCAP)
    alpha_t = tl.permute(alpha, (2, 1, 0))  # (BN, BM, HP)
    diag = tl.where((cols[:, None] == rows[None, :]) & tl.trans(vis), 1.0, 0.0)  # [i == j] on visible pairs only
    in_scale = tl.load(in_scale_ptr + b * N + rows, mask=row_ok, other=0.0).to(tl.float32)
    pair = (b * C + (cols - key_start))[:, None] * R + ridx[None, :]  # (BN, BM)
    pair_ok = col_ok[:, None] & row_ok[None, :]
    heads = tl.arange(0, HP)
    kappa_offs = pair[:, :, None] * (H + 1) + heads[None, None, :]
    tl.store(kappa_ptr + kappa_offs, alpha_t, mask=pair_ok[:, :, None] & (heads < H)[None, None, :])
    tl.store(kappa_ptr + pair * (H + 1) + H, diag, mask=pair_ok)
    # the GEMM reads the visible pairs' rows only: a sub-tile without one (causal, window, padding) writes none
    f_stop = tl.where(tl.max(tl.max(vis.to(tl.int32), 1), 0) > 0, F, 0)
    for f0 in range(0, f_stop, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        f_ok = f < F
        hidden = _hidden_slice(alpha_t, ff_ptr, gate_ptr, coef_in_ptr, coef_gate_ptr, in_scale, b, rows, row_ok,
                               cols, col_ok, diag, has_diagonal, f, f_ok, N, key_start, C, F, H, HP, GATED,
                               DOT_PRECISION)
        tl.store(hidden_ptr + pair[:, :, None] * F + f[None, None, :], hidden.to(hidden_ptr.dtype.element_ty),
                 mask=pair_ok[:, :, None] & f_ok[None, None, :])


def prologue_settings(H):
    """Tile and warps of _ff_prologue_kernel: the pair tile and hidden slice of ff_settings (the same
    _hidden_slice), without its output slice."""
    tile = ff_settings(H)
    del tile["BLOCK_DO"]
    return tile


def ff_prologue(q, k, valid8, causal, window, scale, rows, lse2, ff_parts, gate_parts, in_scale, coef_in,
                coef_gate, key_start, gemm_dtype, radius=0, softcap=0.0):
    """(kappa (B, C, R, H+1) float32, hidden (B, C, R, F) in ``gemm_dtype``) of the query rows ``rows`` (R,) int64
    against the C keys of ff_parts (B, C, H+1, F) from ``key_start`` on; lse2 (B, H, R) base-2 row statistics
    of those rows; every tensor contiguous, on q's device. See _ff_prologue_kernel."""
    B, H, N, DH = q.shape
    C, F = ff_parts.shape[1], ff_parts.shape[3]
    R = rows.numel()
    hidden = torch.empty(B, C, R, F, device=q.device, dtype=gemm_dtype)
    kappa = torch.empty(B, C, R, H + 1, device=q.device, dtype=torch.float32)
    tile = prologue_settings(H)
    qk_fp32, precision = dot_settings(q.dtype)
    gated = gate_parts is not None
    grid = (triton.cdiv(R, tile["BLOCK_M"]), triton.cdiv(C, tile["BLOCK_N"]), B)
    _ff_prologue_kernel[grid](
        q, k, valid8, rows, lse2, ff_parts, gate_parts if gated else ff_parts, in_scale, coef_in,
        coef_gate if gated else coef_in, hidden, kappa, N, key_start, R, C, F, scale * LOG2E, window, radius,
        softcap * LOG2E, H=H, KV_GROUP=H // k.shape[1], DH=DH, HP=pow2(H), GATED=gated, CAUSAL=causal,
        WINDOWED=window > 0, SYMMETRIC=radius > 0, SOFTCAP=softcap > 0, QK_FP32=qk_fp32, DOT_PRECISION=precision,
        **tile,
    )
    return kappa, hidden


@triton.jit
def _epilogue_pass(ff_ptr, res_ptr, out_weight_ptr, slot, live, kappa, slots, cidx, C, res_scale, parts_base, mean, D,
                   H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr,
                   SUMS_ONLY: tl.constexpr, OUT: tl.constexpr, WEIGHTED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(sum_d t, sum_d ff^2, sum_d t^2, sum_d ((t - mean) * out_weight)^2) over D, each (BN, BM), of the pairs of
    _ff_epilogue_kernel: t = ff + res_scale kappa . res; only the first if SUMS_ONLY, the last only if OUT."""
    sums = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    sq_ff = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    sq_total = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    sq_out = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for d0 in range(0, D, BLOCK_DO):
        dd = d0 + tl.arange(0, BLOCK_DO)
        d_ok = dd < D
        ff = tl.load(ff_ptr + slot[:, :, None] * D + dd[None, None, :], mask=live[:, :, None] & d_ok[None, None, :],
                     other=0.0)
        parts = tl.load(res_ptr + parts_base[:, None, None] + slots[None, :, None] * D + dd[None, None, :],
                        mask=(cidx < C)[:, None, None] & (slots < H + 1)[None, :, None] & d_ok[None, None, :],
                        other=0.0)
        total = ff + tl.dot(kappa, parts, input_precision=DOT_PRECISION) * res_scale[None, :, None]
        if SUMS_ONLY:
            sums += tl.sum(total, 2)
        else:
            sq_ff += tl.sum(ff * ff, 2)
            sq_total += tl.sum(total * total, 2)
            if OUT:
                shifted = tl.where(d_ok[None, None, :], total - mean[:, :, None], 0.0)
                if WEIGHTED:
                    shifted = shifted * tl.load(out_weight_ptr + dd, mask=d_ok, other=0.0)[None, None, :]
                sq_out += tl.sum(shifted * shifted, 2)
    return sums, sq_ff, sq_total, sq_out


@triton.jit
def _ff_epilogue_kernel(
    ff_ptr,  # (P, D) fp32: the GEMM's rows of the tile's visible pairs
    slot_ptr,  # (B, C, R) int32: the GEMM row of each pair of the tile, -1 for the invisible ones
    kappa_ptr,  # (B, C, R, H+1) fp32
    res_ptr,  # (B, C, H+1, D) fp32: the residual parts of the tile's keys
    rows_ptr,  # (R,) int64: the tile's query rows
    res_scale_ptr, out_scale_ptr,  # (B, N) each
    out_weight_ptr,  # (D,), read if WEIGHTED
    norms_ptr,  # (B, C, R, N_SCOPES) fp32, written
    N, R, C, D,
    H: tl.constexpr, HP1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DO: tl.constexpr,
    N_SCOPES: tl.constexpr, CENTER: tl.constexpr, WEIGHTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """norms[b, c, r] = (||ff_ij||, ||t_ij||, out_scale_i ||C(t_ij) * out_weight||), t_ij = ff_ij + res_scale_i
    sum_s kappa_ij[s] res_j[s], ff_ij = ff[slot[b, c, r]], for i = rows[r] and the tile's key j = c (0 where
    slot < 0; the third only if N_SCOPES == 3, C = subtract the mean over D if CENTER).

    The epilogue of the FF GEMM (TritonGemmBackend): one program per (BLOCK_M rows, BLOCK_N keys, b), res as the
    batched dot (BN, BM, HP1) @ (BN, HP1, BLOCK_DO) over the keys, D in slices of BLOCK_DO (_epilogue_pass), a
    first pass for the mean when CENTER; the D-wide vectors never leave registers.
    """
    b = tl.program_id(2).to(tl.int64)
    ridx = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cidx = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = ridx < R
    pair = (b * C + cidx)[:, None] * R + ridx[None, :]  # (BN, BM)
    slot = tl.load(slot_ptr + pair, mask=(cidx < C)[:, None] & row_ok[None, :], other=-1).to(tl.int64)
    live = slot >= 0
    slots = tl.arange(0, HP1)
    kappa = tl.load(kappa_ptr + pair[:, :, None] * (H + 1) + slots[None, None, :],
                    mask=live[:, :, None] & (slots < H + 1)[None, None, :], other=0.0)
    rows = tl.load(rows_ptr + ridx, mask=row_ok, other=0)
    res_scale = tl.load(res_scale_ptr + b * N + rows, mask=row_ok, other=0.0)
    parts_base = (b * C + cidx) * ((H + 1) * D)  # (BN,)
    mean = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    if CENTER:  # a first pass for the mean over D of t_ij
        mean = _epilogue_pass(ff_ptr, res_ptr, out_weight_ptr, slot, live, kappa, slots, cidx, C, res_scale,
                              parts_base, mean, D, H, BLOCK_M, BLOCK_N, BLOCK_DO, True, False, False,
                              DOT_PRECISION)[0] / D
    _, sq_ff, sq_total, sq_out = _epilogue_pass(ff_ptr, res_ptr, out_weight_ptr, slot, live, kappa, slots, cidx, C,
                                                res_scale, parts_base, mean, D, H, BLOCK_M, BLOCK_N, BLOCK_DO, False,
                                                N_SCOPES == 3, WEIGHTED, DOT_PRECISION)
    out_scale = tl.load(out_scale_ptr + b * N + rows, mask=row_ok, other=0.0)
    ok = live & (cidx < C)[:, None] & row_ok[None, :]
    tl.store(norms_ptr + pair * N_SCOPES, tl.where(live, tl.sqrt(sq_ff), 0.0), mask=ok)
    tl.store(norms_ptr + pair * N_SCOPES + 1, tl.where(live, tl.sqrt(sq_total), 0.0), mask=ok)
    if N_SCOPES == 3:
        tl.store(norms_ptr + pair * N_SCOPES + 2, tl.where(live, out_scale[None, :] * tl.sqrt(sq_out), 0.0), mask=ok)


def epilogue_settings(H):
    """Tile and warps of _ff_epilogue_kernel: 16 rows x 8 keys (tl.dot's least M is 16), output slices as wide
    as the (BN, H+1 padded, BLOCK_DO) fp32 parts tile allows in shared memory (128 wide up to 15 heads, 64 up
    to 31, 32 up to 63, 16 beyond); 4 warps."""
    slots = pow2(H + 1)
    return dict(BLOCK_M=16, BLOCK_N=8, BLOCK_DO=max(16, min(128, 2048 // slots)), num_warps=4, num_stages=1)


def ff_epilogue(ff, slot, kappa, res_parts, rows, res_scale, out_scale, out_weight, out_center, n_scopes):
    """(B, C, R, n_scopes) float32 scope norms of a tile (see _ff_epilogue_kernel) from the GEMM rows ff (P, D)
    float32, slot (B, C, R) int32, kappa (B, C, R, H+1) and res_parts (B, C, H+1, D) float32, rows (R,) int64,
    res_scale, out_scale (B, N), out_weight (D,) or None; every tensor contiguous, on one device."""
    B, C, R, H1 = kappa.shape
    N, D = res_scale.shape[1], ff.shape[1]
    norms = torch.zeros(B, C, R, n_scopes, device=ff.device, dtype=torch.float32)
    tile = epilogue_settings(H1 - 1)
    grid = (triton.cdiv(R, tile["BLOCK_M"]), triton.cdiv(C, tile["BLOCK_N"]), B)
    _ff_epilogue_kernel[grid](
        ff, slot, kappa, res_parts, rows, res_scale, out_scale, out_weight if out_weight is not None else res_scale,
        norms, N, R, C, D, H=H1 - 1, HP1=pow2(H1), N_SCOPES=n_scopes, CENTER=bool(out_center) and n_scopes == 3,
        WEIGHTED=out_weight is not None, DOT_PRECISION=dot_settings(torch.float32)[1], **tile,
    )
    return norms
