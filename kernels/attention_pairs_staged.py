"""Attention pair kernel, alpha staged: map[b, m, i, j] = row_scale_im * sqrt(kappa_ij^T G_jm kappa_ij), kappa_ij = (alpha^0_ij .. alpha^{H-1}_ij, [i == j]).

The production kernel's tensor-core Gram product (kernels/attention_pairs.py) without its register state. Each key
tile loops over the heads (a 2D ``tl.dot`` q_h k_h^T each, small state) and writes alpha_h into the program's own
scratch tile (BN, HP, BM) in global memory (L2-resident: a persistent grid of a few programs per SM, each reusing
its scratch), then reads it back SUB_N keys at a time as (SUB_N, BM, HP) for the batched dot with the Gram: the
BM x BN x H state the production kernel keeps in registers lives in L2, so the key tile BN (which sets how often
q is re-read) no longer sets the registers.

Per pair and Gram: H Dh multiply-adds for the logits and HP^2 + HP for the quadratic form, both on tensor cores
(Llama-7B, H = 32, Dh = 128: 4096 + 1056; BERT-base, 12 heads padded to 16, Dh = 64: 768 + 272). Bytes per pair
from L2: alpha written and read back, 2 H s (s the scratch itemsize: 128 B for Llama-7B in bfloat16), the padded
Gram of a key per query block, HP^2 s / BM (64 B at BM = 32), q re-read per key tile, H Dh itemsize / BN (256 B at
BN = 32 in bfloat16), k per query head, H Dh itemsize / BM (256 B), and the 4-byte map store. Compiled by triton 3.6
for sm_90 (bfloat16 scratch, 32 x 32 tiles, 4 warps): Llama-7B 160 registers, 12 warps per SM, 8.8 issue cycles
per pair; BERT-base 128 registers, 16 warps, 2.8 cycles (benchmarks/results/kernel_static_2026-12-06.md).

Visibility (rows=, padding, causal, windows) comes from kernels/rows.py (block_rows, key_tile) and the logits
from rows.capped_logits (soft-capping). Output modes: the full map or rows= only (no contraction, no alpha).
The scratch dtype is alpha's and G's precision in the Gram dot: float32 (tf32 products, as the production kernel
has them) or bfloat16 (the tensor cores' native rate; alpha and G rounded to 8 bits).
"""

import torch
import triton
import triton.language as tl

from .rows import LOG2E, block_rows, capped_logits, dot_settings, key_tile, pow2, row_lse


