"""The torch backend against the materialising reference, and the reference against a plain forward."""

import dataclasses
import math

import pytest
import torch
from random_layers import KINDS, random_layer

from kobattr.core import attribute
from kobattr.layer import LayerInputError
from kobattr.methods import form, methods_for
from kobattr.reference import reference


def assert_close(actual, expected, rtol, what):
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual - expected).abs() / scale).max().item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def compare(res, ref, rtol, rows=None):
    for m in res.methods:
        expected = ref["maps"][m] if rows is None else ref["maps"][m][:, rows]
        assert_close(res.maps[m], expected, rtol, f"map {m}")
        r_res, r_ref = res.ratios[m], ref["ratios"][m]
        assert torch.equal(r_res.isnan(), r_ref.isnan()), f"padding rows of ratio {m}"
        assert_close(r_res.nan_to_num(0), r_ref.nan_to_num(0), rtol, f"ratio {m}")
        if m in ref["bias"]:
            assert_close(res.bias_norms[m], ref["bias"][m].norm(dim=-1), rtol, f"bias {m}")


CASES = [
    ("bert", dict(N=7)), ("bert", dict(N=97, pad=5)), ("bert", dict(N=1)), ("bert", dict(N=257, B=1)),
    ("gpt2", dict(N=7)), ("gpt2", dict(N=97, pad=3)), ("gpt2", dict(N=1)),
    ("llama", dict(N=7)), ("llama", dict(N=97, window=16, pad=4)), ("llama", dict(N=257, B=1, window=64)),
    ("post_geglu", dict(N=7, pad=2)), ("post_relu", dict(N=7, causal=True)),
    ("gemma2", dict(N=7)), ("gemma2", dict(N=33, pad=3, window=8, softcap=1.5)),
    ("sandwich_ln", dict(N=7, pad=2)), ("sandwich_ln", dict(N=40, radius=5, softcap=2.0)),
    ("olmo2", dict(N=7, pad=2)), ("post_only_ln", dict(N=21, pad=4, radius=3)),
    ("pythia", dict(N=7)), ("pythia", dict(N=33, pad=5, window=6)), ("parallel_shared", dict(N=9, pad=2)),
]


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{'-'.join(f'{a}{b}' for a, b in kw.items())}" for k, kw in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_matches_reference(kind, kw, dtype):
    layer = random_layer(kind, dtype=dtype, **kw)
    ref = reference(layer, methods="all")
    res = attribute(layer, methods="all", heads=True, backend="torch", budget=1 << 14)
    compare(res, ref, 1e-12 if dtype == torch.float64 else 1e-5)
    for m in ("attn_w", "attn_n"):
        assert_close(res.head_maps[m], ref["head_maps"][m], 1e-12 if dtype == torch.float64 else 1e-5, f"heads {m}")
    assert_close(res.value_norms, ref["value_norms"], 1e-5, "value norms")


