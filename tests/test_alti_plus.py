"""ALTI+ of encoder-decoder models (spec section 10; issue 26): ALTI of the decoder's self-attention and of its cross
block with the residual as one more part, against the materialising reference, complete against the model's own
states, and the source/target rollout through analyze() against the authors' loop, on post-LN (Marian, BART) and
pre-LN (M2M-100, mBART) tiny models with padded pairs."""

import pytest
import torch
from test_seq2seq import TINY, decoder_layers, model_states, pair_batch, real_cross_states, tiny_seq2seq

import kobattr
from kobattr.layer import LayerInputError
from kobattr.models import capture
from kobattr.reference import alti_plus_reference, cross_alti_reference, reference
from kobattr.result import Seq2SeqAttribution
from kobattr.seq2seq import attribute_cross, attribute_decoder, cross_reference

FAMILIES = ["marian", "bart", "m2m_100", "mbart"]


def rows_close(got, expected, valid, tol):
    """Every real row of ``got`` within tol of ``expected``, relative to the largest entry of that row."""
    g, e = got[valid].double(), expected[valid].double()
    scale = e.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert ((g - e).abs() / scale).max() <= tol


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_alti_equals_the_reference_and_its_parts_sum_to_the_models_state(family):
    model = tiny_seq2seq(family).double()
    inputs = pair_batch()  # padded sources and targets
    placement = TINY[family][1]
    seen, _ = model_states(model, inputs)
    valid = inputs["decoder_attention_mask"].bool()
    source = inputs["attention_mask"].bool()
    for index, layer in decoder_layers(model, inputs).items():
        res = attribute_decoder(layer, methods=["alti", "cross_alti"], budget=1 << 8)  # many small tiles
        ref = cross_alti_reference(layer.cross, placement)
        got = res.maps["cross_alti"]
        assert got.shape == (2, 7, 10)
        rows_close(got, ref["map"], valid, 1e-12)
        assert (got[~valid] == 0).all() and (got[..., :9][~(valid[:, :, None] & source[:, None])] == 0).all()
        torch.testing.assert_close(got.sum(-1)[valid], torch.ones(int(valid.sum()), dtype=got.dtype))
        # the residual column is a real part: the target position keeps something of itself
        assert (got[..., -1][valid] > 0).all()
        # parts + bias sum to the state ALTI compares with, the model's own: LN_c(y) post-LN, y pre-LN
        p, y, g = real_cross_states(seen, index, placement)
        state = g if placement == "post" else y
        rows_close(ref["total"], state.double(), valid, 1e-12)
        assert res.cross.completeness["cross_alti"].max() < 1e-12
        torch.testing.assert_close(res.cross.bias_norms["cross_alti"], ref["bias"].norm(dim=-1) * valid)
        torch.testing.assert_close(res.cross.ratios["cross_alti"][valid], 1 - got[..., -1][valid])
        assert res.cross.ratios["cross_alti"][~valid].isnan().all()
        assert res.cross.spot_check["cross_alti"].max() < 1e-12
        # the self-attention block: ALTI of the layer's self-attention, complete against the model's p (post-LN: the
        # LN_s output) or x + SelfAttn (pre-LN: the stream entering the cross block)
        self_ref = reference(layer.self_attn, methods=["alti"])
        rows_close(res.maps["alti"], self_ref["maps"]["alti"], valid, 1e-12)
        rows_close(self_ref["total"]["alti"], p.double(), valid, 1e-12)
        assert res.self_attn.completeness["alti"].max() < 1e-12


@pytest.mark.parametrize("family", ["marian", "m2m_100"])
def test_cross_alti_in_float32_stays_near_the_float64_reference(family):
    model = tiny_seq2seq(family)
    inputs = pair_batch()
    valid = inputs["decoder_attention_mask"].bool()
    for layer in decoder_layers(model, inputs).values():
        got = attribute_cross(layer.cross, "cross_alti", placement=TINY[family][1]).maps["cross_alti"]
        assert got.dtype == torch.float32
        rows_close(got, cross_alti_reference(layer.cross, TINY[family][1])["map"], valid, 1e-5)


