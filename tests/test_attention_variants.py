"""The alternative attention pair kernels, triton_streamed (kernels/attention_pairs_streamed.py) and triton_staged
(kernels/attention_pairs_staged.py), run by the Triton interpreter (tests/conftest.py) against the fp64 oracle and
the reference; what they declare they refuse, how dispatch, the self-test and the tuner see them; and benchmarks/
holding no kernels.

N = 37 / 40 cross query and key tiles; padding, GQA, causal, windows, radius and soft-capping; 4 heads (padded to
16) and 12 heads with Dh = 80; Grams of rank 8 < H + 1 (singular) and full-rank ones; several Grams at once."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from kobattr import selftest, tuner  # noqa: E402
from kobattr.backends import AUTO_ORDER, PRIMITIVES, auto_order, implementation, select  # noqa: E402
from kobattr.backends.base import BackendUnavailable  # noqa: E402
from kobattr.core import attention_of, attribute  # noqa: E402
from kobattr.kernels import attention_pairs_staged as staged, attention_pairs_streamed as streamed  # noqa: E402
from kobattr.reference import reference  # noqa: E402
from kobattr.testing import random_layer  # noqa: E402
from kobattr.verify import row_errors  # noqa: E402
from primitive_oracle import oracle_attention_maps, random_attention, random_grams  # noqa: E402

VARIANTS = ("triton_streamed", "triton_staged")
if implementation("triton_streamed").unavailable_reason() is not None:
    pytest.skip(implementation("triton_streamed").unavailable_reason(), allow_module_level=True)

PATTERNS = {
    "N37-causal-pad-gqa2": dict(N=37, H=4, KV=2, Dh=16, causal=True, pad=3),
    "N40-window-radius-softcap-pad-gqa2": dict(N=40, H=4, KV=2, Dh=16, window=5, radius=8, softcap=1.0,
                                               logit_std=3.0, pad=3),
    "N17-H12-dh80-causal-window-gqa3": dict(N=17, H=12, KV=3, Dh=80, causal=True, window=7, pad=2),
    "N1": dict(N=1, H=4, KV=4, Dh=16),
}


def full_rank_grams(B, N, M, H, seed):
    """Grams of H + 3 random vectors: every factor column of the streamed kernel in use."""
    u = torch.randn(B, N, M, H + 1, H + 3, generator=torch.Generator().manual_seed(seed))
    return u @ u.transpose(-1, -2)


def relative_error(out, expected):
    return ((out.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_full_maps_and_rows_match_the_oracle(name, pattern):
    """fp32 under the interpreter (its fp32 dot is exact): only fp32 rounding remains. The full map computes the
    row statistics and leaves them on attn; the rows= call then reads them (base 2, selected rows); a fresh
    rows= call computes its own."""
    impl = implementation(name)
    attn = random_attention(B=2, **PATTERNS[pattern])
    B, H, N, _ = attn.q.shape
    grams, row_scale = random_grams(B, N, 2, H)
    grams[:, :, 1] = full_rank_grams(B, N, 1, H, seed=3)[:, :, 0]
    maps, alpha = impl.attention_maps(attn, grams, row_scale)
    assert alpha is None and maps.shape == (B, 2, N, N) and attn.row_lse is not None
    assert relative_error(maps, oracle_attention_maps(attn, grams, row_scale)) <= 1e-5
    rows = torch.tensor(sorted({N - 1, 0, N // 2, N // 3}, reverse=True))
    expected = oracle_attention_maps(attn, grams, row_scale, rows=rows)
    assert relative_error(impl.attention_maps(attn, grams, row_scale, rows=rows)[0], expected) <= 1e-5
    attn.row_lse = None
    assert relative_error(impl.attention_maps(attn, grams, row_scale, rows=rows)[0], expected) <= 1e-5


@pytest.mark.parametrize("N, H, KV, causal, tile", [
    (37, 4, 2, True, dict(BLOCK_M=16, BLOCK_N=16, SUB_N=4, num_warps=4, per_sm=1)),
    (21, 12, 3, False, dict(BLOCK_M=16, BLOCK_N=32, SUB_N=8, num_warps=4, per_sm=2)),
    (37, 4, 4, True, dict(BLOCK_M=32, BLOCK_N=16, SUB_N=2, num_warps=4, per_sm=4))])
def test_staged_tiles_and_the_persistent_loop(N, H, KV, causal, tile):
    """per_sm = 1 makes 2 programs take every (query block, b, Gram) task in turn, boustrophedon (the persistent
    loop and its reuse of one scratch tile); SUB_N from 2 to 8 keys per Gram dot."""
    attn = random_attention(B=2, H=H, KV=KV, N=N, Dh=16, causal=causal, pad=4)
    grams, row_scale = full_rank_grams(2, N, 2, H, seed=5), random_grams(2, N, 2, H)[1]
    ours = staged.attention_maps(attn.q, attn.k, attn.valid, causal, 0, attn.scale, grams, row_scale, tile=tile)
    assert relative_error(ours, oracle_attention_maps(attn, grams, row_scale)) <= 1e-5


def test_streamed_tile_of_16_rows():
    attn = random_attention(B=2, H=4, KV=1, N=37, Dh=16, causal=True, pad=2)
    grams, row_scale = random_grams(2, 37, 1, 4)
    ours = streamed.attention_maps(attn.q, attn.k, attn.valid, True, 0, attn.scale, grams, row_scale,
                                   tile=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4))
    assert relative_error(ours, oracle_attention_maps(attn, grams, row_scale)) <= 1e-5


def test_gram_factors_reproduce_the_gram():
    grams = torch.cat([random_grams(2, 5, 1, 6)[0], full_rank_grams(2, 5, 1, 6, seed=9)], 2)  # (2, 5, 2, 7, 7)
    factor, residual = streamed.gram_factors(grams)
    assert factor.shape == (2, 2, 5, 7, 16) and residual.shape == (2, 2, 5)
    lower = torch.cat([factor[..., :6], torch.zeros(2, 2, 5, 7, 1)], -1)
    lower[..., 6, 6] = residual.sqrt()
    assert torch.allclose(lower @ lower.transpose(-1, -2), grams.transpose(1, 2), rtol=1e-5, atol=1e-4)
    assert (factor[..., :6].triu(1) == 0).all() and (factor[..., 6:] == 0).all()  # lower triangular, c < H only


def test_a_bfloat16_scratch_rounds_alpha_and_the_gram_only():
    """alpha and G rounded to bfloat16 (8 bits): the map is off by a few 2^-9 relative, not more."""
    attn = random_attention(B=1, H=12, KV=4, N=21, Dh=32, causal=True)
    grams, row_scale = full_rank_grams(1, 21, 1, 12, seed=7), random_grams(1, 21, 1, 12)[1]
    ours = staged.attention_maps(attn.q, attn.k, attn.valid, True, 0, attn.scale, grams, row_scale,
                                 tile=dict(BLOCK_M=16, BLOCK_N=16, SUB_N=4, num_warps=4, per_sm=1),
                                 scratch_dtype=torch.bfloat16)
    assert 1e-5 < relative_error(ours, oracle_attention_maps(attn, grams, row_scale)) < 2 ** -6


@pytest.mark.parametrize("name", VARIANTS)
def test_refusals_name_every_input_it_cannot_take(name, monkeypatch):
    impl = implementation(name)
    every_feature = random_attention(B=1, H=4, KV=2, N=9, Dh=16, causal=True, window=3, radius=2, softcap=1.0, pad=2)
    assert impl.refusals("attention_maps", every_feature, outputs=frozenset({"rows"})) == []
    assert impl.refusals("attention_maps", every_feature, outputs=frozenset({"contract", "alpha"})) == [
        f"{name} does not produce the heads' attention weights alpha.",
        f"{name} does not produce contractions over the rows (contract=)."]
    assert impl.refusals("ff_maps", every_feature) == [f"{name} does not implement ff_maps."]
    assert impl.refusals("row_stats", every_feature) == [f"{name} does not implement row_stats."]
    as_double = random_attention(B=1, H=4, KV=2, N=9, Dh=16, dtype=torch.float64)
    assert any("float64" in reason for reason in impl.refusals("attention_maps", as_double))
    too_many_heads = random_attention(B=1, H=65, KV=65, N=3, Dh=16)
    assert any("at most 64 heads" in reason for reason in impl.refusals("attention_maps", too_many_heads))
    grams, row_scale = random_grams(1, 9, 1, 4)
    with pytest.raises(BackendUnavailable, match="does not produce contractions"):
        impl.attention_maps(every_feature, grams, row_scale, weights=torch.ones(1, 2, 9))
    with pytest.raises(BackendUnavailable, match="does not produce the heads' attention weights"):
        impl.attention_maps(every_feature, grams, row_scale, want_alpha=True)
    if not torch.cuda.is_available():  # without the interpreter a CPU tensor is no input for a Triton kernel
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        reasons = impl.refusals("attention_maps", every_feature)
        assert f"{name} takes cuda tensors, not cpu." in reasons and any("CUDA device" in r for r in reasons)


def test_dispatch_lists_why_each_variant_refuses_and_never_picks_one_by_itself():
    for device in AUTO_ORDER:
        for primitive in PRIMITIVES:
            assert not set(VARIANTS) & set(auto_order(primitive, device))
    layer = random_layer("bert", N=12, B=2, pad=3, dtype=torch.float32)
    attn = attention_of(layer)
    assert select("auto", "attention_maps", attn).name not in VARIANTS
    for name in VARIANTS:
        assert select(name, "attention_maps", attn, outputs=frozenset({"rows"})).name == name
        with pytest.raises(BackendUnavailable) as err:
            select(name, "attention_maps", attn, outputs=frozenset({"contract", "alpha"}))
        assert str(err.value) == (f"backend {name!r} cannot run attention_maps on this input; {name}: {name} does "
                                  "not produce the heads' attention weights alpha. "
                                  f"{name} does not produce contractions over the rows (contract=).")
        with pytest.raises(BackendUnavailable, match="does not produce contractions"):
            attribute(layer, methods=["attnresln_n"], backend=name, contract=torch.ones(1, 12), verify=0)
        # a name applies to the primitives it implements: the others go to the static rule
        result = attribute(layer, methods=["attnresln_n", "atbffresln"], backend=name, verify=0)
        assert result.backends["attention_maps"] == name and result.backends["ff_maps"] not in VARIANTS


@pytest.mark.parametrize("name", VARIANTS)
def test_attribute_through_each_variant_matches_the_reference(name):
    """Three attention-side methods at once (three Grams), rows= too, through kobattr.core."""
    exact = random_layer("llama", N=19, B=2, pad=3, window=6, dtype=torch.float64)
    methods = ["attn_n", "attnres_n", "attnresln_n"]
    ref = reference(exact, methods=methods)["maps"]
    rows = torch.tensor([18, 0, 9])
    for kwargs in ({}, dict(rows=rows)):
        result = attribute(exact.to(dtype=torch.float32), methods=methods, backend=name, verify=0, **kwargs)
        assert result.backends["attention_maps"] == name
        for m in methods:
            want = ref[m] if not kwargs else ref[m][:, rows]
            assert row_errors(result.maps[m].double(), want).max() <= 1e-5


def test_the_self_test_runs_each_variant_against_the_reference(monkeypatch):
    """One block structure with padding, and the GQA case (RoPE, causal, a window): the variants run each and
    pass (the other features: the oracle tests above)."""
    monkeypatch.setattr(selftest, "STRUCTURE_KINDS", {"pre": "gpt2"})
    monkeypatch.setattr(selftest, "FEATURES", tuple(f for f in selftest.FEATURES if f[0] == "padding"))
    report = selftest.run(names=VARIANTS)
    assert not report.failed and not report.unavailable, report.table()
    ran = {(o.implementation, o.case) for o in report.outcomes if o.skipped is None}
    cases = {case for case, _, _ in selftest._cases()}
    assert ran == {(name, case) for name in VARIANTS for case in cases}


def test_the_tuner_times_them_on_cuda_behind_its_gate():
    labels = [c.label for c in tuner.candidates("attention_maps", "cuda")]
    assert labels.index("triton") < labels.index("triton_streamed") < labels.index("triton_staged")
    assert {"triton_staged(scratch=float32)", "triton_staged(scratch=bfloat16)"} <= set(labels)
    assert not [c for c in tuner.candidates("attention_maps", "cpu") if c.backend in VARIANTS]
    assert not [c for p in ("ff_maps", "row_stats") for c in tuner.candidates(p, "cuda") if c.backend in VARIANTS]
    attn = attention_of(random_layer("bert", N=40, B=1, dtype=torch.float32))
    impls = {c.label: c.build() for c in tuner.candidates("attention_maps", "cuda") if c.backend in VARIANTS}
    layer = tuner._gate_layer(tuner.workload("attention_maps", attn), attn, None)
    verdicts = tuner._gate("attention_maps", impls, layer, torch.float32)
    assert verdicts == {"triton_streamed": None, "triton_staged": None, "triton_staged(scratch=float32)": None,
                        "triton_staged(scratch=bfloat16)": verdicts["triton_staged(scratch=bfloat16)"]}
    assert "over the tolerance" in verdicts["triton_staged(scratch=bfloat16)"]  # too coarse for a float32 model
    entry = tuner.tune("attention_maps", attn, pool=[tuner.Candidate(n) for n in VARIANTS], save=False,
                       outputs=frozenset({"contract"}))
    assert entry["winner"] is None and all("does not produce contractions" in why for why in entry["rejected"].values())


def test_benchmarks_hold_no_kernels():
    """benchmarks/ only measures: every Triton kernel is in kernels/, where dispatch can choose it."""
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    files = sorted(benchmarks.rglob("*.py"))
    assert files
    assert [str(f) for f in files if re.search(r"^\s*@triton\.jit", f.read_text(encoding="utf-8"), re.M)] == []