@pytest.mark.parametrize("kind", list(KINDS))
def test_reference_is_complete_against_plain_forward(kind):
    """Parts plus bias terms equal the layer's real intermediate and output hidden states."""
    layer = random_layer(kind, N=9, pad=2, window=5)
    ref = reference(layer, methods="all")
    real = layer.forward()
    valid = layer.valid[..., None]
    checked = 0
    for m in methods_for(layer.structure):
        state = form(m, layer.structure).target
        if state is not None:
            torch.testing.assert_close(ref["total"][m], real[state] * valid, rtol=1e-10, atol=1e-10, msg=m)
            checked += 1
    # every vector and FF method of the structure names its hidden state
    # (the peers' measures name one where they decompose one: ALTI)
    assert checked == sum(form(m, layer.structure).kind in ("vector", "ff") or form(m, layer.structure).target is not None
                          for m in methods_for(layer.structure)) >= 4
    res = attribute(layer, methods="all", backend="torch")
    # completeness is reported where it tests something: the FF scopes, through the FFN's IG split
    # (and ALTI's tiles, summed, against the block output)
    assert set(res.completeness) == {m for m in res.methods if form(m, layer.structure).kind == "ff" or
                                     (form(m, layer.structure).kind == "peer" and form(m, layer.structure).target)}
    for m, err in res.completeness.items():
        assert err.max() < 1e-10, m


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_output_modes(kind):
    layer = random_layer(kind, N=23, pad=3, dtype=torch.float64)
    ref = reference(layer, methods="all")
    rows = [0, 5, 22, 7]
    res = attribute(layer, methods="all", rows=rows, heads=True, backend="torch")
    compare(res, ref, 1e-12, rows=rows)
    assert_close(res.head_maps["attn_n"], ref["head_maps"]["attn_n"][:, :, rows], 1e-12, "head rows")
    weights = torch.rand(2, 3, 23, dtype=torch.float64)
    for normalize in (False, True):
        con = attribute(layer, methods="all", contract=weights, normalize_rows=normalize, backend="torch", budget=1 << 12)
        picked = attribute(layer, methods="all", contract=weights, rows=rows, normalize_rows=normalize, backend="torch")
        full_maps = attribute(layer, methods="all", rows=rows, heads=True, normalize_rows=normalize, backend="torch")
        for m in con.methods:
            full = ref["maps"][m]
            if normalize:
                sums = full.sum(-1, keepdim=True)
                full = torch.where(sums > 0, full / sums.clamp_min(1e-300), 0.0)
            assert_close(con.maps[m], weights @ full, 1e-12, f"contraction {m} normalize={normalize}")
            # a contraction over selected rows only
            assert_close(picked.maps[m], weights[:, :, rows] @ full[:, rows], 1e-12, f"rows contraction {m}")
            # normalize_rows applies to returned rows too
            assert_close(full_maps.maps[m], full[:, rows], 1e-12, f"rows {m} normalize={normalize}")
            if normalize:
                valid_rows = layer.valid[:, rows]
                sums = full_maps.maps[m].sum(-1)
                torch.testing.assert_close(sums[valid_rows], torch.ones_like(sums[valid_rows]))


def test_batch_elements_are_independent():
    layer = random_layer("gpt2", N=11, B=2, pad=4)
    res = attribute(layer, methods="all", backend="torch")
    single = attribute(layer.__class__(**{**layer.__dict__, **{
        n: getattr(layer, n)[:1] for n in ("q", "k", "v", "x", "key_valid")}}), methods="all", backend="torch")
    for m in res.methods:
        torch.testing.assert_close(res.maps[m][:1], single.maps[m])


