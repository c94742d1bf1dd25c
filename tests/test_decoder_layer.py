"""The whole decoder layer as one map (spec section 7): target-prefix and source columns through every norm, the FFN
(IG) and the last residual, on captured decoder layers of tiny random Marian, BART, M2M-100 and mBART models and on a
hand-built layer with grouped heads, RMSNorm and a gated FFN."""

import dataclasses

import pytest
import torch
from test_seq2seq import (TINY, assert_rows_close, decoder_layers, model_states, pair_batch, real_cross_states,
                          tiny_seq2seq)

from kobattr.decoder_layer import (SCOPES, DecoderLayerAttribution, attribute_decoder_layer,
                                   decoder_layer_reference)
from kobattr.ig import ffn_coefficients
from kobattr.layer import FeedForward, Layer, LayerInputError, Norm
from kobattr.reference import reference
from kobattr.seq2seq import CrossAttention, DecoderLayer, cross_reference

T, S = 7, 9  # padded target and source lengths of pair_batch() (real: 7, 4 and 9, 6)


def tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def assert_maps_close(got, expected, tol, what=""):
    """got and expected agree within tol relative to the largest value of expected (NaN where both are NaN)."""
    got, expected = got.double(), expected.double()
    both_nan = got.isnan() & expected.isnan()
    assert not (got.isnan() ^ expected.isnan()).any(), what
    diff = (got - expected).abs()[~both_nan]
    scale = expected.abs()[~both_nan].max().clamp_min(1e-300)
    assert diff.max() <= tol * scale, f"{what}: {diff.max() / scale:.2e}"


def model_state_of_scope(seen, index, placement):
    """{scope: the model's own hidden state (from hooks independent of capture) that the scope's parts sum to}."""
    p, y, g = real_cross_states(seen, index, placement)
    states = dict(self=p, cross=y, ffn_in=g, out=seen[index, "out"])
    if placement == "post":  # LN_f reads x2 + FF(x2); FF(x2) = its input minus the residual x2
        states["ffn"] = seen[index, "final_layer_norm.in"] - g
        states["ffn_res"] = seen[index, "final_layer_norm.in"]
    else:
        states["ffn"] = seen[index, "out"] - y
    return states


