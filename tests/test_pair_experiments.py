"""benchmarks/pair_experiments.py (candidate pair kernels that benchmarks/gpu_profile.py times on a GPU)
against the fp64 oracle, run by the Triton interpreter: a GPU session should only spend its time timing
kernels that are already right. Random Grams of rank 8 < H + 1 (singular, as the benchmark's) and full-rank
ones; N = 37 crosses query and key tiles; GQA; causal and bidirectional; 4 heads (padded to 16 factor
columns) and 12 heads with Dh = 64."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from kobattr.kernels import rows as kernel_rows  # noqa: E402
from pair_experiments import gram_factors, staged_maps, streamed_maps  # noqa: E402
from primitive_oracle import oracle_attention_maps, random_attention, random_grams  # noqa: E402


@pytest.mark.parametrize("H, KV, Dh, causal, full_rank", [(4, 2, 16, True, False), (4, 4, 16, False, True),
                                                          (12, 3, 64, True, True)])
def test_streamed_maps_match_oracle(H, KV, Dh, causal, full_rank):
    N = 37
    attn = random_attention(B=2, H=H, KV=KV, N=N, Dh=Dh, causal=causal)
    grams, row_scale = random_grams(2, N, 1, H)
    if full_rank:  # a Gram of H + 1 independent vectors: every factor column in use
        u = torch.randn(2, N, 1, H + 1, H + 3, generator=torch.Generator().manual_seed(3))
        grams = u @ u.transpose(-1, -2)
    lse2 = kernel_rows.row_lse(attn.q, attn.k, attn.valid.to(torch.int8), causal, 0, attn.scale, None,
                               kernel_rows.dot_settings(attn.q.dtype))
    factor, residual = gram_factors(grams[:, :, 0])
    ours = streamed_maps(attn.q, attn.k, causal, attn.scale, factor, residual, row_scale[:, :, 0].contiguous(), lse2,
                         tile=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4))
    expected = oracle_attention_maps(attn, grams, row_scale)[:, 0]
    assert (ours.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_gram_factors_reproduce_the_gram():
    grams, _ = random_grams(1, 5, 1, 6)
    factor, residual = gram_factors(grams[:, :, 0])
    lower = torch.cat([factor[..., :6], torch.zeros(1, 5, 7, 1)], -1)
    lower[..., 6, 6] = residual.sqrt()
    assert torch.allclose(lower @ lower.transpose(-1, -2), grams[:, :, 0], atol=1e-4)
    assert (factor.triu(1)[..., :6, :] == 0).all()  # lower triangular: row h stops at column h


@pytest.mark.parametrize("H, KV, Dh, causal, tile", [
    (4, 2, 16, True, dict(BLOCK_M=16, BLOCK_N=16, SUB_N=4, num_warps=4, per_sm=1)),
    (12, 3, 64, False, dict(BLOCK_M=16, BLOCK_N=32, SUB_N=8, num_warps=4, per_sm=2)),
    (12, 12, 64, True, dict(BLOCK_M=32, BLOCK_N=16, SUB_N=2, num_warps=4, per_sm=4))])
def test_staged_maps_match_oracle(H, KV, Dh, causal, tile):
    """The staged experiment, full-rank Grams; per_sm = 1 makes 2 programs take every query block of both batch
    elements in turn (the persistent loop and its reuse of one scratch tile)."""
    N = 37
    attn = random_attention(B=2, H=H, KV=KV, N=N, Dh=Dh, causal=causal)
    u = torch.randn(2, N, 1, H + 1, H + 3, generator=torch.Generator().manual_seed(5))
    grams = u @ u.transpose(-1, -2)
    _, row_scale = random_grams(2, N, 1, H)
    lse2 = kernel_rows.row_lse(attn.q, attn.k, attn.valid.to(torch.int8), causal, 0, attn.scale, None,
                               kernel_rows.dot_settings(attn.q.dtype))
    ours = staged_maps(attn.q, attn.k, causal, attn.scale, grams[:, :, 0].contiguous(),
                       row_scale[:, :, 0].contiguous(), lse2, tile=tile)
    expected = oracle_attention_maps(attn, grams, row_scale)[:, 0]
    assert (ours.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_staged_maps_with_a_bfloat16_scratch_round_alpha_and_the_gram_only():
    """alpha and G rounded to bfloat16 (8 bits): the map is off by a few 2^-9 relative, not more."""
    N, H = 37, 12
    attn = random_attention(B=1, H=H, KV=4, N=N, Dh=32, causal=True)
    u = torch.randn(1, N, 1, H + 1, H + 3, generator=torch.Generator().manual_seed(7))
    grams = u @ u.transpose(-1, -2)
    _, row_scale = random_grams(1, N, 1, H)
    lse2 = kernel_rows.row_lse(attn.q, attn.k, attn.valid.to(torch.int8), True, 0, attn.scale, None,
                               kernel_rows.dot_settings(attn.q.dtype))
    ours = staged_maps(attn.q, attn.k, True, attn.scale, grams[:, :, 0].contiguous(), row_scale[:, :, 0].contiguous(),
                       lse2, tile=dict(BLOCK_M=16, BLOCK_N=16, SUB_N=4, num_warps=4, per_sm=1),
                       scratch_dtype=torch.bfloat16)
    expected = oracle_attention_maps(attn, grams, row_scale)[:, 0]
    error = ((ours.double() - expected).abs().max() / expected.abs().max()).item()
    assert 1e-5 < error < 2 ** -6  # rounded (not fp32), by about bfloat16's unit roundoff
