"""The C++ CPU kernel (kobattr._cpu through compiled_attention_maps and compiled_row_lse) against the fp64
primitive oracle."""

import dataclasses
import math

import pytest
import torch

from kobattr.backends.base import Attention
from kobattr.backends.kernel_args import compiled_attention_maps, compiled_row_lse
from primitive_oracle import (oracle_alpha, oracle_attention_maps, oracle_row_lse, random_attention, random_grams,
                              scrambled_layout)


def test_extension_is_built():
    # kobattr._cpu is built on every install: its absence is a failure, not a skip.
    from kobattr import _cpu

    assert _cpu.device_type == "cpu"
    assert callable(_cpu.row_lse)


def cpu_maps(attn, grams, row_scale, **options):
    from kobattr import _cpu

    return compiled_attention_maps(_cpu, attn, grams, row_scale, **options)


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
    # logits of standard deviation 3 against a soft-cap of 1-1.5: capping changes alpha clearly
    "radius": dict(radius=5),
    "softcap": dict(softcap=1.0, logit_std=3.0),
    "causal_window_radius_softcap_padding": dict(causal=True, window=9, radius=4, softcap=1.0, logit_std=3.0, pad=2),
    # non-causal: the window bounds the keys before a query, the radius those after it
    "window_radius_softcap_padding": dict(window=4, radius=6, softcap=1.5, logit_std=3.0, pad=3),
}
FEATURE_PATTERNS = [name for name, options in PATTERNS.items() if "radius" in options or "softcap" in options]
SELECTED_ROWS = torch.tensor([96, 0, 5, 5, 64, 63, 95])  # unordered, repeated, across query tiles (N = 97)


@pytest.mark.parametrize("N", [1, 7, 97, 257])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("H,KV", [(4, 2), (4, 1), (3, 3)])
def test_full_map_and_alpha(N, pattern, H, KV):
    options = dict(PATTERNS[pattern])
    options["pad"] = min(options.get("pad", 0), N - 1)
    attn = random_attention(B=2, H=H, KV=KV, N=N, **options)
    grams, row_scale = random_grams(2, N, 3, H)
    maps, alpha = cpu_maps(attn, grams, row_scale, want_alpha=True)
    close(maps, oracle_attention_maps(attn, grams, row_scale))
    close(alpha, oracle_alpha(attn))


@pytest.mark.parametrize("pattern", ["plain", "causal", "causal_window_padding", "causal_window_radius_softcap_padding",
                                     "window_radius_softcap_padding"])
def test_selected_rows(pattern):
    attn = random_attention(B=2, N=97, **PATTERNS[pattern])
    grams, row_scale = random_grams(2, 97, 2, 4)
    maps, alpha = cpu_maps(attn, grams, row_scale, rows=SELECTED_ROWS, want_alpha=True)
    close(maps, oracle_attention_maps(attn, grams, row_scale, rows=SELECTED_ROWS))
    close(alpha, oracle_alpha(attn, rows=SELECTED_ROWS))


@pytest.mark.parametrize("N", [7, 257])
@pytest.mark.parametrize("normalize_rows", [False, True])
@pytest.mark.parametrize("pattern", ["plain", "causal_window_padding", "window_radius_softcap_padding"])
def test_weights_contraction(N, normalize_rows, pattern):
    attn = random_attention(B=2, H=4, KV=2, N=N, **PATTERNS[pattern])
    grams, row_scale = random_grams(2, N, 3, 4)
    weights = torch.rand(2, 3, N, generator=torch.Generator().manual_seed(5))
    out, alpha = cpu_maps(attn, grams, row_scale, weights=weights, normalize_rows=normalize_rows, want_alpha=True)
    close(out, oracle_attention_maps(attn, grams, row_scale, weights=weights, normalize_rows=normalize_rows))
    close(alpha, oracle_alpha(attn))