# ----------------------------------------------------------------------------- captured layers
@pytest.mark.parametrize("family,dtype", [(f, d) for f in TINY for d in (torch.float64, torch.float32)])
def test_whole_layer_is_complete_and_equals_the_reference(family, dtype):
    model = tiny_seq2seq(family).to(dtype)
    inputs = pair_batch()
    placement = TINY[family][1]
    seen, _ = model_states(model, inputs)
    valid_t = inputs["decoder_attention_mask"].bool()
    valid_s = inputs["attention_mask"].bool()
    tol = tolerance(dtype)
    for index, layer in decoder_layers(model, inputs).items():
        ref = decoder_layer_reference(layer)  # float64 from the captured tensors
        res = attribute_decoder_layer(layer)
        assert isinstance(res, DecoderLayerAttribution) and res.scopes == ref["scopes"] == SCOPES[placement]
        assert res.map.shape == (2, T, T + S) and res.map.dtype == dtype and res.rows is None

        # completeness of the reference: every scope's parts plus bias equal the model's own hidden state
        for scope, real in model_state_of_scope(seen, index, placement).items():
            assert_rows_close(ref["total"][scope], real.double(), valid_t, tol)
        # and of the blocked implementation, against capture's recorded states (and its own forward elsewhere)
        for scope in res.scopes:
            assert res.completeness[scope].max() < 10 * tol, (scope, res.completeness[scope].max())
        assert res.model_error.max() < 10 * tol

        # the blocked implementation equals the reference, every scope
        for scope in res.scopes:
            assert_maps_close(res.maps[scope], ref["maps"][scope], tol, f"{family} {index} {scope} map")
            assert_maps_close(res.ratios[scope], ref["ratios"][scope], 10 * tol, f"{scope} ratio")
            assert_maps_close(res.bias_norms[scope], ref["bias"][scope].norm(dim=-1), tol, f"{scope} bias")

        # padding: padding rows are 0 (ratio NaN); padding target columns, future target columns and padding
        # source columns are 0
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        seen_t = valid_t[:, :, None] & valid_t[:, None, :] & causal
        seen_s = valid_t[:, :, None] & valid_s[:, None, :]
        for maps, ratios in ((res.maps, res.ratios), (ref["maps"], ref["ratios"])):
            for scope in res.scopes:
                m = maps[scope]
                assert (m[..., :T][~seen_t] == 0).all() and (m[..., T:][~seen_s] == 0).all(), scope
                assert ratios[scope][~valid_t].isnan().all() and not ratios[scope][valid_t].isnan().any()
        assert (res.map[..., :T][seen_t] > 0).all() and (res.map[..., T:][seen_s] > 0).all()
        assert (res.target_columns("self") == res.maps["self"][..., :T]).all()
        assert (res.source_columns("self") == 0).all()  # no source token has reached the stream yet
        assert (ref["total"]["out"][~valid_t] == 0).all() and (res.bias_norm[~valid_t] == 0).all()

        # the source columns sum (over j) to the cross block's contribution sum_j c_ij = CrossAttn - b_Oc, as it is
        # in the stream (scope cross) and after the norm that makes the FFN input (scope ffn_in: g_i, statistic y_i)
        p, y, _ = (t.double() for t in real_cross_states(seen, index, placement))
        contribution = seen[index, "cross"].double() - layer.cross.out_bias.double()
        norm = _double_norm(layer.cross.norm)
        sources = {scope: ref["vectors"][scope][:, :, T:].sum(2) for scope in ("cross", "ffn_in")}
        assert_rows_close(sources["cross"], contribution, valid_t, tol)
        assert_rows_close(sources["ffn_in"], norm.split(contribution) * norm.inv_std(y)[..., None], valid_t, tol)
        # the target columns carry the stream entering the cross block, p_i (whole, with the self block's bias)
        assert_rows_close(ref["vectors"]["self"][:, :, :T].sum(2) + ref["bias"]["self"], p, valid_t, tol)

        # the first scopes are maps kobattr already has: the self block (attnresln_n post, attnres_n pre) on the
        # target columns, cross_attn_n and the source columns of cross_attnresln_n (g = LN_c post, LN_f pre)
        self_method = "attnresln_n" if placement == "post" else "attnres_n"
        expected = reference(layer.self_attn, methods=[self_method])["maps"][self_method]
        assert_maps_close(res.target_columns("self"), expected, tol, "self scope vs " + self_method)
        cross = cross_reference(layer.cross, ["cross_attn_n", "cross_attnresln_n"])["maps"]
        assert_maps_close(res.source_columns("cross"), cross["cross_attn_n"], tol, "cross scope vs cross_attn_n")
        assert_maps_close(res.source_columns("ffn_in"), cross["cross_attnresln_n"][..., :S], tol,
                          "ffn_in scope vs cross_attnresln_n")


def _double_norm(norm):
    return dataclasses.replace(norm, weight=None if norm.weight is None else norm.weight.double(),
                               bias=None if norm.bias is None else norm.bias.double())


