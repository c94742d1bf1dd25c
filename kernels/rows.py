"""What every pair kernel does with its block of query rows, written once.

A program of kernels/attention_pairs.py or kernels/ff_pairs.py owns BLOCK_M query rows and loops over
the key tiles they can see. ``query_block`` reads those rows (``rows`` indirection, padding) and the
key range they can see, ``key_split`` cuts that range into the shares of the programs of grid axis 2,
``key_tile`` gives the keys of one tile and which of them each row sees: the only place where the
visibility rule lives in Triton. ``_row_lse_kernel`` computes the softmax statistic the pair kernels
recompute alpha from, ``alpha_tile`` that recomputation; both take their logits from
``capped_logits``, so that lse and alpha see the same (soft-capped) logits.

Key splits: a launch over few query blocks (``rows=`` with a few rows, short inputs, one batch
element) would leave most SMs idle, one program per block walking all its keys. Grid axis 2 splits
every block's keys into contiguous shares of whole tiles (``key_splits`` chooses their number on the
host so that the launch has ``programs_to_fill`` programs); what the programs of one block write
is either disjoint (map and alpha tiles), atomically added (row sums, contractions) or, for the row
log-sum-exp, one partial per split merged by ``row_lse``.

Notation: kobattr/backends/base.py. Variants are constexpr flags: HAS_ROWS (rows selected), CAUSAL,
WINDOWED (sliding window > 0), SYMMETRIC (symmetric window, radius > 0), SOFTCAP (logit soft-capping,
softcap > 0). All offsets are int64 (N up to 128k).
"""

import os

import torch
import triton
import triton.language as tl


LOG2E = 1.4426950408889634
# programs per SM a launch should reach: a pair program holds tiles of up to 8192 fp32 in registers, so
# about two are resident per SM; four per SM is two waves, enough to even out splits that causal or
# windowed masks leave short (a guess to measure on a GPU)
FILL_PER_SM = 4
INTERPRETER_SMS = 132  # an H100's count: the interpreter takes the splits an H100 would
_TWO_LOG2E = tl.constexpr(2 * LOG2E)  # exp(2y) = exp2(2 log2(e) y), as a global jit functions may read


@triton.jit
def query_block(rows_ptr, valid_ptr, b, N, R, window, radius,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_ROWS: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SYMMETRIC: tl.constexpr):
    """block_rows of query block program_id(0)."""
    return block_rows(tl.program_id(0), rows_ptr, valid_ptr, b, N, R, window, radius, BLOCK_M, BLOCK_N, HAS_ROWS,
                      CAUSAL, WINDOWED, SYMMETRIC)


