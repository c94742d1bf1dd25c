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

The second experiment, alpha staged: the production kernel's tensor-core Gram product without its register
state. Each key tile loops over heads (2D ``tl.dot`` q_h k_h^T, small state) and writes alpha_h into the
program's own scratch tile (BN, HP, BM) in global memory (L2-resident: a persistent grid of a few programs
per SM, each reusing its scratch), then reads it back SUB_N keys at a time as (SUB_N, BM, HP) for the batched
dot with the Gram: the (BM x BN x H) state the production kernel keeps in registers lives in L2, so the key tile
BN (which sets how often q is re-read) no longer sets the registers. Compiled by triton 3.6 for sm_90 (bf16
scratch, 32 x 32 tiles, 4 warps): Llama-7B 160 registers, 12 warps per SM, 8.8 issue cycles per pair; BERT-base
128 registers, 16 warps, 2.8 cycles (benchmarks/results/kernel_static_2026-12-06.md).
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


def streamed_constants(H, KV, DH, causal, tile):
    """The constexpr arguments of _streamed_pairs_kernel (num_warps apart) for H query and KV key heads."""
    return dict(H=H, KV_GROUP=H // KV, DH=DH, DP=pow2(DH), CP=pow2(H), CAUSAL=causal,
                BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"])


def streamed_maps(q, k, causal, scale, factor, residual, row_scale, lse2, tile=None):
    """(B, N, N) float32 map of one Gram from q (B, H, N, Dh), k (B, KV, N, Dh), gram_factors' output, row_scale
    (B, N) float32 and lse2 (B, H, N), the base-2 row log-sum-exp of kernels/rows.row_lse (every key valid)."""
    B, H, N, DH = q.shape
    tile = tile or streamed_settings(H)
    out = torch.zeros(B, N, N, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(N, tile["BLOCK_M"]), B)
    _streamed_pairs_kernel[grid](q, k, lse2, factor, residual, row_scale, out, N, scale * LOG2E,
                                 num_warps=tile["num_warps"], **streamed_constants(H, k.shape[1], DH, causal, tile))
    return out


@triton.jit
def _staged_pairs_kernel(
    q_ptr,  # (B, H, N, DH)
    k_ptr,  # (B, H // KV_GROUP, N, DH)
    lse_ptr,  # (B, H, N) fp32, base 2 (kernels/rows.row_lse)
    gram_ptr,  # (B, N, HP, HP) in the scratch dtype: G_j[:H, :H], zero-padded
    residual_ptr,  # (B, N, HP) fp32: G_j[H, :H], zero-padded
    residual_diag_ptr,  # (B, N) fp32: G_j[H, H]
    row_scale_ptr,  # (B, N) fp32
    map_ptr,  # (B, N, N) fp32, written
    scratch_ptr,  # (programs, BLOCK_N, HP, BLOCK_M) in the scratch dtype, zeroed: each program's own tile
    N, B, scale_log2,
    H: tl.constexpr, KV_GROUP: tl.constexpr, DH: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, CAUSAL: tl.constexpr,
    QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """map[b, i, j] = row_scale[b, i] sqrt(kappa_ij^T G_j kappa_ij), kappa_ij = (alpha_1ij .. alpha_Hij, [i == j]),
    alpha_hij = exp2(scale_log2 q^h_i . k^{h // KV_GROUP}_j - lse[b, h, i]) for visible pairs (j <= i if CAUSAL).

    A persistent grid over the query blocks, longest (causal) first, dealt out boustrophedon: program p takes
    block p in round 0, programs - 1 - p in round 1, ..., so that the causal lengths even out. The scratch rows of
    heads H..HP-1 are never written (zero), so every read of it is one contiguous block."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    scratch = scratch_ptr + pid.to(tl.int64) * (BLOCK_N * HP * BLOCK_M)
    blocks = tl.cdiv(N, BLOCK_M)
    m = tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, DP)
    heads = tl.arange(0, HP)
    sub = tl.arange(0, SUB_N)
    chunk = tl.arange(0, SUB_N * HP * BLOCK_M)  # one sub-block of the scratch, contiguous
    gram_chunk = tl.arange(0, SUB_N * HP * HP)  # the padded Grams of SUB_N consecutive keys, contiguous
    for first in range(0, blocks * B, programs):
        task = first + pid
        if (first // programs) % 2 == 1:
            task = first + programs - 1 - pid
        live = task < blocks * B  # the last round has fewer blocks than programs
        b = (task // blocks).to(tl.int64)
        block = blocks - 1 - task % blocks
        rows = tl.where(live, block * BLOCK_M, N) + m  # a task past the last: rows past N, nothing to do
        row_ok = rows < N
        key_hi = N
        if CAUSAL:
            key_hi = tl.minimum(block * BLOCK_M + BLOCK_M, N)
        scale = tl.load(row_scale_ptr + b * N + rows, mask=row_ok, other=0.0)
        for start in range(0, tl.where(live, key_hi, 0), BLOCK_N):
            cols = start + n
            visible = row_ok[:, None] & (cols < N)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None])
            for h in range(H):
                q = tl.load(q_ptr + ((b * H + h) * N + rows)[:, None] * DH + d[None, :],
                            mask=row_ok[:, None] & (d < DH)[None, :], other=0.0)
                k = tl.load(k_ptr + ((b * (H // KV_GROUP) + h // KV_GROUP) * N + cols)[None, :] * DH + d[:, None],
                            mask=(cols < N)[None, :] & (d < DH)[:, None], other=0.0)
                if QK_FP32:
                    q = q.to(tl.float32)
                    k = k.to(tl.float32)
                lse = tl.load(lse_ptr + (b * H + h) * N + rows, mask=row_ok, other=0.0)
                alpha = tl.where(visible, tl.exp2(tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
                                                  - lse[:, None]), 0.0)
                tl.store(scratch + (n[None, :] * HP + h) * BLOCK_M + m[:, None], alpha.to(scratch_ptr.dtype.element_ty))
            tl.debug_barrier()  # every head's alpha of the tile is in the scratch before it is read back
            for part in tl.static_range(BLOCK_N // SUB_N):
                key0 = start + part * SUB_N
                keys = key0 + sub  # (SUB_N,)
                key_ok = keys < N
                alpha_t = tl.permute(tl.reshape(tl.load(scratch + part * (SUB_N * HP * BLOCK_M) + chunk),
                                                (SUB_N, HP, BLOCK_M)), (0, 2, 1))  # (SUB_N, BM, HP)
                # keys past N read the Grams of the next batch element or past the end: masked as a whole key
                gram_ok = (key0 + gram_chunk // (HP * HP)) < N
                gram = tl.reshape(tl.load(gram_ptr + (b * N + key0) * (HP * HP) + gram_chunk,
                                          mask=gram_ok, other=0.0), (SUB_N, HP, HP))
                if QK_FP32:  # the interpreter's bf16 dot is wrong: the product of the rounded values in fp32
                    alpha_t = alpha_t.to(tl.float32)
                    gram = gram.to(tl.float32)
                quad = tl.sum(tl.dot(alpha_t, gram, input_precision=DOT_PRECISION).to(tl.float32)
                              * alpha_t.to(tl.float32), 2)  # (SUB_N, BM)
                # kappa's last slot is [i == j]: 2 G[H, :H] . alpha + G[H, H] on the diagonal (G symmetric)
                diagonal = (keys[:, None] == rows[None, :]) & row_ok[None, :]
                if block * BLOCK_M < key0 + SUB_N and key0 < block * BLOCK_M + BLOCK_M:
                    res_row = tl.load(residual_ptr + (b * N + keys)[:, None] * HP + heads[None, :],
                                      mask=key_ok[:, None], other=0.0)  # (SUB_N, HP)
                    res_diag = tl.load(residual_diag_ptr + b * N + keys, mask=key_ok, other=0.0)
                    res_dot = tl.sum(alpha_t.to(tl.float32) * res_row[:, None, :], 2)
                    quad = quad + tl.where(diagonal, 2.0 * res_dot + res_diag[:, None], 0.0)
                tl.store(map_ptr + (b * N + rows[None, :]) * N + keys[:, None],
                         scale[None, :] * tl.sqrt(tl.maximum(quad, 0.0)), mask=key_ok[:, None] & row_ok[None, :])
            tl.debug_barrier()  # the scratch is read before the next tile overwrites it


def staged_settings(H, scratch_dtype=torch.bfloat16):
    """BLOCK_M, BLOCK_N, SUB_N, num_warps and programs per SM of the staged experiment: as many 4-warp programs as
    an SM holds at once by a triton 3.6 sm_90 compile (warps per SM: 12 in bfloat16 and 8 in float32 for 32 heads,
    16 and 12 for 12 heads), so that the scratch tiles in use, programs x BN x HP x BM elements, stay in L2."""
    warps_per_sm = (12 if pow2(H) >= 32 else 16) if scratch_dtype.itemsize == 2 else (8 if pow2(H) >= 32 else 12)
    return dict(BLOCK_M=32, BLOCK_N=32, SUB_N=4, num_warps=4, per_sm=warps_per_sm // 4)


def staged_constants(H, KV, DH, causal, dtype, tile):
    """The constexpr arguments of _staged_pairs_kernel (num_warps apart) for H query and KV key heads in ``dtype``."""
    from kobattr.kernels.rows import dot_settings

    qk_fp32, precision = dot_settings(dtype)
    return dict(H=H, KV_GROUP=H // KV, DH=DH, DP=pow2(DH), HP=pow2(H), CAUSAL=causal, QK_FP32=qk_fp32,
                DOT_PRECISION=precision, BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"], SUB_N=tile["SUB_N"])


# SMs assumed off CUDA: so few programs that the interpreter runs the persistent loop's later rounds
INTERPRETED_SMS = 2


def staged_grams(grams, dtype):
    """(gram (B, N, HP, HP) in ``dtype``: G[:H, :H] zero-padded; residual (B, N, HP) float32: G[H, :H] zero-padded;
    residual_diag (B, N) float32: G[H, H]) for the staged kernel from grams (B, N, H + 1, H + 1) float32."""
    B, N, S, _ = grams.shape
    H = S - 1
    HP = pow2(H)
    gram = torch.zeros(B, N, HP, HP, device=grams.device, dtype=dtype)
    gram[:, :, :H, :H] = grams[:, :, :H, :H]
    residual = torch.zeros(B, N, HP, device=grams.device, dtype=torch.float32)
    residual[:, :, :H] = grams[:, :, H, :H]
    return gram, residual, grams[:, :, H, H].contiguous()


def staged_maps(q, k, causal, scale, grams, row_scale, lse2, tile=None, scratch_dtype=torch.float32):
    """(B, N, N) float32 map of one Gram from q (B, H, N, Dh), k (B, KV, N, Dh), grams (B, N, H + 1, H + 1) float32,
    row_scale (B, N) float32 and lse2 (B, H, N), the base-2 row log-sum-exp of kernels/rows.row_lse (every key
    valid). ``scratch_dtype``: alpha's precision in the scratch and in the Gram dot (float32: tf32 products
    as the production kernel has them; bfloat16: the tensor cores' native rate, a bf16 rounding of alpha and G).
    The padded Grams are made here, inside what gpu_profile.py times."""
    B, H, N, DH = q.shape
    tile = tile or staged_settings(H, scratch_dtype)
    consts = staged_constants(H, k.shape[1], DH, causal, q.dtype, tile)
    gram, residual, residual_diag = staged_grams(grams, scratch_dtype)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else INTERPRETED_SMS
    programs = min(tile["per_sm"] * sms, triton.cdiv(N, tile["BLOCK_M"]) * B)
    scratch = torch.zeros(programs, tile["BLOCK_N"], consts["HP"], tile["BLOCK_M"], device=q.device,
                          dtype=scratch_dtype)
    out = torch.zeros(B, N, N, device=q.device, dtype=torch.float32)
    _staged_pairs_kernel[(programs,)](q, k, lse2, gram, residual, residual_diag, row_scale, out, scratch, N, B,
                                      scale * LOG2E, num_warps=tile["num_warps"], **consts)
    return out
