"""ALTI's L1 proximities: c[b, i, j] = vis_ij * max(0, ||y_i||_1 - sum_d |y_id - s_i sum_k kappa_ijk r_jkd|).

Notation of kobattr/peers.py ``alti_maps``: kappa_ij (K = H + 1 slots: alpha^h_ij for the heads, [i == j] for
the residual), r_j (K, D) the per-key rows of the decomposed vector form, s_i the row scale, so
T_i(x_j) = s_i kappa_ij^T r_j, y_i the block output; ||y_i||_1 comes in float64 from the host.

Why the kernel looks the way it does:
- The L1 distance has no Gram form: every T_i(x_j) is a D-vector that has to exist, but only in registers. A
  program owns BLOCK_M rows x BLOCK_N keys and walks D in BLOCK_D chunks; per chunk the (BM, BN, BD) tile
  T = sum_k kappa[:, :, k] * r[:, k, :] is built by K broadcast FMAs (a per-key matrix, so no shared tl.dot),
  reduced to sum_d |y - s T| and dropped.
- Precision (spec section 10): ||y||_1 - ||y - T||_1 cancels, so each chunk's sum over at most BLOCK_D
  entries is taken in float32 and the chunks are added in float64, as is the final difference; the result is
  stored in float64 (the host normalises rows in float64 too).
- Tiles from the problem: BLOCK_D the power of two covering D up to 64 (fewer, longer chunks for small d),
  BLOCK_M = BLOCK_N = 16 for BLOCK_D = 64 and 32 otherwise (a BM x BN x BD fp32 tile of at most 16k elements,
  ~128 registers a thread at 4 warps). Grid: (row blocks, B, key blocks); programs write disjoint tiles.
- Offsets are int64 (N up to 128k keys).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _alti_l1_kernel(kappa_ptr, rows_ptr, scale_ptr, y_ptr, norm_ptr, vis_ptr, out_ptr, R, N, D,
                    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """kappa (B, K, R, N) fp32, rows (B, N, K, D) fp32, scale (B, R) fp32, y (B, R, D) fp32, norm (B, R) fp64,
    vis (B, R, N) int8 -> out (B, R, N) fp64."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2)
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = i < R
    j_ok = j < N
    ij_ok = i_ok[:, None] & j_ok[None, :]
    i64 = i.to(tl.int64)
    j64 = j.to(tl.int64)
    s = tl.load(scale_ptr + b * R + i64, mask=i_ok, other=0.0)
    dist = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        tile = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_D), dtype=tl.float32)
        for k in range(K):
            kap = tl.load(kappa_ptr + ((b * K + k) * R + i64[:, None]) * N + j64[None, :], mask=ij_ok, other=0.0)
            r = tl.load(rows_ptr + ((b * N + j64[:, None]) * K + k) * D + d[None, :],
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            tile += kap[:, :, None] * r[None, :, :]
        y = tl.load(y_ptr + (b * R + i64[:, None]) * D + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        part = tl.sum(tl.abs(y[:, None, :] - s[:, None, None] * tile), axis=2)  # float32 over one chunk
        dist += part.to(tl.float64)
    norm = tl.load(norm_ptr + b * R + i64, mask=i_ok, other=0.0)
    vis = tl.load(vis_ptr + (b * R + i64[:, None]) * N + j64[None, :], mask=ij_ok, other=0)
    c = tl.maximum(norm[:, None] - dist, 0.0)
    c = tl.where(vis != 0, c, 0.0)
    tl.store(out_ptr + (b * R + i64[:, None]) * N + j64[None, :], c, mask=ij_ok)


def alti_settings(D: int) -> dict:
    """Tile sizes and warps for model width D (see the module docstring)."""
    block_d = min(64, triton.next_power_of_2(D))
    block = 16 if block_d == 64 else 32
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=4)


def alti_l1(kappa: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, norm: torch.Tensor,
            vis: torch.Tensor) -> torch.Tensor:
    """(B, R, N) float64 ALTI proximities (module docstring) of kappa (B, K, R, N), rows (B, N, K, D), scale (B, R),
    y (B, R, D), norm = ||y||_1 (B, R) float64 and vis (B, R, N) bool."""
    B, K, R, N = kappa.shape
    D = rows.shape[-1]
    if rows.shape != (B, N, K, D) or y.shape != (B, R, D) or scale.shape != (B, R) or norm.shape != (B, R) \
            or vis.shape != (B, R, N):
        raise ValueError(f"alti_l1 takes kappa (B, K, R, N), rows (B, N, K, D), scale and norm (B, R), y (B, R, D) and "
                         f"vis (B, R, N); got {tuple(kappa.shape)}, {tuple(rows.shape)}, {tuple(scale.shape)}, "
                         f"{tuple(norm.shape)}, {tuple(y.shape)}, {tuple(vis.shape)}.")
    out = torch.empty(B, R, N, dtype=torch.float64, device=kappa.device)
    tile = alti_settings(D)
    warps = tile.pop("num_warps")
    grid = (triton.cdiv(R, tile["BLOCK_M"]), B, triton.cdiv(N, tile["BLOCK_N"]))
    _alti_l1_kernel[grid](kappa.float().contiguous(), rows.float().contiguous(), scale.float().contiguous(),
                          y.float().contiguous(), norm.double().contiguous(), vis.to(torch.int8).contiguous(), out,
                          R, N, D, K=K, num_warps=warps, **tile)
    return out