@triton.jit
def _staged_pairs_kernel(
    q_ptr,  # (B, H, N, DH)
    k_ptr,  # (B, H // KV_GROUP, N, DH)
    valid_ptr,  # (B, N) int8
    rows_ptr,  # (R,) int64, read if HAS_ROWS
    lse_ptr,  # (B, H, R) fp32, base 2 (kernels/rows.row_lse)
    gram_ptr,  # (B, M, N, HP, HP) in the scratch dtype: G_jm[:H, :H], zero-padded
    residual_ptr,  # (B, M, N, HP) fp32: G_jm[H, :H], zero-padded
    residual_diag_ptr,  # (B, M, N) fp32: G_jm[H, H]
    row_scale_ptr,  # (B, N, M) fp32
    map_ptr,  # (B, M, R, N) fp32, zeroed, written
    scratch_ptr,  # (programs, BLOCK_N, HP, BLOCK_M) in the scratch dtype, zeroed: each program's own tile
    N, R, B, scale_log2, window, radius, softcap_log2,
    H: tl.constexpr, KV_GROUP: tl.constexpr, M: tl.constexpr, DH: tl.constexpr, DP: tl.constexpr,
    HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr, HAS_ROWS: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SYMMETRIC: tl.constexpr, SOFTCAP: tl.constexpr,
    QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """map[b, m, r, j] = row_scale[b, i, m] sqrt(kappa_ij^T G_jm kappa_ij), i = rows[r], alpha^h_ij =
    exp2(capped_logits(q^h_i . k^{h // KV_GROUP}_j) - lse[b, h, r]) for visible pairs, else 0.

    A persistent grid over the tasks (query block, b, m), the longest (causal) blocks first, dealt out
    boustrophedon: program p takes task p in round 0, programs - 1 - p in round 1, ..., so that the causal lengths
    even out. The scratch rows of heads H..HP-1 are never written (zero), so every read of it is one contiguous
    block."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    scratch = scratch_ptr + pid.to(tl.int64) * (BLOCK_N * HP * BLOCK_M)
    blocks = tl.cdiv(R, BLOCK_M)
    tasks = blocks * B * M
    mi = tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, DP)
    heads = tl.arange(0, HP)
    chunk = tl.arange(0, SUB_N * HP * BLOCK_M)  # one sub-block of the scratch, contiguous
    gram_chunk = tl.arange(0, SUB_N * HP * HP)  # the padded Grams of SUB_N consecutive keys, contiguous
    for first in range(0, tasks, programs):
        task = first + pid
        if (first // programs) % 2 == 1:
            task = first + programs - 1 - pid
        live = task < tasks  # the last round has fewer tasks than programs
        task = tl.where(live, task, 0)
        block = blocks - 1 - task % blocks
        b = (task // blocks // M).to(tl.int64)
        m = task // blocks % M
        ridx, row_ok, rows, row_valid, row_first, row_last, key_lo, key_hi = block_rows(
            block, rows_ptr, valid_ptr, b, N, R, window, radius, BLOCK_M, BLOCK_N, HAS_ROWS, CAUSAL, WINDOWED,
            SYMMETRIC)
        key_hi = tl.where(live, key_hi, key_lo)  # a task past the last: nothing to do
        scale = tl.load(row_scale_ptr + (b * N + rows) * M + m, mask=row_ok, other=0.0)
        gram_base = gram_ptr + (b * M + m) * N * (HP * HP)
        for start in range(key_lo, key_hi, BLOCK_N):
            cols, col_ok, vis, _ = key_tile(valid_ptr, b, start, rows, row_valid, row_first, row_last, N, window,
                                            radius, BLOCK_N, CAUSAL, WINDOWED, SYMMETRIC)
            for h in range(H):
                q = tl.load(q_ptr + ((b * H + h) * N + rows)[:, None] * DH + d[None, :],
                            mask=row_ok[:, None] & (d < DH)[None, :], other=0.0)
                k = tl.load(k_ptr + ((b * (H // KV_GROUP) + h // KV_GROUP) * N + cols)[None, :] * DH + d[:, None],
                            mask=col_ok[None, :] & (d < DH)[:, None], other=0.0)
                if QK_FP32:
                    q = q.to(tl.float32)
                    k = k.to(tl.float32)
                lse = tl.load(lse_ptr + (b * H + h) * R + ridx, mask=row_ok, other=0.0)
                logits = capped_logits(tl.dot(q, k, input_precision=DOT_PRECISION), scale_log2, softcap_log2,
                                       SOFTCAP)
                alpha = tl.where(vis, tl.exp2(logits - lse[:, None]), 0.0)
                tl.store(scratch + (n[None, :] * HP + h) * BLOCK_M + mi[:, None],
                         alpha.to(scratch_ptr.dtype.element_ty))
            tl.debug_barrier()  # every head's alpha of the tile is in the scratch before it is read back
            for part in tl.static_range(BLOCK_N // SUB_N):
                key0 = start + part * SUB_N
                keys, key_ok, sub_vis, has_diagonal = key_tile(valid_ptr, b, key0, rows, row_valid, row_first,
                                                               row_last, N, window, radius, SUB_N, CAUSAL, WINDOWED,
                                                               SYMMETRIC)
                alpha_t = tl.permute(tl.reshape(tl.load(scratch + part * (SUB_N * HP * BLOCK_M) + chunk),
                                                (SUB_N, HP, BLOCK_M)), (0, 2, 1))  # (SUB_N, BM, HP)
                # keys past N read the Grams of the next (b, m) or past the end: masked as a whole key
                gram_ok = (key0 + gram_chunk // (HP * HP)) < N
                gram = tl.reshape(tl.load(gram_base + key0 * (HP * HP) + gram_chunk, mask=gram_ok, other=0.0),
                                  (SUB_N, HP, HP))
                if QK_FP32:  # the interpreter's bf16 dot is wrong: the product of the rounded values in fp32
                    alpha_t = alpha_t.to(tl.float32)
                    gram = gram.to(tl.float32)
                quad = tl.sum(tl.dot(alpha_t, gram, input_precision=DOT_PRECISION).to(tl.float32)
                              * alpha_t.to(tl.float32), 2)  # (SUB_N, BM)
                if has_diagonal:
                    # kappa's last slot is [i == j]: 2 G[H, :H] . alpha + G[H, H] on the diagonal (G symmetric)
                    res_row = tl.load(residual_ptr + ((b * M + m) * N + keys)[:, None] * HP + heads[None, :],
                                      mask=key_ok[:, None], other=0.0)  # (SUB_N, HP)
                    res_diag = tl.load(residual_diag_ptr + (b * M + m) * N + keys, mask=key_ok, other=0.0)
                    res_dot = tl.sum(alpha_t.to(tl.float32) * res_row[:, None, :], 2)
                    quad = quad + tl.where(keys[:, None] == rows[None, :], 2.0 * res_dot + res_diag[:, None], 0.0)
                tl.store(map_ptr + ((b * M + m) * R + ridx[None, :]) * N + keys[:, None],
                         tl.where(tl.trans(sub_vis), scale[None, :] * tl.sqrt(tl.maximum(quad, 0.0)), 0.0),
                         mask=key_ok[:, None] & row_ok[None, :])
            tl.debug_barrier()  # the scratch is read before the next tile overwrites it


def staged_settings(H, scratch_dtype=torch.bfloat16):
    """BLOCK_M, BLOCK_N, SUB_N, num_warps and programs per SM: as many 4-warp programs as an SM holds at once by a
    triton 3.6 sm_90 compile (warps per SM: 12 in bfloat16 and 8 in float32 for 32 heads, 16 and 12 for 12 heads),
    so that the scratch tiles in use, programs x BN x HP x BM elements, stay in L2."""
    warps_per_sm = (12 if pow2(H) >= 32 else 16) if scratch_dtype.itemsize == 2 else (8 if pow2(H) >= 32 else 12)
    return dict(BLOCK_M=32, BLOCK_N=32, SUB_N=4, num_warps=4, per_sm=warps_per_sm // 4)


def staged_constants(H, KV, DH, M, dtype, tile, has_rows=False, causal=False, windowed=False, symmetric=False,
                     softcap=False):
    """The constexpr arguments of _staged_pairs_kernel (num_warps apart) for H query and KV key heads in ``dtype``."""
    qk_fp32, precision = dot_settings(dtype)
    return dict(H=H, KV_GROUP=H // KV, M=M, DH=DH, DP=pow2(DH), HP=pow2(H), BLOCK_M=tile["BLOCK_M"],
                BLOCK_N=tile["BLOCK_N"], SUB_N=tile["SUB_N"], HAS_ROWS=has_rows, CAUSAL=causal, WINDOWED=windowed,
                SYMMETRIC=symmetric, SOFTCAP=softcap, QK_FP32=qk_fp32, DOT_PRECISION=precision)


# SMs assumed off CUDA: so few programs that the interpreter runs the persistent loop's later rounds
INTERPRETED_SMS = 2


def staged_grams(grams, dtype):
    """(gram (B, M, N, HP, HP) in ``dtype``: G[:H, :H] zero-padded; residual (B, M, N, HP) float32: G[H, :H]
    zero-padded; residual_diag (B, M, N) float32: G[H, H]) from grams (B, N, M, H + 1, H + 1) float32."""
    B, N, M, S, _ = grams.shape
    H, HP = S - 1, pow2(S - 1)
    g = grams.transpose(1, 2)
    gram = torch.zeros(B, M, N, HP, HP, device=grams.device, dtype=dtype)
    gram[..., :H, :H] = g[..., :H, :H]
    residual = torch.zeros(B, M, N, HP, device=grams.device, dtype=torch.float32)
    residual[..., :H] = g[..., H, :H]
    return gram, residual, g[..., H, H].contiguous()


def attention_maps(q, k, valid, causal, window, scale, grams, row_scale, rows=None, radius=0, softcap=0.0,
                   lse2=None, tile=None, scratch_dtype=torch.float32):
    """The full-map (or rows=) ``attention_maps`` of kobattr/backends/base.py, alpha staged, on contiguous CUDA
    (or interpreted) tensors: (B, M, R, N) float32.

    q (B, H, N, Dh), k (B, KV, N, Dh) in the model dtype; valid (B, N) bool; grams (B, N, M, H+1, H+1) and
    row_scale (B, N, M) float32; rows (R,) int64 or None; lse2 (B, H, R) float32 or None: the base-2 row
    log-sum-exp of the selected rows if the caller has it; ``tile``: staged_settings' keys (None: those);
    ``scratch_dtype``: float32 or bfloat16 (module docstring). The padded Grams are made here."""
    B, H, N, DH = q.shape
    M = grams.shape[2]
    R = N if rows is None else rows.numel()
    out = torch.zeros(B, M, R, N, device=q.device, dtype=torch.float32)
    if R == 0:
        return out
    tile = tile or staged_settings(H, scratch_dtype)
    valid8 = valid.to(torch.int8)
    if lse2 is None:
        lse2 = row_lse(q, k, valid8, causal, window, scale, rows, dot_settings(q.dtype), radius=radius,
                       softcap=softcap)
    consts = staged_constants(H, k.shape[1], DH, M, q.dtype, tile, rows is not None, causal, window > 0, radius > 0,
                              softcap > 0)
    gram, residual, residual_diag = staged_grams(grams, scratch_dtype)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else INTERPRETED_SMS
    programs = min(tile["per_sm"] * sms, triton.cdiv(R, tile["BLOCK_M"]) * B * M)
    scratch = torch.zeros(programs, tile["BLOCK_N"], consts["HP"], tile["BLOCK_M"], device=q.device,
                          dtype=scratch_dtype)
    _staged_pairs_kernel[(programs,)](
        q, k, valid8, rows if rows is not None else lse2, lse2, gram, residual, residual_diag, row_scale, out,
        scratch, N, R, B, scale * LOG2E, window, radius, softcap * LOG2E, num_warps=tile["num_warps"], **consts)
    return out