@triton.jit
def block_rows(block, rows_ptr, valid_ptr, b, N, R, window, radius,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_ROWS: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SYMMETRIC: tl.constexpr):
    """rows[r] = rows_ptr[r] if HAS_ROWS else r, for the output rows r = ridx of query block ``block``, and the
    keys [key_lo, key_hi) any of them can see (key_lo aligned down to BLOCK_N).

    rows_ptr (R,) int64; valid_ptr (B, N) int8. Returns ridx (BM,) output row indices, row_ok = ridx < R,
    rows (BM,) int64 positions, row_valid (BM,), row_first / row_last the least / greatest position
    (N / -1 without rows), key_lo, key_hi.
    """
    ridx = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = ridx < R
    if HAS_ROWS:
        rows = tl.load(rows_ptr + ridx, mask=row_ok, other=0)
    else:
        rows = ridx.to(tl.int64)
    row_valid = tl.load(valid_ptr + b * N + rows, mask=row_ok, other=0) != 0
    row_first = tl.min(tl.where(row_ok, rows, N))
    row_last = tl.max(tl.where(row_ok, rows, -1))
    key_lo = 0
    key_hi = N
    if CAUSAL:
        key_hi = tl.minimum(row_last + 1, N)
    if WINDOWED:
        key_lo = tl.maximum(row_first - window + 1, 0) // BLOCK_N * BLOCK_N
    if SYMMETRIC:  # |i - j| <= radius bounds the keys on both sides
        key_lo = tl.maximum(key_lo, tl.maximum(row_first - radius, 0) // BLOCK_N * BLOCK_N)
        key_hi = tl.minimum(key_hi, row_last + radius + 1)
    return ridx, row_ok, rows, row_valid, row_first, row_last, key_lo, key_hi


@triton.jit
def key_split(key_lo, key_hi, BLOCK_N: tl.constexpr):
    """[lo, hi) = the share of keys [key_lo, key_hi) of key split program_id(2) out of num_programs(2): the
    next ceil(tiles / splits) of its tiles = ceil((key_hi - key_lo) / BLOCK_N) tiles starting at key_lo.

    Shares stay aligned on key_lo's tiles, so no tile belongs to two splits; splits past the last tile get
    lo >= hi (no tile at all), as does an empty range.
    """
    tiles = tl.cdiv(tl.maximum(key_hi - key_lo, 0), BLOCK_N)
    span = tl.cdiv(tiles, tl.num_programs(2)) * BLOCK_N
    lo = key_lo + tl.program_id(2) * span
    return lo, tl.minimum(key_hi, lo + span)


@triton.jit
def key_tile(valid_ptr, b, start, rows, row_valid, row_first, row_last, N, window, radius,
             BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SYMMETRIC: tl.constexpr):
    """visible[i, j] = valid_i & valid_j & (j <= i if CAUSAL) & (i - j < window if WINDOWED)
    & (|i - j| <= radius if SYMMETRIC), the rule of Layer.visible, for the rows of query_block and the keys
    cols = start + [0, BLOCK_N).

    Returns cols (BN,), col_ok = cols < N, visible (BM, BN), and has_diagonal: whether some row's own
    position is among the keys (the residual slot [i == j] of kappa is nonzero only there).
    """
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    col_valid = tl.load(valid_ptr + b * N + cols, mask=col_ok, other=0) != 0
    visible = row_valid[:, None] & col_valid[None, :]
    diff = rows[:, None] - cols[None, :]
    if CAUSAL:
        visible = visible & (diff >= 0)
    if WINDOWED:
        visible = visible & (diff < window)
    if SYMMETRIC:
        visible = visible & (diff <= radius) & (diff >= -radius)
    has_diagonal = (start <= row_last) & (start + BLOCK_N > row_first)
    return cols, col_ok, visible, has_diagonal


@triton.jit
def capped_logits(dots, scale_log2, softcap_log2, SOFTCAP: tl.constexpr):
    """log2(e) cap(scale q.k) from dots = q.k: cap(s) = c tanh(s / c) if SOFTCAP (softcap_log2 = c log2(e)), else s.

    Base 2 throughout, as the kernels' exp2: log2(e) c tanh(s / c) = softcap_log2 tanh(x / softcap_log2) with
    x = scale_log2 q.k.
    """
    logits = dots * scale_log2
    if SOFTCAP:
        # tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2 |y|): the interpreter has no tanh; e cannot overflow
        # (numpy would warn), and reaching 0 for large |y| saturates tanh to +-1 exactly
        e = tl.exp2(tl.abs(logits) * (-_TWO_LOG2E) / softcap_log2)
        capped = softcap_log2 * ((1.0 - e) / (1.0 + e))
        logits = tl.where(logits < 0, -capped, capped)
    return logits


@triton.jit
def alpha_tile(q_ptr, k_ptr, lse_ptr, b, rows, ridx, row_ok, cols, col_ok, visible, N, R, scale_log2, softcap_log2,
               H: tl.constexpr, KV_GROUP: tl.constexpr, DH: tl.constexpr, HP: tl.constexpr,
               BLOCK_D: tl.constexpr, QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    """alpha[h, i, j] = exp2(capped_logits(q^h_i . k^{h // KV_GROUP}_j) - lse2[h, i]) if visible else 0 -> (HP, BM, BN).

    q_ptr (B, H, N, DH); k_ptr (B, H // KV_GROUP, N, DH); lse_ptr (B, H, R) indexed by ``ridx``. The
    logits are one batched ``tl.dot`` over heads, accumulated over DH in chunks of BLOCK_D.
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
    shifted = tl.where(visible[None, :, :] & head_ok[:, None, None],
                       capped_logits(logits, scale_log2, softcap_log2, SOFTCAP) - lse[:, :, None], -float("inf"))
    return tl.exp2(shifted)


@triton.jit
def _row_lse_kernel(
    q_ptr,  # (B, H, N, DH)
    k_ptr,  # (B, H // KV_GROUP, N, DH)
    valid_ptr,  # (B, N) int8
    rows_ptr,  # (R,) int64, read if HAS_ROWS
    lse_ptr,  # (SPLITS, B, H, R) fp32, written: one partial per key split
    N, R, scale_log2, window, radius, softcap_log2,
    H: tl.constexpr, KV_GROUP: tl.constexpr, DH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ROWS: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, SYMMETRIC: tl.constexpr,
    SOFTCAP: tl.constexpr, QK_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """lse2[s, b, h, r] = log2 sum_{j in split s, visible from i = rows[r]} exp2(capped_logits(q^h_i . k^g_j)).

    Base-2 log-sum-exp of the scaled logits over the keys of key split s (key_split), g = h // KV_GROUP,
    online over key tiles; -inf for rows that see none of them. One program per (BLOCK_M rows, b * H + h, split s);
    BLOCK_D >= DH holds a whole head vector. row_lse merges the splits.
    """
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    kv_head = b * (H // KV_GROUP) + (bh % H) // KV_GROUP
    ridx, row_ok, rows, row_valid, row_first, row_last, key_lo, key_hi = query_block(
        rows_ptr, valid_ptr, b, N, R, window, radius, BLOCK_M, BLOCK_N, HAS_ROWS, CAUSAL, WINDOWED, SYMMETRIC)
    key_lo, key_hi = key_split(key_lo, key_hi, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + (bh * N + rows)[:, None] * DH + d[None, :], mask=row_ok[:, None] & (d < DH)[None, :],
                other=0.0)
    if QK_FP32:
        q = q.to(tl.float32)
    row_max = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(key_lo, key_hi, BLOCK_N):
        cols, col_ok, visible, _ = key_tile(valid_ptr, b, start, rows, row_valid, row_first, row_last, N, window,
                                            radius, BLOCK_N, CAUSAL, WINDOWED, SYMMETRIC)
        k = tl.load(k_ptr + (kv_head * N + cols)[None, :] * DH + d[:, None], mask=col_ok[None, :] & (d < DH)[:, None],
                    other=0.0)
        if QK_FP32:
            k = k.to(tl.float32)
        logits = tl.where(visible, capped_logits(tl.dot(q, k, input_precision=DOT_PRECISION), scale_log2,
                                                 softcap_log2, SOFTCAP), -float("inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)  # no inf - inf for rows seeing nothing yet
        row_sum = row_sum * tl.exp2(row_max - safe_max) + tl.sum(tl.exp2(logits - safe_max[:, None]), 1)
        row_max = new_max
    lse = tl.where(row_sum > 0, row_max + tl.log2(tl.where(row_sum > 0, row_sum, 1.0)), -float("inf"))
    tl.store(lse_ptr + (tl.program_id(2) * tl.num_programs(1) + bh) * R + ridx, lse, mask=row_ok)


def pow2(n, least=16):
    """The block size covering n: the next power of two, at least ``least`` (tl.dot needs >= 16)."""
    return max(least, triton.next_power_of_2(n))


def dot_settings(dtype):
    """(QK_FP32, DOT_PRECISION) for a model dtype: fp32 models dot in "tf32x3" (near-fp32 accuracy on
    tensor cores), fp16/bf16 ones in "tf32" with q and k in their own dtype, except under the
    interpreter, whose bf16 dot is wrong, so q and k are upcast first (QK_FP32)."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if dtype == torch.float32:
        return True, "tf32x3"
    return interpreting, "tf32"


def programs_to_fill(device):
    """How many programs a launch needs to keep the GPU of ``device`` busy: FILL_PER_SM per streaming
    multiprocessor (INTERPRETER_SMS off CUDA)."""
    if device.type == "cuda":
        return FILL_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return FILL_PER_SM * INTERPRETER_SMS


def key_splits(programs, key_tiles, device):
    """Grid axis 2 of a launch of ``programs`` query programs over at most ``key_tiles`` key tiles each:
    enough splits to reach programs_to_fill(device), at most one per key tile, 1 when the query programs
    alone fill the GPU."""
    return max(1, min(key_tiles, triton.cdiv(programs_to_fill(device), max(programs, 1))))


def lse_settings(DH, R):
    """BLOCK_M, BLOCK_N, BLOCK_D, num_warps and num_stages of _row_lse_kernel: 64 x 64 logit tiles for head
    sizes up to 64, 32 x 32 beyond (the q and k tiles are DH wide), BLOCK_M no larger than the rows need
    (rows= of a few rows), 4 warps (32 fp32 of a 64 x 64 tile per thread), 2 stages (the next k tile loads
    while this one's exponentials run, as in flash attention)."""
    block = 64 if DH <= 64 else 32
    return dict(BLOCK_M=min(block, pow2(R)), BLOCK_N=block, BLOCK_D=pow2(DH), num_warps=4, num_stages=2)


def row_lse(q, k, valid8, causal, window, scale, rows, dots, radius=0, softcap=0.0):
    """lse2 (B, H, R) float32 of the scaled (and, softcap > 0, capped) logits (base 2) for ``rows`` (None =
    all N), 0 on rows that see no key; valid8 (B, N) int8; ``dots`` the (QK_FP32, DOT_PRECISION) of
    dot_settings."""
    B, H, N, DH = q.shape
    R = N if rows is None else rows.numel()
    tile = lse_settings(DH, R)
    grid = (triton.cdiv(R, tile["BLOCK_M"]), B * H)
    splits = key_splits(grid[0] * grid[1], triton.cdiv(N, tile["BLOCK_N"]), q.device)
    parts = torch.empty(splits, B, H, R, device=q.device, dtype=torch.float32)
    qk_fp32, precision = dots
    _row_lse_kernel[grid + (splits,)](
        q, k, valid8, rows if rows is not None else parts, parts, N, R, scale * LOG2E, window, radius,
        softcap * LOG2E, H=H, KV_GROUP=H // k.shape[1], DH=DH, HAS_ROWS=rows is not None, CAUSAL=causal,
        WINDOWED=window > 0, SYMMETRIC=radius > 0, SOFTCAP=softcap > 0, QK_FP32=qk_fp32, DOT_PRECISION=precision,
        **tile,
    )
    # log2 sum_s exp2(lse2_s), shifted by the largest partial; exact for one split
    top = parts.amax(0)
    seen = torch.isfinite(top)
    shift = torch.where(seen, top, 0.0)
    return torch.where(seen, shift + torch.log2(torch.exp2(parts - shift).sum(0)), 0.0)