@pytest.mark.parametrize("normalize_rows", [False, True])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("H,KV", [(4, 2), (4, 1)])
def test_weights_contraction_over_selected_rows(normalize_rows, pattern, H, KV):
    """rows with weights: the contraction runs over the selected rows only, weights indexed by position."""
    attn = random_attention(B=2, H=H, KV=KV, N=97, **PATTERNS[pattern])
    grams, row_scale = random_grams(2, 97, 2, H)
    weights = torch.rand(2, 3, 97, generator=torch.Generator().manual_seed(6))
    out, alpha = cpu_maps(attn, grams, row_scale, rows=SELECTED_ROWS, weights=weights, normalize_rows=normalize_rows,
                          want_alpha=True)
    assert out.shape == (2, 2, 3, 97)
    close(out, oracle_attention_maps(attn, grams, row_scale, rows=SELECTED_ROWS, weights=weights,
                                     normalize_rows=normalize_rows))
    close(alpha, oracle_alpha(attn, rows=SELECTED_ROWS))


def relative_difference(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("pattern", FEATURE_PATTERNS)
def test_radius_and_softcap_change_the_result(pattern):
    """Each feature moves the maps, alpha and the contraction far beyond the tolerance of the tests above,
    so a kernel ignoring it fails them; the radius cuts rows on both sides of the diagonal."""
    attn = random_attention(B=2, N=97, **PATTERNS[pattern])
    grams, row_scale = random_grams(2, 97, 2, 4)
    weights = torch.rand(2, 3, 97, generator=torch.Generator().manual_seed(7))
    maps, alpha = cpu_maps(attn, grams, row_scale, want_alpha=True)
    out, _ = cpu_maps(attn, grams, row_scale, rows=SELECTED_ROWS, weights=weights)
    if attn.radius:  # nothing beyond the radius, on either side
        far = (torch.arange(97)[:, None] - torch.arange(97)[None, :]).abs() > attn.radius
        assert (alpha[:, :, far] == 0).all() and (maps[:, :, far] == 0).all()
    for feature in ("radius", "softcap"):
        if getattr(attn, feature):
            ignored = dataclasses.replace(attn, **{feature: 0})
            assert relative_difference(maps, oracle_attention_maps(ignored, grams, row_scale)) > 0.05, feature
            assert relative_difference(alpha, oracle_alpha(ignored)) > 0.05, feature
            expected = oracle_attention_maps(ignored, grams, row_scale, rows=SELECTED_ROWS, weights=weights)
            assert relative_difference(out, expected) > 0.01, feature


def test_no_selected_rows():
    attn = random_attention(B=2, N=9)
    grams, row_scale = random_grams(2, 9, 2, 4)
    none = torch.zeros(0, dtype=torch.int64)
    maps, alpha = cpu_maps(attn, grams, row_scale, rows=none, want_alpha=True)
    assert maps.shape == (2, 2, 0, 9) and alpha.shape == (2, 4, 0, 9)
    out, _ = cpu_maps(attn, grams, row_scale, rows=none, weights=torch.ones(2, 3, 9), normalize_rows=True)
    assert out.shape == (2, 2, 3, 9) and torch.all(out == 0)


def test_inputs_in_any_layout():
    """Non-contiguous inputs are copied into the layout the kernel reads: with distinct Gram matrices per
    key and method stored method-major, reading the storage as it lies would mix keys and methods up.
    (Transposing a Gram matrix alone cannot show: kappa^T G kappa = kappa^T G^T kappa.)"""
    attn = random_attention(B=2, N=33, causal=True, pad=3)
    grams, row_scale = random_grams(2, 33, 3, 4)
    strided = Attention(q=attn.q.transpose(1, 2).contiguous().transpose(1, 2), k=attn.k[..., ::1], valid=attn.valid,
                        causal=True, window=0, scale=attn.scale)
    assert not strided.q.is_contiguous()
    maps, _ = cpu_maps(strided, scrambled_layout(grams), scrambled_layout(row_scale))
    close(maps, oracle_attention_maps(attn, grams, row_scale))


@pytest.mark.parametrize("H,KV", [(1, 1), (40, 8)])  # the key tile adapts to H: 64 keys at H=1, 12 at H=40
def test_head_counts_change_the_key_tile(H, KV):
    attn = random_attention(B=1, H=H, KV=KV, N=70, causal=True, pad=0)
    grams, row_scale = random_grams(1, 70, 1, H)
    maps, alpha = cpu_maps(attn, grams, row_scale, want_alpha=True)
    close(maps, oracle_attention_maps(attn, grams, row_scale))
    close(alpha, oracle_alpha(attn))


def test_fully_padded_batch_element_is_zero():
    attn = random_attention(B=2, N=9)
    attn.valid[1] = False
    grams, row_scale = random_grams(2, 9, 1, 4)
    maps, _ = cpu_maps(attn, grams, row_scale)
    assert torch.all(maps[1] == 0)
    close(maps, oracle_attention_maps(attn, grams, row_scale))


def test_half_precision_inputs_are_converted():
    attn = random_attention(B=1, N=33, dtype=torch.bfloat16)
    grams, row_scale = random_grams(1, 33, 1, 4)
    maps, _ = cpu_maps(attn, grams, row_scale)
    close(maps, oracle_attention_maps(attn, grams, row_scale))


def test_thread_counts_agree():
    attn = random_attention(B=1, N=130, causal=True)
    grams, row_scale = random_grams(1, 130, 1, 4)
    threads = torch.get_num_threads()
    try:
        # each call on its own copy: the first call's row statistics, stored on attn, would spare the second its
        # first pass, and with it the kept exponentials (a different, equally exact rounding)
        torch.set_num_threads(1)
        single, _ = cpu_maps(dataclasses.replace(attn), grams, row_scale)
        torch.set_num_threads(2)
        double, _ = cpu_maps(dataclasses.replace(attn), grams, row_scale)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(single, double, rtol=0, atol=0)


def raw_call(**overrides):
    """kobattr._cpu.attention_maps on a valid small problem (B=1, H=4, KV=2, N=5, Dh=16, M=1), with some
    arguments replaced."""
    from kobattr import _cpu

    attn = random_attention(B=1, H=4, KV=2, N=5)
    grams, row_scale = random_grams(1, 5, 1, 4)
    args = dict(q=attn.q, k=attn.k, valid=attn.valid, grams=grams, row_scale=row_scale, rows=None, weights=None,
                out=torch.empty(1, 1, 5, 5), alpha=None, causal=False, window=0, radius=0, scale=0.25, softcap=0.0,
                normalize_rows=False, num_threads=1)
    args.update(overrides)
    _cpu.attention_maps(**args)


def test_raw_call_runs():
    raw_call()


@pytest.mark.parametrize("overrides,message", [
    (dict(q=torch.zeros(1, 4, 5, 16, dtype=torch.float64)),
     r"q must be a contiguous float32 tensor of shape \(B, H, N, Dh\) on cpu; got a contiguous float64 tensor "
     r"of shape \[1, 4, 5, 16\] on cpu\."),
    (dict(q=torch.zeros(1, 5, 4, 16).transpose(1, 2)), "got a non-contiguous float32 tensor"),
    (dict(q=torch.zeros(4, 5, 16)), r"q must be a contiguous float32 tensor of shape \(B, H, N, Dh\)"),
    (dict(k=torch.zeros(1, 2, 6, 16)), r"k must be a contiguous float32 tensor of shape \(B=1, KV, N=5, Dh=16\)"),
    (dict(k=torch.zeros(1, 3, 5, 16)), "must be a multiple of the number of key heads KV=3"),
    (dict(valid=torch.ones(1, 5, dtype=torch.uint8)), r"valid must be a contiguous bool tensor of shape \(B=1, N=5\)"),
    (dict(grams=torch.zeros(1, 5, 1, 4, 4)),
     r"grams must be a contiguous float32 tensor of shape \(B=1, N=5, M, H\+1=5, H\+1=5\) on cpu; got a "
     r"contiguous float32 tensor of shape \[1, 5, 1, 4, 4\]"),
    (dict(row_scale=torch.zeros(1, 5, 2)), r"row_scale must be a contiguous float32 tensor of shape \(B=1, N=5, M=1\)"),
    (dict(rows=torch.tensor([0, 5])), r"rows must lie in \[0, N=5\), got values from 0 to 5"),
    (dict(rows=torch.tensor([0, 1], dtype=torch.int32)), r"rows must be a contiguous int64 tensor of shape \(R\)"),
    (dict(weights=torch.ones(1, 2, 5)), r"out must be a contiguous float32 tensor of shape \(B=1, M=1, K=2, N=5\)"),
    (dict(out=torch.empty(1, 1, 5, 4)), r"out must be a contiguous float32 tensor of shape \(B=1, M=1, R=5, N=5\)"),
    (dict(alpha=torch.empty(1, 4, 4, 5)), r"alpha must be a contiguous float32 tensor of shape \(B=1, H=4, R=5, N=5\)"),
    (dict(window=-1), "sliding window must be 0"),
    (dict(radius=-1), r"symmetric window radius must be 0 \(none\) or positive; got -1\."),
    (dict(softcap=-0.5),
     r"logit soft-cap must be 0 \(none\) or a positive number within the float32 range; got -0\.5\."),
    (dict(softcap=float("inf")), "logit soft-cap must be 0"),
    (dict(softcap=float("nan")), "logit soft-cap must be 0"),
    (dict(softcap=1e39), "logit soft-cap must be 0"),  # finite in float64, inf in float32
    (dict(normalize_rows=True), "normalize_rows only applies"),
    (dict(scale=float("nan")), "scale must be a finite"),
])
def test_raw_call_rejects_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        raw_call(**overrides)


def test_tensors_on_another_device_are_rejected():
    attn = random_attention(B=1, N=5)
    meta = Attention(q=attn.q.to("meta"), k=attn.k, valid=attn.valid, causal=False, window=0, scale=1.0)
    grams, row_scale = random_grams(1, 5, 1, 4)
    with pytest.raises(ValueError, match="this extension runs on cpu tensors, but q is a contiguous float32 tensor"):
        cpu_maps(meta, grams, row_scale)
    with pytest.raises(ValueError, match=r"grams must be .* on cpu; got .* on meta"):
        cpu_maps(attn, grams.to("meta"), row_scale)


# ---------------------------------------------------------------- row_lse (the row_stats primitive)


def cpu_row_lse(attn):
    from kobattr import _cpu

    return compiled_row_lse(_cpu, attn)


def lse_close(lse, attn, atol=2e-6):
    """fp32 row log-sum-exp against the fp64 oracle on the rows that see a key (relative to max(1, |lse|), the
    float32 spacing of the logits and their max); the others are +inf, the binding's documented value."""
    want, seen = oracle_row_lse(attn)
    assert lse.dtype == torch.float32 and lse.shape == want.shape
    error = ((lse.double() - want).abs() / want.abs().clamp_min(1.0))[seen]
    assert error.numel() == 0 or error.max() < atol, f"max error {error.max():.2e}"
    assert torch.all(lse[~seen] == float("inf"))


@pytest.mark.parametrize("N", [1, 7, 97, 257])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("H,KV", [(4, 2), (4, 1), (3, 3)])
def test_row_lse(N, pattern, H, KV):
    options = dict(PATTERNS[pattern])
    options["pad"] = min(options.get("pad", 0), N - 1)
    attn = random_attention(B=2, H=H, KV=KV, N=N, **options)
    lse_close(cpu_row_lse(attn), attn)


@pytest.mark.parametrize("H,KV", [(1, 1), (40, 8)])  # other key tiles, as for the maps
def test_row_lse_head_counts(H, KV):
    attn = random_attention(B=1, H=H, KV=KV, N=70, causal=True, window=30)
    lse_close(cpu_row_lse(attn), attn)


@pytest.mark.parametrize("pattern", FEATURE_PATTERNS)
def test_radius_and_softcap_change_the_row_lse(pattern):
    attn = random_attention(B=2, N=97, **PATTERNS[pattern])
    lse = cpu_row_lse(attn)
    _, seen = oracle_row_lse(attn)
    for feature in ("radius", "softcap"):
        if getattr(attn, feature):
            ignored, _ = oracle_row_lse(dataclasses.replace(attn, **{feature: 0}))
            assert (lse.double() - ignored)[seen].abs().max() > 0.05, feature


def test_row_lse_of_a_fully_padded_batch_element_is_inf():
    attn = random_attention(B=2, N=9, causal=True)
    attn.valid[1] = False
    lse = cpu_row_lse(attn)
    assert torch.all(lse[1] == float("inf"))
    lse_close(lse, attn)


def test_row_lse_inputs_in_any_dtype_and_layout():
    """bfloat16 q and k are converted (the oracle sees the same rounded values), strided ones copied."""
    attn = random_attention(B=2, N=33, causal=True, pad=3, dtype=torch.bfloat16)
    lse_close(cpu_row_lse(attn), attn)
    attn = random_attention(B=2, N=33, window=5, pad=3)
    strided = dataclasses.replace(attn, q=attn.q.transpose(1, 2).contiguous().transpose(1, 2))
    assert not strided.q.is_contiguous()
    lse_close(cpu_row_lse(strided), attn)


def test_row_lse_thread_counts_agree():
    attn = random_attention(B=1, N=130, causal=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu_row_lse(attn)
        torch.set_num_threads(2)
        double = cpu_row_lse(attn)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(single, double, rtol=0, atol=0)


def test_row_lse_is_the_first_pass_of_the_maps():
    """alpha = exp(logit - lse) with the lse of row_lse is the alpha attention_maps returns."""
    attn = random_attention(B=2, N=97, **PATTERNS["causal_window_radius_softcap_padding"])
    grams, row_scale = random_grams(2, 97, 1, 4)
    _, alpha = cpu_maps(attn, grams, row_scale, want_alpha=True)
    diagonal = alpha.diagonal(dim1=-2, dim2=-1)  # (B, H, N): alpha^h_ii
    q, k = attn.q.double(), attn.k.double().repeat_interleave(2, 1)
    logit = (q * k).sum(-1) * attn.scale
    logit = attn.softcap * torch.tanh(logit / attn.softcap)
    mine = torch.exp(logit - cpu_row_lse(attn).double()) * attn.valid[:, None]
    torch.testing.assert_close(mine.float(), diagonal, rtol=1e-5, atol=1e-6)


def raw_row_lse(**overrides):
    """kobattr._cpu.row_lse on a valid small problem (B=1, H=4, KV=2, N=5, Dh=16), with some arguments replaced."""
    from kobattr import _cpu

    attn = random_attention(B=1, H=4, KV=2, N=5)
    args = dict(q=attn.q, k=attn.k, valid=attn.valid, lse=torch.empty(1, 4, 5), causal=False, window=0, radius=0,
                scale=0.25, softcap=0.0, num_threads=1)
    args.update(overrides)
    _cpu.row_lse(**args)
    return args["lse"]


def test_raw_row_lse_runs():
    assert torch.isfinite(raw_row_lse()).all()


@pytest.mark.parametrize("overrides,message", [
    (dict(q=torch.zeros(1, 4, 5, 16, dtype=torch.float64)),
     r"row_lse: q must be a contiguous float32 tensor of shape \(B, H, N, Dh\) on cpu; got a contiguous float64 "
     r"tensor of shape \[1, 4, 5, 16\] on cpu\."),
    (dict(k=torch.zeros(1, 3, 5, 16)), "row_lse: the number of query heads H=4 must be a multiple"),
    (dict(valid=torch.ones(1, 6, dtype=torch.bool)), r"row_lse: valid must be a contiguous bool tensor of shape "
                                                     r"\(B=1, N=5\)"),
    (dict(lse=torch.empty(1, 4, 6)), r"row_lse: lse must be a contiguous float32 tensor of shape \(B=1, H=4, N=5\) "
                                     r"on cpu; got a contiguous float32 tensor of shape \[1, 4, 6\]"),
    (dict(lse=torch.empty(1, 5, 4).transpose(1, 2)), "row_lse: lse must be .* got a non-contiguous float32 tensor"),
    (dict(lse=torch.empty(1, 4, 5, dtype=torch.float64)), "row_lse: lse must be a contiguous float32 tensor"),
    (dict(q=torch.zeros(1, 4, 5, 16).to("meta")), "row_lse: this extension runs on cpu tensors, but q is"),
    (dict(window=-1), "row_lse: the sliding window must be 0"),
    (dict(radius=-1), "row_lse: the symmetric window radius must be 0"),
    (dict(softcap=float("nan")), "row_lse: the logit soft-cap must be 0"),
    (dict(scale=float("inf")), "row_lse: the softmax scale must be a finite"),
])
def test_raw_row_lse_rejects_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        raw_row_lse(**overrides)


# ---------------------------------------------------------------- the backend class (kobattr/backends/compiled_backend.py)


def test_backend_refuses_float64_and_other_devices():
    from kobattr.backends.compiled_backend import CompiledBackend

    backend = CompiledBackend("cpu")
    attn = random_attention(B=1, N=5)
    assert backend.refusals("attention_maps", attn) == backend.refusals("row_stats", attn) == []
    assert backend.primitives == ("attention_maps", "row_stats")
    every_feature = random_attention(B=1, N=5, **PATTERNS["causal_window_radius_softcap_padding"])
    assert backend.refusals("attention_maps", every_feature) == []
    as_double = random_attention(B=1, N=5, dtype=torch.float64)
    assert any("float64" in reason for reason in backend.refusals("attention_maps", as_double))
    meta = Attention(q=attn.q.to("meta"), k=attn.k.to("meta"), valid=attn.valid, causal=False, window=0, scale=1.0)
    assert any("not meta" in reason for reason in backend.refusals("attention_maps", meta))


def test_a_given_row_lse_replaces_the_first_pass():
    """attention_maps with row_lse (every row's log-sum-exp from row_lse) fills the same map, also for selected
    rows; a wrongly shaped row_lse is refused with a sentence."""
    import kobattr._cpu as cpu

    torch.manual_seed(0)
    B, H, N, Dh, M = 2, 4, 37, 8, 2
    q, k = torch.randn(B, H, N, Dh), torch.randn(B, 2, N, Dh)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, -5:] = False
    grams = torch.randn(B, N, M, H + 1, H + 1)
    grams = grams @ grams.transpose(-1, -2)
    row_scale = torch.rand(B, N, M)
    lse = torch.empty(B, H, N)
    options = dict(causal=True, window=9, radius=0, scale=0.3, softcap=0.0)
    cpu.row_lse(q=q, k=k, valid=valid, lse=lse, num_threads=0, **options)
    # bit for bit only when pass 2 recomputes exp(s - lse) either way (kept exponentials round differently)
    previous = cpu.set_cache_limit(0)
    try:
        for rows in (None, torch.tensor([3, 0, 36, 20])):
            R = N if rows is None else len(rows)
            outs = []
            for given in (None, lse):
                out = torch.empty(B, M, R, N)
                cpu.attention_maps(q=q, k=k, valid=valid, grams=grams, row_scale=row_scale, rows=rows, weights=None,
                                   out=out, alpha=None, normalize_rows=False, num_threads=0, row_lse=given, **options)
                outs.append(out)
            torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    finally:
        cpu.set_cache_limit(previous)
    # the given statistics are really read: one more nat in every lse scales alpha by 1/e, and so every
    # off-diagonal map value (no residual slot there) by 1/e
    maps = {}
    for name, given in (("right", lse), ("shifted", lse + 1.0)):
        maps[name] = torch.empty(B, M, N, N)
        cpu.attention_maps(q=q, k=k, valid=valid, grams=grams, row_scale=row_scale, rows=None, weights=None,
                           out=maps[name], alpha=None, normalize_rows=False, num_threads=0, row_lse=given, **options)
    off_diagonal = ~torch.eye(N, dtype=torch.bool)
    torch.testing.assert_close(maps["shifted"][..., off_diagonal], maps["right"][..., off_diagonal] / math.e)
    with pytest.raises(ValueError, match="row_lse"):
        cpu.attention_maps(q=q, k=k, valid=valid, grams=grams, row_scale=row_scale, rows=None, weights=None,
                           out=torch.empty(B, M, N, N), alpha=None, normalize_rows=False, num_threads=0,
                           row_lse=lse[:, :, :5], **options)


# ------------------------------------------------------------------ every instruction set of the build
# The kernel is compiled for the x86-64 baseline, AVX2 and AVX-512 (csrc/cpu/attention_pairs_x86_64_v*.cpp) and
# runs the widest by default: the tests above check that one, these check each build this processor can run.
ISAS = ["x86-64-v4", "x86-64-v3", "baseline"]


@pytest.fixture(params=ISAS)
def isa(request):
    from kobattr import _cpu

    if request.param not in _cpu.isas():
        pytest.skip(f"this processor cannot run the {request.param} build (it runs {_cpu.isas()})")
    previous = _cpu.use_isa(request.param)
    yield request.param
    _cpu.use_isa(previous)


def test_the_widest_instruction_set_runs_by_default():
    from kobattr import _cpu

    assert _cpu.isas()[-1] == "baseline" and set(_cpu.isas()) <= set(ISAS)
    assert _cpu.isa() == _cpu.isas()[0]
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        _cpu.use_isa("sse9")


@pytest.fixture(params=["kept", "recomputed"])
def exponentials(request):
    """The map's pass 2 takes alpha from pass 1's kept exponentials (the default when they fit the per-thread
    limit) or recomputes q.k and exp (limit 0, as for inputs too long for the limit)."""
    from kobattr import _cpu

    previous = _cpu.set_cache_limit(0 if request.param == "recomputed" else 512 << 20)
    yield request.param
    _cpu.set_cache_limit(previous)


def test_kept_exponentials_are_used_when_they_fit():
    """Both ways of pass 2 match the oracle and are really different code (they round differently somewhere),
    so the kept-exponential tests do exercise the cache: 4 heads x 2 key tiles x 64 rows fit 512 MiB, not 0."""
    from kobattr import _cpu

    attn = random_attention(B=1, H=4, KV=2, N=97, causal=True)
    grams, row_scale = random_grams(1, 97, 1, 4)
    expected = oracle_attention_maps(attn, grams, row_scale)
    maps = {}
    previous = _cpu.set_cache_limit(512 << 20)
    try:
        for limit in (512 << 20, 0):
            _cpu.set_cache_limit(limit)
            maps[limit], _ = cpu_maps(dataclasses.replace(attn), grams, row_scale)
            close(maps[limit], expected)
    finally:
        _cpu.set_cache_limit(previous)
    assert not torch.equal(maps[512 << 20], maps[0])


def test_cache_limit_is_checked():
    from kobattr import _cpu

    with pytest.raises(ValueError, match="at least 0"):
        _cpu.set_cache_limit(-1)


@pytest.mark.parametrize("pattern", ["plain", "causal_window_padding", "causal_window_radius_softcap_padding",
                                     "window_radius_softcap_padding"])
def test_each_instruction_set(isa, exponentials, pattern):
    from kobattr import _cpu

    attn = random_attention(B=2, H=4, KV=2, N=97, **PATTERNS[pattern])
    grams, row_scale = random_grams(2, 97, 2, 4)
    weights = torch.rand(2, 3, 97, generator=torch.Generator().manual_seed(7))
    maps, alpha = cpu_maps(attn, grams, row_scale, want_alpha=True)
    assert _cpu.isa() == isa
    close(maps, oracle_attention_maps(attn, grams, row_scale))
    close(alpha, oracle_alpha(attn))
    rows, _ = cpu_maps(attn, grams, row_scale, rows=SELECTED_ROWS)
    close(rows, oracle_attention_maps(attn, grams, row_scale, rows=SELECTED_ROWS))
    out, _ = cpu_maps(attn, grams, row_scale, weights=weights, normalize_rows=True)
    close(out, oracle_attention_maps(attn, grams, row_scale, weights=weights, normalize_rows=True))
    lse_close(cpu_row_lse(attn), attn)
