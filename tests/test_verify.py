"""Spot checks: sampled rows of every returned map recomputed by the reference; a broken kernel is caught."""

import pytest
import torch
from random_layers import random_layer

from kobattr.backends.torch_backend import TorchBackend
from kobattr.core import attribute
from kobattr.verify import TOLERANCES, VerificationError, row_errors, sample_rows, tolerance


def _corrupt(monkeypatch, primitive, factor=1.01, row=None):
    """Make the torch implementation of ``primitive`` return slightly wrong numbers (all rows, or one)."""
    original = getattr(TorchBackend, primitive)

    def broken(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        out = result[0] if isinstance(result, tuple) else result
        target = out[:, :, :, 1] if row is None else out[:, :, row]
        target.mul_(factor)
        return result

    monkeypatch.setattr(TorchBackend, primitive, broken)


def test_spot_check_is_recorded_per_method_and_text():
    layer = random_layer("llama", N=12, pad=3, dtype=torch.float32)
    res = attribute(layer, methods="all", heads=True, backend="torch")
    assert set(res.spot_check) == set(res.methods)
    for m, err in res.spot_check.items():
        assert err.shape == (2,) and err.dtype == torch.float64
        assert 0 < err.max() < 1e-5, m  # float32 rounding is seen, and it is small
    assert attribute(layer, methods="all", backend="torch", verify=0).spot_check == {}


@pytest.mark.parametrize("primitive,method", [("attention_maps", "attnresln_n"), ("ff_maps", "atbffresln")])
@pytest.mark.parametrize("mode", ["full", "rows", "contract"])
def test_a_wrong_implementation_is_caught_and_named(monkeypatch, primitive, method, mode):
    layer = random_layer("bert", N=10, pad=2, dtype=torch.float32)
    _corrupt(monkeypatch, primitive)
    kwargs = {"full": {}, "rows": {"rows": [1, 4, 6]}, "contract": {"contract": torch.rand(3, 10)}}[mode]
    with pytest.raises(VerificationError, match=rf"{method} from implementation 'torch' \({primitive}\)"):
        attribute(layer, methods=[method], backend="torch", **kwargs)
    attribute(layer, methods=[method], backend="torch", verify=0, **kwargs)  # unchecked, it goes through


def test_one_wrong_row_is_caught_when_every_row_is_sampled(monkeypatch):
    layer = random_layer("gpt2", N=8, B=1, dtype=torch.float64)
    _corrupt(monkeypatch, "attention_maps", factor=1 + 1e-7, row=5)
    with pytest.raises(VerificationError, match=r"attn_n .* by (1.00e-07|9.9\de-08) .*tolerance for float64 is 1e-09"):
        attribute(layer, methods=["attn_n"], backend="torch", verify=8)


def test_wrong_head_maps_are_caught(monkeypatch):
    layer = random_layer("bert", N=6, dtype=torch.float32)
    original = TorchBackend.attention_maps

    def wrong_alpha(self, *args, **kwargs):
        out, alpha = original(self, *args, **kwargs)
        return out, None if alpha is None else alpha.roll(1, dims=-1)

    monkeypatch.setattr(TorchBackend, "attention_maps", wrong_alpha)
    with pytest.raises(VerificationError, match="attn_w"):
        attribute(layer, methods=["attn_w"], heads=True, backend="torch")


def test_sampling_is_seeded_and_prefers_real_tokens():
    valid = torch.tensor([True] * 5 + [False] * 5)
    candidates = torch.arange(10)
    a = sample_rows(candidates, valid, 3, seed=7)
    assert torch.equal(a, sample_rows(candidates, valid, 3, seed=7))
    assert len(a) == 3 and (a < 5).all()
    draws = {tuple(sample_rows(candidates, valid, 2, seed=s).tolist()) for s in range(20)}
    assert len(draws) > 3  # different seeds (layers, texts) look at different rows
    assert len(sample_rows(candidates, valid, 50, seed=0)) == 5


def test_row_error_definition():
    ref = torch.tensor([[1.0, -4.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    got = torch.tensor([[1.0, -3.0, 2.5], [0.0, 0.0, 0.0], [0.0, 1e-3, 0.0]])
    errors = row_errors(got, ref)
    assert errors[0].item() == pytest.approx(0.25)
    assert errors[1].item() == 0.0 and errors[2].item() == float("inf")


def test_tolerances():
    assert tolerance(torch.float32) == TOLERANCES["float32"] == 1e-4
    assert tolerance(torch.float32, tf32=True) == 5e-3
    assert tolerance(torch.float64) == 1e-9 and tolerance(torch.bfloat16) == 5e-2 and tolerance(torch.float16) == 2e-2


def test_analyze_checks_every_layer_and_text(monkeypatch):
    from test_models import tiny_model, token_batch

    from kobattr.api import analyze

    model, batch = tiny_model("llama"), token_batch("llama", [7, 4])
    res = analyze(model, batch, methods="all", backend="torch")
    assert set(res.spot_check) == set(res.methods)
    for err in res.spot_check.values():
        assert err.shape == (2, 2) and 0 < err.max() < 1e-5
    # full maps: no row_stats pass; "all" brings the peers' measures, which record their implementation too
    assert res.backends == [{"attention_maps": "torch", "ff_maps": "torch", "peers": "torch"}] * 2
    _corrupt(monkeypatch, "ff_maps")
    with pytest.raises(VerificationError, match=r"layer 0: spot check failed: atblnff"):
        analyze(model, batch, methods="all", backend="torch")


# ----------------------------------------------------------------------------- the precision the model computed in
def _family_model(family, dtype=torch.float64, **changes):
    from test_models import tiny_model

    return tiny_model(family, attn_implementation="eager", **changes).to(dtype)


FLOAT64_FAMILIES = [(f, {}) for f in __import__("test_models").TINY] + [("gpt_neox", {"use_parallel_residual": False})]


@pytest.mark.parametrize("family,changes", FLOAT64_FAMILIES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={w}" for k, w in v.items()))
def test_float64_eager_models_pass_the_default_spot_check(family, changes):
    """Hugging Face's eager attention runs its softmax in float32 inside a float64 model (Llama, Gemma 2/3, OLMo 2,
    GPT-NeoX, ...), so the recorded head outputs are ~1e-7 from a float64 recomputation: the maps are checked against
    the reference computed with the model's attention output, the head outputs against a float32 softmax."""
    from test_models import token_batch

    from kobattr.api import analyze

    model = _family_model(family, **changes)
    res = analyze(model, token_batch(family, [7, 5]), methods="all", heads=True, backend="torch")  # verify=2
    for m, err in res.spot_check.items():
        assert err.max() < 1e-13, m  # float64 agreement, not a loosened tolerance


@pytest.mark.parametrize("family", ["bart", "marian", "m2m_100", "mbart"])
def test_float64_eager_translation_models_pass_the_default_spot_check(family):
    """The decoder layers (self-attention, now with attnres_w and, pre-LN, attnresln_n; cross maps) and the encoder."""
    from test_seq2seq import pair_batch, tiny_seq2seq

    from kobattr.api import analyze

    model = tiny_seq2seq(family, attn_implementation="eager").double()
    res = analyze(model, pair_batch(), methods="all", heads=True, backend="torch")
    assert {"attnres_w", "attnresln_n"} <= set(res.spot_check)
    for part in (res, res.encoder):
        for m, err in part.spot_check.items():
            assert err.max() < 1e-13, m


@pytest.mark.parametrize("family", ["llama", "roberta"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_hold_their_head_outputs_to_their_own_dtype(family, dtype):
    """The layer is computed and checked in float32, but its recorded head outputs carry the model's bfloat16 /
    float16 rounding (~1e-3), which only that dtype's tolerance accepts."""
    from test_models import token_batch

    from kobattr.api import analyze

    res = analyze(_family_model(family, dtype), token_batch(family, [7, 5]), backend="torch")  # the default methods
    assert max(e.max() for e in res.spot_check.values()) < 1e-5


def _plant(monkeypatch, method_index, factor):
    """Scale one map (the method_index-th of the torch attention primitive's output) by ``factor``."""
    original = TorchBackend.attention_maps

    def planted(self, *args, **kwargs):
        out, alpha = original(self, *args, **kwargs)
        out[:, method_index] *= factor
        return out, alpha

    monkeypatch.setattr(TorchBackend, "attention_maps", planted)


@pytest.mark.parametrize("family", ["gemma2", "olmo2", "gpt_neox"])
def test_a_planted_1e6_error_in_one_map_of_a_float64_model_is_caught(monkeypatch, family):
    from test_models import token_batch

    from kobattr.api import analyze

    model = _family_model(family)
    batch = token_batch(family, [7, 5])
    analyze(model, batch, methods=["attn_w", "attnres_n"], backend="torch")
    _plant(monkeypatch, 1, 1 + 1e-6)  # attnres_n only
    with pytest.raises(VerificationError, match=r"layer 0: .*attnres_n .* by (1.00e-06|9.9\de-07) .*float64 is 1e-09"):
        analyze(model, batch, methods=["attn_w", "attnres_n"], backend="torch")


def test_a_planted_error_in_one_map_of_a_float32_model_is_caught(monkeypatch):
    """float32 maps carry their own rounding of up to ~1e-6 (relative) against the float32 reference, so the float32
    tolerance (1e-4) is what a planted error must exceed; float64 (above) takes 1e-6."""
    from test_models import token_batch

    from kobattr.api import analyze

    model = _family_model("gemma2", torch.float32)
    batch = token_batch("gemma2", [7, 5])
    res = analyze(model, batch, methods=["attn_w", "attnres_n"], backend="torch")
    assert 0 < res.spot_check["attnres_n"].max() < 1e-5
    _plant(monkeypatch, 1, 1 + 2e-4)
    with pytest.raises(VerificationError, match=r"attnres_n .* by 2.0\de-04 .*float32 is 1e-04"):
        analyze(model, batch, methods=["attn_w", "attnres_n"], backend="torch")


def _with_head_outputs(layer, softmax_dtype):
    """The layer carrying sum_j alpha^h_ij v_j with alpha's softmax computed in ``softmax_dtype`` (as HF's eager
    attention: softmax(scores, dtype=torch.float32) inside a float64 model)."""
    import dataclasses

    from kobattr.backends.torch_backend import block_scores
    from kobattr.core import attention_of

    scores, _ = block_scores(attention_of(layer), torch.arange(layer.seq_len), layer.q.dtype)
    alpha = torch.softmax(scores, -1, dtype=softmax_dtype).to(layer.q.dtype).nan_to_num(0.0)
    v = layer.v.repeat_interleave(layer.n_heads // layer.n_kv_heads, 1)
    return dataclasses.replace(layer, head_outputs=alpha @ v)


@pytest.mark.parametrize("kind", ["bert", "llama", "gemma2", "olmo2", "pythia"])
def test_the_head_outputs_are_held_to_the_precision_of_the_models_softmax(kind):
    import dataclasses

    from kobattr.layer import cap_logits
    from kobattr.verify import head_output_check

    layer = random_layer(kind, N=9, pad=2)
    rows = torch.arange(7)
    for softmax_dtype in (torch.float64, torch.float32):
        given = _with_head_outputs(layer, softmax_dtype)
        one = given.select(0)
        k = one.k.repeat_interleave(one.n_heads // one.n_kv_heads, 1)
        scores = cap_logits(one.q[:, :, rows] @ k.transpose(-1, -2) * one.softmax_scale, one.softcap)
        scores = scores.masked_fill(~one.visible(rows)[:, None], float("-inf"))
        err, detected = head_output_check(one.head_outputs[:, :, rows], scores, one.v, torch.float64)
        assert detected == softmax_dtype and (err < 1e-14 if softmax_dtype == torch.float64 else 1e-9 < err < 1e-6)
        attribute(given, methods="all", heads=True, backend="torch", verify=9)  # every real row sampled
        # a 1e-5 error on one head output row: explained by no softmax precision, so held to float64's tolerance
        wrong = given.head_outputs.clone()
        wrong[0, 1, 3] *= 1 + 1e-5
        with pytest.raises(VerificationError, match=r"recorded head outputs .* by \d.\d\de-0[56] .*float64"):
            attribute(dataclasses.replace(given, head_outputs=wrong), methods=["attn_w"], backend="torch", verify=9)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "gemma2", "olmo2", "pythia"])
def test_the_reference_computed_the_models_way_equals_the_implementation(kind):
    """With head outputs from a float32 softmax, the implementation's maps (every method, FF scopes included) equal the
    reference given the same attention output to float64 accuracy, and differ from the plain reference by ~1e-8
    (where a norm reads y = x + Attn: not in a parallel layer, whose maps never read the whole attention output)."""
    from kobattr.methods import REGISTRY, check_methods
    from kobattr.reference import materialise

    layer = _with_head_outputs(random_layer(kind, N=8, pad=2), torch.float32)
    res = attribute(layer, methods="all", backend="torch", verify=0)
    methods = check_methods("all", layer.structure)
    model_way = torch.einsum("bhnd,hde->bne", layer.head_outputs, layer.w_o)
    ref = materialise(layer, methods, "exact", 20, None, attention_output=model_way)
    plain = materialise(layer, methods, "exact", 20, None)
    for m in methods:
        assert row_errors(res.maps[m], ref["maps"][m]).max() < 1e-13, m
    attention_side = [m for m in methods if REGISTRY[m].paper.startswith("kobayashi")]  # the peers' measures aside
    differ = max(row_errors(res.maps[m], plain["maps"][m]).max() for m in attention_side)
    assert differ < 1e-13 if layer.structure == "parallel" else differ > 1e-9


def test_the_cross_attention_check_follows_the_models_softmax_precision():
    """The cross maps of a float64 block whose head outputs come from a float32 softmax pass the default check at
    float64 accuracy; head outputs no softmax precision explains are caught."""
    import dataclasses

    from test_seq2seq import decoder_layers, pair_batch, tiny_seq2seq

    from kobattr.seq2seq import attribute_cross

    cross = decoder_layers(tiny_seq2seq("m2m_100").double(), pair_batch(), layers=[1])[1].cross
    v = cross.v.repeat_interleave(cross.n_heads // cross.n_kv_heads, 1)
    alpha = torch.softmax(cross.scores(), -1, dtype=torch.float32).double().nan_to_num(0.0)
    given = dataclasses.replace(cross, head_outputs=torch.where(cross.targets[:, None, :, None], alpha @ v, 0.0))
    res = attribute_cross(given, verify=7)
    assert max(e.max() for e in res.spot_check.values()) < 1e-13
    wrong = given.head_outputs.clone()
    wrong[0, 2, 3] *= 1 + 1e-5
    with pytest.raises(VerificationError, match=r"recorded head outputs .* of the cross-attention; .*float64"):
        attribute_cross(dataclasses.replace(given, head_outputs=wrong), verify=7)