@pytest.mark.parametrize("family", ["bart", "m2m_100"])
def test_rows_and_row_blocks(family):
    layer = decoder_layers(tiny_seq2seq(family).double(), pair_batch(), layers=[1])[1]
    full = attribute_decoder_layer(layer)
    rows = [5, 0, 3]
    some = attribute_decoder_layer(layer, rows=rows)
    one_by_one = attribute_decoder_layer(layer, budget=1)  # one target row per block
    ref_rows = decoder_layer_reference(layer, rows=torch.tensor(rows))
    assert some.rows.tolist() == rows and some.map.shape == (2, 3, T + S)
    for scope in full.scopes:
        torch.testing.assert_close(some.maps[scope], full.maps[scope][:, rows], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(some.ratios[scope], full.ratios[scope][:, rows], equal_nan=True)
        torch.testing.assert_close(some.completeness[scope], full.completeness[scope][:, rows], rtol=1e-6, atol=1e-15)
        torch.testing.assert_close(one_by_one.maps[scope], full.maps[scope], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(one_by_one.ratios[scope], full.ratios[scope], equal_nan=True)
        assert_maps_close(ref_rows["maps"][scope], full.maps[scope][:, rows], 1e-10, scope)
    # row 5 of the second pair is padding (4 real target tokens): 0 and NaN there, on its own too
    assert (some.map[1, 0] == 0).all() and some.ratio[1, 0].isnan()
    with pytest.raises(LayerInputError, match="rows must be query indices"):
        attribute_decoder_layer(layer, rows=[T])
    with pytest.raises(LayerInputError, match="ig must be one of"):
        attribute_decoder_layer(layer, ig="gradient")


# ----------------------------------------------------------------------------- plausible bugs change the map
def _split(norm, vec, bias, per_part=False):
    whole = vec.sum(2) + bias
    inv = norm.inv_std(whole)[..., None]
    bias_out = norm.split(bias) * inv + norm.bias_vector(vec.shape[-1], whole)
    if per_part:  # bug: each part normalised by its own statistic
        return norm.split(vec) * norm.inv_std(vec)[..., None], bias_out
    return norm.split(vec) * inv[..., None], bias_out


def _ffn(ffn, vec, bias, coef_from):
    coef_in, _ = ffn_coefficients(ffn, coef_from)  # the tiny models' FFNs are not gated
    shares = ((vec @ ffn.w_in) * coef_in[:, :, None]) @ ffn.w_out
    return shares, ((bias @ ffn.w_in + ffn.b_in) * coef_in) @ ffn.w_out + ffn.b_out


def chain_after_cross(layer, vec, bias, ffn_on_stream_parts=False, per_part_statistic=False):
    """(out vectors, out bias) from the parts of y_i (scope cross), written again here; the flags plant bugs."""
    post = layer.placement == "post"
    g = layer.ln_cross if post else layer.ln_ffn
    mid, mid_bias = _split(g, vec, bias, per_part_statistic)
    real_mid = g(vec.sum(2) + bias)  # the FFN's real input
    if ffn_on_stream_parts:  # bug: the FFN split on the parts before the norm (the norm's split and the FFN swapped)
        ff, ff_bias = _ffn(layer.ffn, vec, bias, real_mid)
    else:
        ff, ff_bias = _ffn(layer.ffn, mid, mid_bias, real_mid)
    if post:
        return _split(layer.ln_ffn, mid + ff, mid_bias + ff_bias)
    return vec + ff, bias + ff_bias


@pytest.mark.parametrize("family", ["bart", "m2m_100"])
def test_plausible_bugs_change_the_map(family):
    """Each mutation of the chain changes the map; those that lose part of the layer output also fail completeness.
    The first is invisible to completeness: only the map (compared with the reference) shows it."""
    model = tiny_seq2seq(family).double()
    inputs = pair_batch()
    valid_t = inputs["decoder_attention_mask"].bool()
    seen, _ = model_states(model, inputs)
    layer = decoder_layers(model, inputs, layers=[1])[1].to(torch.float64)
    ref = decoder_layer_reference(layer)
    out = seen[1, "out"].double()
    vec, bias = ref["vectors"]["cross"], ref["bias"]["cross"]

    def complete(total):
        return ((total - out).norm(dim=-1) / out.norm(dim=-1))[valid_t].max() < 1e-10

    def differs(vectors):
        diff = (vectors.norm(dim=-1) - ref["map"]).abs()[valid_t].max()
        return diff > 1e-2 * ref["map"].abs().max()

    # written again here without bugs: the reference exactly
    same, same_bias = chain_after_cross(layer, vec, bias)
    assert_maps_close(same.norm(dim=-1) * valid_t[..., None], ref["map"], 1e-12, "unmutated")
    assert complete(same.sum(2) + same_bias)

    # the cross block's residual p_i not decomposed over the target prefix (wholly in column i): complete, but wrong
    rows = torch.arange(T)
    whole_p = vec.clone()
    whole_p[:, :, :T] = 0
    whole_p[:, rows, rows] = ref["vectors"]["self"][:, :, :T].sum(2) * valid_t[..., None]
    mutated, mutated_bias = chain_after_cross(layer, whole_p, bias)
    assert complete(mutated.sum(2) + mutated_bias) and differs(mutated)

    # the residual of the cross block dropped (only the source parts and b_Oc reach the norm)
    dropped = vec.clone()
    dropped[:, :, :T] = 0
    mutated, mutated_bias = chain_after_cross(layer, dropped, layer.cross.out_bias.double().expand_as(bias))
    assert not complete(mutated.sum(2) + mutated_bias) and differs(mutated)

    # the FFN split on the parts of y before the norm's split (LN_c / LN_f and the FFN input split swapped)
    mutated, mutated_bias = chain_after_cross(layer, vec, bias, ffn_on_stream_parts=True)
    assert not complete(mutated.sum(2) + mutated_bias) and differs(mutated)

    # each part normalised with its own statistic instead of the row's whole input
    mutated, mutated_bias = chain_after_cross(layer, vec, bias, per_part_statistic=True)
    assert not complete(mutated.sum(2) + mutated_bias) and differs(mutated)

    # the blocked implementation is the reference, so it would show any of these as a difference
    assert_maps_close(attribute_decoder_layer(layer).map, ref["map"], 1e-10, "blocked")


# ----------------------------------------------------------------------------- a hand-built layer
def random_decoder_layer(placement, seed=5):
    """A consistent decoder layer built from weights: 4 query heads on 2 key/value heads in both attentions, LayerNorm
    LN_s, RMSNorm LN_c and LN_f, a SwiGLU FFN with biases, target and source padding; no recorded states."""
    g = torch.Generator().manual_seed(seed)
    B, T_, S_, D, H, KV, Dh, F = 2, 6, 5, 16, 4, 2, 4, 24
    rand = lambda *shape, s=1.0: s * torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    target_valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    source_valid = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    ln_s = Norm("layernorm", weight=1 + rand(D, s=0.2), bias=rand(D, s=0.2))
    ln_c = Norm("rmsnorm", weight=1 + rand(D, s=0.2), eps=1e-6)
    ln_f = Norm("rmsnorm", weight=1 + rand(D, s=0.2), eps=1e-6)
    ffn = FeedForward("swiglu", w_in=rand(D, F, s=0.3), w_out=rand(F, D, s=0.3), b_in=rand(F, s=0.2),
                      b_out=rand(D, s=0.2), w_gate=rand(D, F, s=0.3), b_gate=rand(F, s=0.2))
    x = rand(B, T_, D)
    self_attn = Layer.from_weights(x, rand(D, H * Dh, s=0.4), rand(D, KV * Dh, s=0.4), rand(D, KV * Dh, s=0.4),
                                   rand(H * Dh, D, s=0.4), n_heads=H, n_kv_heads=KV, b_v=rand(KV * Dh, s=0.2),
                                   b_o=rand(D, s=0.2), ln1=ln_s, ln2=ln_f if placement == "post" else ln_c, ffn=ffn,
                                   placement=placement, causal=True, key_valid=target_valid)
    self_y = self_attn.forward()["y"]
    p = ln_s(self_y) if placement == "post" else self_y
    queries = (p if placement == "post" else ln_c(p)) @ rand(D, H * Dh, s=0.4)
    e = rand(B, S_, D)
    heads = lambda t, n: t.view(B, -1, n, Dh).transpose(1, 2)  # noqa: E731
    cross = CrossAttention(q=heads(queries, H), k=heads(e @ rand(D, KV * Dh, s=0.4), KV),
                           v=heads(e @ rand(D, KV * Dh, s=0.4) + rand(KV * Dh, s=0.2), KV), w_o=rand(H, Dh, D, s=0.4),
                           p=p, norm=ln_c if placement == "post" else ln_f, b_o=rand(D, s=0.2),
                           source_valid=source_valid, target_valid=target_valid)
    return DecoderLayer(self_attn=self_attn, cross=cross, ffn=ffn, ln_self=ln_s, ln_cross=ln_c, ln_ffn=ln_f,
                        placement=placement).validate()


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_a_hand_built_layer_with_grouped_heads_rmsnorm_and_a_gated_ffn(placement):
    layer = random_decoder_layer(placement)
    valid_t = layer.self_attn.valid
    forward = layer.forward()
    ref = decoder_layer_reference(layer)
    res = attribute_decoder_layer(layer, budget=500)  # a few rows per block
    for scope, state in (("self", "p"), ("cross", "y"), ("ffn_in", "mid"), ("ffn", "ffn_out"), ("out", "out")):
        assert_rows_close(ref["total"][scope], forward[state], valid_t, 1e-12)
    for scope in res.scopes:
        assert_maps_close(res.maps[scope], ref["maps"][scope], 1e-12, scope)
        assert_maps_close(res.ratios[scope], ref["ratios"][scope], 1e-10, scope)
        assert res.completeness[scope].max() < 1e-12
    assert (res.model_error == 0).all()  # nothing recorded to compare with
    # float32, one batch element alone
    one = attribute_decoder_layer(layer.select(1).to(torch.float32))
    assert one.map.dtype == torch.float32
    torch.testing.assert_close(one.map[0], res.map[1].float(), rtol=1e-5, atol=1e-5 * res.map[1].max().item())
    # the Riemann option: the same in both implementations, not the exact split, no longer exactly complete
    riemann = attribute_decoder_layer(layer, ig="riemann", ig_steps=10)
    ref_riemann = decoder_layer_reference(layer, ig="riemann", ig_steps=10)
    assert_maps_close(riemann.map, ref_riemann["map"], 1e-12, "riemann")
    assert (riemann.map - res.map).abs().max() > 1e-4 * res.map.max()
    assert riemann.completeness["ffn"].max() > 1e-4