def encoder_alti_maps(model, inputs):
    """(Le, B, S, S) the reference ALTI map of every encoder layer, from the encoder's captured layers."""
    maps = {}
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    capture(model, batch, lambda i, layer: maps.__setitem__(i, reference(layer, methods=["alti"])["maps"]["alti"]))
    return torch.stack([maps[i] for i in sorted(maps)])


@pytest.mark.parametrize("family", ["marian", "m2m_100"])
def test_alti_plus_through_analyze_equals_the_authors_rollout_of_reference_maps(family, tmp_path):
    model = tiny_seq2seq(family).double()
    inputs = pair_batch()
    res = kobattr.analyze(model, inputs, methods=["alti_plus"], verify=1)
    assert res.methods == ("alti", "cross_alti", "alti_plus") and "alti_rollout" in res.encoder.methods
    placement = TINY[family][1]
    layers = decoder_layers(model, inputs)
    self_maps = torch.stack([reference(layers[i].self_attn, methods=["alti"])["maps"]["alti"] for i in sorted(layers)])
    cross_maps = torch.stack([cross_alti_reference(layers[i].cross, placement)["map"] for i in sorted(layers)])
    expected = alti_plus_reference(encoder_alti_maps(model, inputs), self_maps, cross_maps)
    got = res.maps["alti_plus"]
    valid = inputs["decoder_attention_mask"].bool()
    T = valid.shape[1]
    assert got.shape == (2, 2, T, T + 9)
    for li in range(2):
        rows_close(got[li], expected[li], valid, 1e-12)
        torch.testing.assert_close(got[li].sum(-1)[valid], torch.ones(int(valid.sum()), dtype=got.dtype))
    padded_source = ~inputs["attention_mask"].bool()[None, :, None, :].expand(2, 2, T, 9)  # (L, B, T, S)
    assert (got[:, ~valid] == 0).all() and (got[..., T:][padded_source] == 0).all()
    assert res.ratios["alti_plus"][:, ~valid].isnan().all()
    # a padded pair equals that pair alone
    s, t = int(inputs["attention_mask"][1].sum()), int(valid[1].sum())
    alone = kobattr.analyze(model, {k: v[1:, :s] if k in ("input_ids", "attention_mask") else v[1:, :t]
                                    for k, v in inputs.items()}, methods=["alti_plus"], verify=0)
    cols = list(range(t)) + [T + j for j in range(s)]
    torch.testing.assert_close(got[:, 1, :t][..., cols], alone.maps["alti_plus"][:, 0], rtol=1e-10, atol=1e-12)
    # it saves and loads like every decoder method
    loaded = Seq2SeqAttribution.load(res.save(tmp_path / "plus"))
    assert torch.equal(loaded.maps["alti_plus"], got) and torch.equal(loaded.maps["cross_alti"], res.maps["cross_alti"])


def test_what_alti_plus_cannot_do_is_a_sentence():
    model = tiny_seq2seq("bart")
    inputs = pair_batch()
    layer = decoder_layers(model, inputs, layers=[0])[0]
    with pytest.raises(LayerInputError, match="pass placement="):
        attribute_cross(layer.cross, "cross_alti")
    with pytest.raises(LayerInputError, match="placement"):
        cross_reference(layer.cross, "cross_alti", placement="middle")
    with pytest.raises(LayerInputError, match="encoder's alti_rollout"):
        kobattr.analyze(model, inputs, methods=["alti_plus"], encoder_methods=False)
    deeper = tiny_seq2seq("bart", decoder_layers=3)
    with pytest.raises(LayerInputError, match="consecutive decoder layers"):
        kobattr.analyze(deeper, inputs, methods=["alti_plus"], layers=[0, 2])
    # the defaults stay the Kobayashi maps; the peers come by name
    assert "alti" not in kobattr.analyze(model, inputs, encoder_methods=False, verify=0).methods
