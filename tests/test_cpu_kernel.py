"""The C++ CPU kernel (kobattr._cpu through CPUBackend) against the fp64 primitive oracle."""

import pytest
import torch

from kobattr.backends.base import Attention
from kobattr.backends.cpu_backend import CPUBackend, attention_maps_cpu
from primitive_oracle import oracle_alpha, oracle_attention_maps, random_attention, random_grams


def test_extension_is_built():
    # kobattr._cpu is built on every install: its absence is a failure, not a skip.
    assert CPUBackend.unavailable_reason() is None, CPUBackend.unavailable_reason()


def close(actual, expected, rtol=1e-5):
    """fp32 results against the fp64 oracle: relative to the largest entry of the expected tensor."""
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual.double() - expected).abs().max() / scale
    assert error < rtol, f"max error {error:.2e} relative to max |expected| {scale:.3g}"


PATTERNS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "padding": dict(pad=3),
    "window": dict(window=5),
    "causal_window_padding": dict(causal=True, window=4, pad=2),
}


@pytest.mark.parametrize("N", [1, 7, 97, 257])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("H,KV", [(4, 2), (4, 1), (3, 3)])
def test_full_map_and_alpha(N, pattern, H, KV):
    options = dict(PATTERNS[pattern])
    options["pad"] = min(options.get("pad", 0), N - 1)
    attn = random_attention(B=2, H=H, KV=KV, N=N, **options)
    grams, row_scale = random_grams(2, N, 3, H)
    maps, alpha = CPUBackend().attention_maps(attn, grams, row_scale, want_alpha=True)
    close(maps, oracle_attention_maps(attn, grams, row_scale))
    close(alpha, oracle_alpha(attn))


@pytest.mark.parametrize("pattern", ["plain", "causal", "causal_window_padding"])
def test_selected_rows(pattern):
    attn = random_attention(B=2, N=97, **PATTERNS[pattern])
    grams, row_scale = random_grams(2, 97, 2, 4)
    rows = torch.tensor([96, 0, 5, 5, 64, 63, 95])  # unordered, repeated, across query tiles
    maps, alpha = CPUBackend().attention_maps(attn, grams, row_scale, rows=rows, want_alpha=True)
    close(maps, oracle_attention_maps(attn, grams, row_scale, rows=rows))
    close(alpha, oracle_alpha(attn, rows=rows))


@pytest.mark.parametrize("N", [7, 257])
@pytest.mark.parametrize("normalize_rows", [False, True])
@pytest.mark.parametrize("pattern", ["plain", "causal_window_padding"])
def test_weights_contraction(N, normalize_rows, pattern):
    attn = random_attention(B=2, H=4, KV=2, N=N, **PATTERNS[pattern])
    grams, row_scale = random_grams(2, N, 3, 4)
    weights = torch.rand(2, 3, N, generator=torch.Generator().manual_seed(5))
    out, alpha = CPUBackend().attention_maps(attn, grams, row_scale, weights=weights,
                                             normalize_rows=normalize_rows, want_alpha=True)
    close(out, oracle_attention_maps(attn, grams, row_scale, weights=weights, normalize_rows=normalize_rows))
    close(alpha, oracle_alpha(attn))


@pytest.mark.parametrize("H,KV", [(1, 1), (40, 8)])  # the key tile adapts to H: 64 keys at H=1, 12 at H=40
def test_head_counts_change_the_key_tile(H, KV):
    attn = random_attention(B=1, H=H, KV=KV, N=70, causal=True, pad=0)
    grams, row_scale = random_grams(1, 70, 1, H)
    maps, alpha = CPUBackend().attention_maps(attn, grams, row_scale, want_alpha=True)
    close(maps, oracle_attention_maps(attn, grams, row_scale))
    close(alpha, oracle_alpha(attn))