def test_component_analysis_matches_reference():
    layer = random_layer("bert", N=13)
    ref = reference(layer, methods="all")
    res = attribute(layer, methods=["atbffresln"], backend="torch")
    for c, change in ref["context_change"].items():
        torch.testing.assert_close(res.context_change[c], change)
    assert [p[:2] for p in res.ff_amp[0]] == [p[:2] for p in ref["ff_amp"][0]]
    assert all(q != k for q, k, _ in res.ff_amp[0]) and len(res.ff_amp[0]) == 10
    amp = (ref["maps"]["atbff"][0] / ref["maps"]["atbff"][0].sum(-1, keepdim=True)
           - ref["maps"]["atb"][0] / ref["maps"]["atb"][0].sum(-1, keepdim=True)).fill_diagonal_(float("-inf"))
    assert res.ff_amp[0][0][2] == pytest.approx(amp.max().item(), rel=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    vis = layer.visible()[0]
    rho = scipy_stats.spearmanr(ref["maps"]["atb"][0][vis].numpy(), ref["maps"]["atbff"][0][vis].numpy())[0]
    assert math.isclose(1 - rho, ref["context_change"]["ff"][0].item(), rel_tol=1e-9)


def test_riemann_option_converges_to_exact():
    layer = random_layer("gpt2", N=5)
    exact = attribute(layer, methods=["atblnff"], backend="torch")
    coarse = attribute(layer, methods=["atblnff"], backend="torch", ig="riemann", ig_steps=20)
    fine = attribute(layer, methods=["atblnff"], backend="torch", ig="riemann", ig_steps=2000)
    err = lambda r: (r.maps["atblnff"] - exact.maps["atblnff"]).abs().max()  # noqa: E731
    assert err(fine) < err(coarse) / 50
    torch.testing.assert_close(reference(layer, ["atblnff"], ig="riemann", ig_steps=20)["maps"]["atblnff"], coarse.maps["atblnff"])


def test_method_lists_per_placement():
    assert "atbffresln" in methods_for("post") and "atbffresln" not in methods_for("pre")
    with pytest.raises(ValueError, match="defined for post"):
        attribute(random_layer("gpt2"), methods=["atbffresln"])
    with pytest.raises(ValueError, match="unknown method"):
        attribute(random_layer("bert"), methods=["nope"])


@pytest.mark.parametrize("breakage,message", [
    (lambda L: setattr(L, "k", L.k[:, :, :-1]), "k must be"),
    (lambda L: setattr(L, "x", L.x.float()), "share one dtype"),
    (lambda L: setattr(L, "q", L.q[:, :3]), "multiple of the number of key/value heads"),
    (lambda L: L.x.__setitem__((0, 0, 0), float("nan")), "NaN or inf"),
    (lambda L: L.v.__setitem__((0, 1, 2, 3), float("-inf")), "v contains NaN or inf"),
    (lambda L: L.w_o.__setitem__((0, 0, 0), float("inf")), "w_o contains NaN or inf"),
    (lambda L: setattr(L, "w_o", L.w_o[:, :, :-1]), "w_o must be"),
    (lambda L: setattr(L, "key_valid", torch.ones(2, 3, dtype=torch.bool)), "key_valid"),
    (lambda L: setattr(L, "window", -1), "window"),
])
def test_bad_input_gets_a_clear_error(breakage, message):
    layer = random_layer("llama", N=7)
    breakage(layer)
    with pytest.raises(LayerInputError, match=message):
        attribute(layer, methods="all")


def test_empty_sequence_and_bad_rows():
    layer = random_layer("bert", N=4)
    empty = layer.__class__(**{**layer.__dict__, **{n: getattr(layer, n)[:, :, :0] for n in ("q", "k", "v")},
                               "x": layer.x[:, :0]})
    with pytest.raises(LayerInputError, match="empty"):
        attribute(empty)
    with pytest.raises(LayerInputError, match="rows"):
        attribute(layer, rows=[4])
    with pytest.raises(LayerInputError, match="contract"):
        attribute(layer, contract=torch.ones(3, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_low_precision_error_is_within_twice_the_references(kind, dtype):
    """flash-attention rule, in the precision the torch backend computes in: it upcasts float16/bfloat16
    layers to float32, so |backend - fp64 reference| <= 2 |reference computed in float32 - fp64 reference|
    (measured ratios 1.3-1.8). Against the float16 reference's ~1e-3 error the bound would be vacuous. The FF
    products too with ff_gemm="float32" (by default they follow the model: tests/test_ff_gemm.py)."""
    layer = random_layer(kind, N=33, pad=3, dtype=dtype)
    exact = reference(layer.to(torch.float64), methods="all")["maps"]
    fp32 = reference(layer.to(torch.float32), methods="all", dtype=torch.float32)["maps"]
    res = attribute(layer, methods="all", backend="torch", ff_gemm="float32")
    for m in res.methods:
        ours = (res.maps[m].double() - exact[m]).abs().max()
        theirs = (fp32[m].double() - exact[m]).abs().max()
        assert ours <= 2 * theirs, (m, ours.item(), theirs.item())


def test_too_large_requests_are_refused_before_any_work():
    import importlib

    from kobattr import core

    reference_module = importlib.import_module("kobattr.reference")

    layer = random_layer("bert", N=7)
    old = core.MAX_OUTPUT_ELEMENTS, reference_module.MAX_PAIR_ELEMENTS
    try:
        core.MAX_OUTPUT_ELEMENTS = 2 * 7 * 7  # one map of this batch fits, two do not
        with pytest.raises(LayerInputError, match="rows= or use contract="):
            attribute(layer, methods=["attn_w", "attn_n"])
        attribute(layer, methods=["attn_n"], rows=[0])
        reference_module.MAX_PAIR_ELEMENTS = 100
        with pytest.raises(LayerInputError, match="reference materialises"):
            reference(layer)
    finally:
        core.MAX_OUTPUT_ELEMENTS, reference_module.MAX_PAIR_ELEMENTS = old


def test_softcap_and_radius_follow_their_formulas():
    """alpha = softmax(c tanh(s q.k / c)) over |i - j| <= r, written out here, and both change the maps."""
    layer = random_layer("sandwich_ln", N=12, B=1, radius=3, softcap=0.8)
    logits = (layer.q @ layer.k.transpose(-1, -2)) * layer.softmax_scale
    capped = 0.8 * torch.tanh(logits / 0.8)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None]
    alpha = torch.softmax(capped.masked_fill((i - j).abs() > 3, float("-inf")), -1)
    ref = reference(layer, methods="all")
    torch.testing.assert_close(ref["alpha"], alpha, rtol=1e-12, atol=1e-12)
    assert (logits.abs() > 1.6).any()  # the cap bites
    for changed in (dict(softcap=0.0), dict(radius=0)):
        other = reference(dataclasses.replace(layer, **changed), methods="all")
        for m in ("attn_w", "attn_n", "atblnffres"):
            assert not torch.allclose(other["maps"][m], ref["maps"][m]), (changed, m)


@pytest.mark.parametrize("kind", ["gemma2", "olmo2"])
def test_norms_after_attention_and_ffn_change_the_maps(kind):
    """P1 and P2 enter every method after attention: a layer without them gives other maps (but attn_n_prenorm, the
    attention part before P1)."""
    layer = random_layer(kind, N=9)
    ref = reference(layer, methods="all")
    scaled = dataclasses.replace(layer, attn_out_norm=dataclasses.replace(layer.attn_out_norm, weight=layer.attn_out_norm.weight * 3),
                                 ffn_out_norm=dataclasses.replace(layer.ffn_out_norm, weight=layer.ffn_out_norm.weight.flip(0)))
    other = reference(scaled, methods="all")
    for m in ref["maps"]:
        if m == "attn_n_prenorm":
            assert torch.equal(other["maps"][m], ref["maps"][m])
        elif m not in ("attn_w", "attnres_w"):
            assert not torch.allclose(other["maps"][m], ref["maps"][m]), m


def with_head_outputs(layer):
    """The layer carrying sum_j alpha^h_ij v_j as a model's attention would hand it over (padding rows 0)."""
    alpha = reference(layer, methods=["attn_w"], dtype=layer.q.dtype)["alpha"]
    v = layer.v.repeat_interleave(layer.n_heads // layer.n_kv_heads, 1)
    return dataclasses.replace(layer, head_outputs=alpha @ v)


@pytest.mark.parametrize("kind,kw", [("bert", dict(N=30, pad=4)), ("llama", dict(N=40, window=9, pad=3)),
                                     ("gemma2", dict(N=25, softcap=1.5, pad=2)), ("sandwich_ln", dict(N=31, radius=4))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_model_attention_output_gives_the_same_results(kind, kw, dtype):
    """With Layer.head_outputs the row pass only recomputes the row log-sum-exp (row_stats)."""
    layer = random_layer(kind, dtype=dtype, **kw)
    given = with_head_outputs(layer)
    plain = attribute(layer, methods="all", backend="torch")
    fast = attribute(given, methods="all", backend="torch")
    # full maps: the attention primitive's own row statistics serve alpha_ii, so row_stats never runs
    assert "row_stats" not in plain.backends and "row_stats" not in fast.backends
    picked = attribute(given, methods="all", rows=[0, 3], backend="torch")  # rows=: row_stats gives every row's
    assert picked.backends["row_stats"] == "torch"
    for m in plain.methods:
        assert_close(picked.ratios[m].nan_to_num(0), plain.ratios[m].nan_to_num(0), 1e-5 if dtype == torch.float32
                     else 1e-12, f"rows= ratio {m}")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for m in plain.methods:
        assert_close(fast.maps[m], plain.maps[m], tol, m)
        assert torch.equal(fast.ratios[m].isnan(), plain.ratios[m].isnan())
        assert_close(fast.ratios[m].nan_to_num(0), plain.ratios[m].nan_to_num(0), tol, f"ratio {m}")


@pytest.mark.parametrize("kind,kw", [("bert", dict(N=70, pad=4)), ("gemma2", dict(N=25, softcap=1.5, pad=2)),
                                     ("sandwich_ln", dict(N=31, radius=4))])
def test_auto_takes_the_row_lse_from_the_cpu_kernel(kind, kw):
    """On CPU tensors backend="auto" runs row_stats through kobattr._cpu.row_lse, with the torch backend's results."""
    from kobattr.backends import availability

    if availability()["cpu"] is not None:
        pytest.skip(availability()["cpu"])
    given = with_head_outputs(random_layer(kind, dtype=torch.float32, **kw))
    auto = attribute(given, methods="all", rows=list(range(0, given.seq_len, 3)), backend="auto")
    plain = attribute(given, methods="all", rows=list(range(0, given.seq_len, 3)), backend="torch")
    assert auto.backends["row_stats"] == "cpu" and plain.backends["row_stats"] == "torch"
    for m in plain.methods:
        assert_close(auto.maps[m], plain.maps[m], 1e-5, m)
        assert torch.equal(auto.ratios[m].isnan(), plain.ratios[m].isnan())
        assert_close(auto.ratios[m].nan_to_num(0), plain.ratios[m].nan_to_num(0), 1e-5, f"ratio {m}")


def test_a_wrong_model_attention_output_is_caught_by_the_spot_check():
    from kobattr.verify import VerificationError

    layer = with_head_outputs(random_layer("gpt2", N=12, dtype=torch.float32))
    wrong = dataclasses.replace(layer, head_outputs=layer.head_outputs * 1.01)
    attribute(layer, methods=["attnresln_n"], backend="torch")  # verify=2 by default: passes
    # the maps are checked against the reference computed with the model's attention output, and that output
    # against its recomputation from q, k and v
    with pytest.raises(VerificationError, match=r"recorded head outputs .* by 1\.00e-02 .* float32"):
        attribute(wrong, methods=["attnresln_n"], backend="torch")


def test_head_outputs_must_have_the_shape_of_q():
    layer = random_layer("bert", N=5)
    with pytest.raises(LayerInputError, match=r"head_outputs must be \(B, H, N, Dh\)"):
        attribute(dataclasses.replace(layer, head_outputs=layer.q[:, :, :4]), backend="torch")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("rows", [None, [0, 7, 3, 12]])
def test_pair_kernels_reuse_the_row_statistics(backend, rows):
    """With the model's attention output the row pass's log-sum-exp goes into the pair kernels, which then
    skip their own first pass: the maps (full, selected rows, FF scopes) must not change."""
    from kobattr.backends import availability

    if availability()[backend] is not None:
        pytest.skip(availability()[backend])
    layer = with_head_outputs(random_layer("llama", N=13, pad=2, window=6, dtype=torch.float32))
    methods = ["attn_n", "attnresln_n", "atblnffres"]
    fast = attribute(layer, methods=methods, rows=rows, backend=backend)
    # full maps: the attention primitive's statistics; rows=: the row_stats primitive's, reused by the pairs
    assert fast.backends.get("row_stats") == (None if rows is None else backend)
    plain = attribute(layer, methods=methods, rows=rows, backend="torch")
    for m in methods:
        assert_close(fast.maps[m], plain.maps[m], 1e-5, m)