def test_fully_padded_batch_element_is_zero():
    attn = random_attention(B=2, N=9)
    attn.valid[1] = False
    grams, row_scale = random_grams(2, 9, 1, 4)
    maps, _ = CPUBackend().attention_maps(attn, grams, row_scale)
    assert torch.all(maps[1] == 0)
    close(maps, oracle_attention_maps(attn, grams, row_scale))


def test_half_precision_inputs_are_converted():
    attn = random_attention(B=1, N=33, dtype=torch.bfloat16)
    grams, row_scale = random_grams(1, 33, 1, 4)
    maps, _ = CPUBackend().attention_maps(attn, grams, row_scale)
    close(maps, oracle_attention_maps(attn, grams, row_scale))


def test_float64_inputs_keep_their_precision():
    attn = random_attention(B=1, N=17, dtype=torch.float64)
    grams, row_scale = random_grams(1, 17, 2, 4)
    maps, _ = CPUBackend().attention_maps(attn, grams.double(), row_scale.double())
    assert maps.dtype == torch.float64
    torch.testing.assert_close(maps, oracle_attention_maps(attn, grams, row_scale), rtol=1e-10, atol=1e-12)


def test_thread_counts_agree():
    attn = random_attention(B=1, N=130, causal=True)
    grams, row_scale = random_grams(1, 130, 1, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, _ = CPUBackend().attention_maps(attn, grams, row_scale)
        torch.set_num_threads(2)
        double, _ = CPUBackend().attention_maps(attn, grams, row_scale)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(single, double, rtol=0, atol=0)


def raw_call(**overrides):
    """kobattr._cpu.attention_maps on a valid small problem, with some arguments replaced."""
    from kobattr import _cpu

    attn = random_attention(B=1, H=4, KV=2, N=5)
    grams, row_scale = random_grams(1, 5, 1, 4)
    out = torch.empty(1, 1, 5, 5)
    keep = [attn.q, attn.k, attn.valid, grams, row_scale, out]
    args = dict(q=attn.q.data_ptr(), k=attn.k.data_ptr(), valid=attn.valid.data_ptr(), grams=grams.data_ptr(),
                row_scale=row_scale.data_ptr(), rows=0, weights=0, out=out.data_ptr(), alpha=0, batch=1, heads=4,
                kv_heads=2, seq_len=5, head_dim=16, n_grams=1, n_rows=5, n_weight_rows=0, causal=False, window=0,
                scale=0.25, normalize_rows=False, num_threads=1)
    args.update(overrides)
    _cpu.attention_maps(**args)
    return keep


@pytest.mark.parametrize("overrides,message", [
    (dict(q=0), "q must point to"),
    (dict(grams=0), "grams must point to"),
    (dict(kv_heads=3), "must be a multiple of the number of key heads KV=3"),
    (dict(head_dim=0), "every size must be at least 1"),
    (dict(window=-1), "sliding window must be 0"),
    (dict(n_rows=4), "must equal the sequence length"),
    (dict(normalize_rows=True), "normalize_rows only applies"),
    (dict(scale=float("nan")), "scale must be a finite"),
])
def test_raw_call_rejects_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        raw_call(**overrides)


def test_rows_out_of_range_are_rejected():
    attn = random_attention(B=1, N=5)
    grams, row_scale = random_grams(1, 5, 1, 4)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, N=5\), got values from 0 to 5"):
        attention_maps_cpu(attn, grams, row_scale, rows=torch.tensor([0, 5]))


def test_mismatched_shapes_are_rejected():
    attn = random_attention(B=1, N=5)
    grams, row_scale = random_grams(1, 6, 1, 4)
    with pytest.raises(ValueError, match="grams must have shape"):
        attention_maps_cpu(attn, grams, row_scale)


def test_cannot_run_names_non_cpu_tensors():
    attn = random_attention(B=1, N=5)
    meta = Attention(q=attn.q.to("meta"), k=attn.k, valid=attn.valid, causal=False, window=0, scale=1.0)
    assert "needs CPU tensors" in CPUBackend().cannot_run(meta, need_ff=False)
    assert CPUBackend().cannot_run(attn, need_ff=True) is None
