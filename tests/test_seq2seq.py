"""Encoder-decoder models (issue 12, first part): encoder capture and analyze() on the encoder, decoder capture with
both attention calls, and the cross maps of spec section 7, on tiny random Marian, BART, M2M-100 and mBART models."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from test_models import assert_layers_reproduce_the_model, collect, token_batch
from transformers import (AutoModel, AutoModelForSeq2SeqLM, BartConfig, M2M100Config, MarianConfig, MBartConfig,
                          T5Config)

import kobattr
from kobattr.layer import LayerInputError
from kobattr.models import (CaptureError, UnsupportedModelError, capture_decoder, get_adapter,
                            get_decoder_adapter)
from kobattr.models.recording import _AttentionCall
from kobattr.models.seq2seq import _check_cross_mask
from kobattr.reference import reference
from kobattr.result import decoder_map_width
from kobattr.seq2seq import (CROSS_METHODS, DECODER_SELF_METHODS, attribute_cross, attribute_decoder,
                             check_decoder_methods, cross_reference)

DIMS = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=100, max_position_embeddings=64, init_std=0.1,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
TINY = {  # family -> (config, placement, FFN activation)
    "bart": (lambda: BartConfig(**DIMS), "post", "gelu"),
    # Marian as the Helsinki-NLP checkpoints: swish (silu) FFN, sqrt(d_model) embedding scale, sinusoidal positions
    "marian": (lambda: MarianConfig(**DIMS, activation_function="swish", scale_embedding=True), "post", "silu"),
    "m2m_100": (lambda: M2M100Config(**DIMS), "pre", "relu"),  # relu, scale_embedding=True by default
    "mbart": (lambda: MBartConfig(**DIMS), "pre", "gelu"),
}
FAMILIES = list(TINY)
SOURCE, TARGET = [9, 6], [7, 4]  # lengths of the padded pairs


def tiny_seq2seq(family, attn_implementation="sdpa", auto=AutoModel, **changes):
    """A tiny random encoder-decoder model with random 1-d parameters (norm weights and every bias)."""
    torch.manual_seed(0)
    config = TINY[family][0]()
    for key, value in changes.items():
        setattr(config, key, value)
    model = auto.from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def pair_batch(source=SOURCE, target=TARGET):
    """Random source ids and target ids (the target as the decoder reads it), both padded on the right with the pad id
    1; real tokens avoid the special ids 0-2 (M2M-100 counts positions over the tokens that are not padding)."""
    generator = torch.Generator().manual_seed(2)

    def ids(lengths):
        batch = torch.ones(len(lengths), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(batch)
        for row, length in enumerate(lengths):
            batch[row, :length] = torch.randint(3, 100, (length,), generator=generator)
            mask[row, :length] = 1
        return batch, mask

    (input_ids, attention_mask), (decoder_input_ids, decoder_attention_mask) = ids(source), ids(target)
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask)


def decoder_layers(model, inputs, layers=None):
    captured = {}
    capture_decoder(model, inputs, lambda index, layer: captured.__setitem__(index, layer), layers=layers)
    return captured


def model_states(model, inputs):
    """The model's own decoder states from plain hooks (not capture's): per layer the input, each norm's input and
    output, the cross-attention output (b_Oc included) and the layer output."""
    seen = {}
    handles = []
    for index, block in enumerate(get_decoder_adapter(model).layer_modules(model)):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, i=index: seen.__setitem__((i, "x"), a[0] if a else k["hidden_states"]), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, i=index: seen.__setitem__((i, "out"), o)))
        handles.append(block.encoder_attn.register_forward_hook(lambda m, a, o, i=index: seen.__setitem__((i, "cross"), o[0])))
        for name in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            handles.append(block.get_submodule(name).register_forward_hook(
                lambda m, a, o, i=index, n=name: seen.update({(i, n + ".in"): a[0], (i, n + ".out"): o})))
    try:
        with torch.no_grad():
            output = model.base_model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen, output


def real_cross_states(seen, index, placement):
    """(p, y, g(y)) of decoder layer ``index`` from the model's own hooks."""
    if placement == "post":
        return (seen[index, "self_attn_layer_norm.out"], seen[index, "encoder_attn_layer_norm.in"],
                seen[index, "encoder_attn_layer_norm.out"])
    return seen[index, "encoder_attn_layer_norm.in"], seen[index, "final_layer_norm.in"], seen[index, "final_layer_norm.out"]


def assert_rows_close(actual, expected, valid, rtol):
    a, e = actual[valid], expected[valid]
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item())


# ----------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("family,attn_implementation", [(f, i) for f in FAMILIES for i in ("sdpa", "eager")])
def test_encoder_layers_reproduce_the_model(family, attn_implementation):
    model = tiny_seq2seq(family, attn_implementation)
    adapter = get_adapter(model)
    assert adapter.layers == "encoder.layers" and adapter.runs == "encoder"
    layers = assert_layers_reproduce_the_model(model, token_batch(family, SOURCE))
    _, placement, activation = TINY[family]
    assert sorted(layers) == [0, 1]
    for layer in layers.values():
        assert (layer.placement, layer.causal, layer.ffn.activation, layer.n_heads) == (placement, False, activation, 4)
    assert model.config._attn_implementation == attn_implementation


def test_encoder_capture_needs_no_decoder_inputs_and_stops_early():
    """Marian and M2M-100 refuse a forward without decoder inputs; capture runs the encoder alone."""
    model = tiny_seq2seq("marian")
    ran = []
    handle = model.decoder.layers[0].register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        assert list(collect(model, token_batch("marian", [5]), layers=[0])) == [0]
        assert sorted(collect(model, pair_batch())) == [0, 1]  # decoder inputs in the batch are left out
    finally:
        handle.remove()
    assert ran == []


@pytest.mark.parametrize("family", FAMILIES)
def test_analyze_on_the_encoder_is_complete_and_equals_the_reference(family):
    model = tiny_seq2seq(family)
    batch = token_batch(family, SOURCE)
    res = kobattr.analyze(model, batch, methods="all", backend="torch")
    assert res.layers == (0, 1) and res.structure == TINY[family][1]
    assert res.model_error.max() < 1e-5
    assert res.completeness and all(err.max() < 1e-5 for err in res.completeness.values())
    layers = collect(model, batch)
    for li, layer in layers.items():
        ref = reference(layer, methods="all")
        for m in res.methods:
            expected = ref["maps"][m].float()
            assert (res.maps[m][li] - expected).abs().max() <= 1e-5 * expected.abs().max(), (family, li, m)


def test_analyze_a_bart_for_generation_on_texts():
    """kobattr.analyze(model, texts, tokenizer=...) on BartForConditionalGeneration attributes its encoder layers."""
    from test_families import trained_tokenizer

    tokenizer = trained_tokenizer("xlm-roberta")  # <s> 0, <pad> 1, </s> 2: BART's special ids
    model = tiny_seq2seq("bart", auto=AutoModelForSeq2SeqLM, vocab_size=320)
    texts = ["the cat sat on the mat", "a dog ran"]
    res = kobattr.analyze(model, texts, tokenizer=tokenizer, methods=["attn_n", "atbffresln"], backend="torch")
    assert res.layers == (0, 1) and res.tokens[1][-1] == "<pad>"
    assert res.model_error.max() < 1e-5 and res.completeness["atbffresln"].max() < 1e-5
    with pytest.raises(LayerInputError, match="at most 64 positions"):
        kobattr.analyze(model, " ".join(["the cat"] * 40), tokenizer=tokenizer)


def test_position_limits():
    """Learned (BART, mBART) and fixed sinusoidal (Marian) position tables end; M2M-100's grows on demand."""
    limits = {family: get_adapter(SimpleNamespace(config=make())).max_tokens(make()) for family, (make, _, _) in TINY.items()}
    assert limits == {"bart": 64, "marian": 64, "m2m_100": None, "mbart": 64}


# ----------------------------------------------------------------------------- decoder capture
@pytest.mark.parametrize("family,attn_implementation", [(f, i) for f in FAMILIES for i in ("sdpa", "eager")])
def test_decoder_layers_reproduce_the_model(family, attn_implementation):
    model = tiny_seq2seq(family, attn_implementation)
    inputs = pair_batch()
    placement = TINY[family][1]
    seen, output = model_states(model, inputs)
    layers = decoder_layers(model, inputs)
    assert sorted(layers) == [0, 1] and model.config._attn_implementation == attn_implementation
    valid = inputs["decoder_attention_mask"].bool()
    for index, layer in layers.items():
        assert layer.placement == placement and layer.self_attn.causal and layer.self_attn.structure == placement
        assert layer.cross.q.shape == (2, 4, 7, 16) and layer.cross.k.shape == (2, 4, 9, 16)
        assert torch.equal(layer.cross.source_valid, inputs["attention_mask"].bool())
        torch.testing.assert_close(layer.x, seen[index, "x"], rtol=0, atol=0)
        p, y, g = real_cross_states(seen, index, placement)
        torch.testing.assert_close(layer.cross.p, p, rtol=0, atol=0)
        # the self-attention block as a Layer: y = x + SelfAttn, and mid: LN_s(y) (post) or LN_c(y) (pre)
        own = layer.self_attn.forward()
        norm = "self_attn_layer_norm" if placement == "post" else "encoder_attn_layer_norm"
        assert_rows_close(own["y"], seen[index, norm + ".in"], valid, 1e-5)
        assert_rows_close(own["mid"], seen[index, norm + ".out"], valid, 1e-5)
        # the cross block from its captured q, k, v: CrossAttn (b_Oc included), y = p + CrossAttn, g(y)
        cross = layer.cross.forward()
        assert_rows_close(cross["attn"], seen[index, "cross"], valid, 1e-5)
        assert_rows_close(cross["y"], y, valid, 1e-5)
        assert_rows_close(cross["out"], g, valid, 1e-5)
        # the whole layer, every state from the captured tensors alone
        whole = layer.forward()
        for state, real in (("p", p), ("y", y), ("mid", g), ("out", seen[index, "out"])):
            assert_rows_close(whole[state], real, valid, 1e-5)
        # what capture recorded is the model's own
        for state, real in (("p", p), ("cross_y", y), ("cross_g", g), ("out", seen[index, "out"])):
            torch.testing.assert_close(layer.states[state], real, rtol=0, atol=0)
        # the attention outputs as the model computed them, 0 on padding rows
        for block in (layer.self_attn, layer.cross):
            assert block.head_outputs is not None and (block.head_outputs.transpose(1, 2)[~valid] == 0).all()
    last = seen[1, "out"]
    if placement == "pre":  # the last decoder state is after the decoder's final norm, not a layer output
        assert not torch.allclose(output.last_hidden_state, last)
        torch.testing.assert_close(output.last_hidden_state, model.decoder.layer_norm(last))
    else:
        torch.testing.assert_close(output.last_hidden_state, last)


def test_decoder_capture_stops_after_the_last_requested_layer():
    model = tiny_seq2seq("bart")
    ran = []
    handle = model.decoder.layers[1].register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        assert list(decoder_layers(model, pair_batch(), layers=[0])) == [0]
    finally:
        handle.remove()
    assert ran == []
    assert list(decoder_layers(model, pair_batch(), layers=[-1])) == [1]


def test_decoder_capture_needs_the_target_and_refuses_t5():
    model = tiny_seq2seq("m2m_100")
    with pytest.raises(LayerInputError, match="decoder_input_ids"):
        capture_decoder(model, token_batch("m2m_100", [5]), lambda i, layer: None)
    t5 = AutoModel.from_config(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=50, d_kv=16))
    with pytest.raises(UnsupportedModelError, match="'t5'.*T5's learned relative position biases"):
        capture_decoder(t5, pair_batch(), lambda i, layer: None)
    with pytest.raises(UnsupportedModelError, match="T5's learned relative position biases"):
        get_adapter(t5)


def test_a_cross_mask_kobattr_does_not_describe_is_an_error():
    layer = decoder_layers(tiny_seq2seq("bart"), pair_batch(), layers=[0])[0]
    cross = layer.cross
    mask = cross.visible()[:, None].clone()
    mask[0, 0, 2, 3] = False  # a real target position that does not see a real source token
    call = _AttentionCall(q=cross.q, k=cross.k, v=cross.v, mask=mask, scale=cross.scale, inner="sdpa", module_causal=False,
                          sliding_window=None, softcap=None, position_bias=None, sinks=None)
    _check_cross_mask(0, cross, dataclasses.replace(call, mask=cross.visible()[:, None]))
    with pytest.raises(CaptureError, match="cross-attention mask differs .* first at batch 0, target 2, source 3"):
        _check_cross_mask(0, cross, call)
    causal = dataclasses.replace(call, mask=None, module_causal=True)  # SDPA's is_causal fallback on a cross call
    with pytest.raises(CaptureError, match="cross-attention mask differs"):
        _check_cross_mask(0, dataclasses.replace(cross, source_valid=None, target_valid=None),
                          dataclasses.replace(causal, k=cross.k[:, :, :7], v=cross.v[:, :, :7]))


# ----------------------------------------------------------------------------- the cross maps
def test_decoder_methods():
    assert check_decoder_methods(None, "post") == (DECODER_SELF_METHODS["post"], tuple(CROSS_METHODS))
    assert check_decoder_methods(["cross_attn_n", "attn_w"], "pre") == (("attn_w",), ("cross_attn_n",))
    # both placements offer every self-attention convention of an encoder's attention block (pre-LN: attnresln_n
    # through the cross-attention's pre-norm LN_c)
    assert DECODER_SELF_METHODS["pre"] == DECODER_SELF_METHODS["post"] == (
        "attn_w", "attnres_w", "attn_n", "attnres_n", "attnresln_n")
    assert check_decoder_methods("attnresln_n", "pre") == (("attnresln_n",), ())
    with pytest.raises(ValueError, match="unknown method 'atbff'"):
        check_decoder_methods("atbff", "post")
    from kobattr.methods import PAPERS

    assert all(spec.paper == "kobayashi2020" and spec.paper in PAPERS for spec in CROSS_METHODS.values())


@pytest.mark.parametrize("family,dtype", [(f, d) for f in FAMILIES for d in (torch.float32, torch.float64)])
def test_cross_maps_equal_the_reference_and_are_complete(family, dtype):
    model = tiny_seq2seq(family).to(dtype)
    inputs = pair_batch()
    placement = TINY[family][1]
    seen, _ = model_states(model, inputs)
    valid = inputs["decoder_attention_mask"].bool()
    pair = valid[:, :, None] & inputs["attention_mask"].bool()[:, None, :]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for index, layer in decoder_layers(model, inputs).items():
        res = attribute_decoder(layer, methods="all", heads=True, backend="torch")
        # "all" brings the peers' ALTI of both blocks too (tests/test_alti_plus.py)
        assert res.methods == DECODER_SELF_METHODS[placement] + ("alti",) + tuple(CROSS_METHODS) + ("cross_alti",)
        assert res.cross.spot_check and all(e.max() <= (1e-9 if dtype == torch.float64 else 1e-4)
                                            for e in res.cross.spot_check.values())
        ref = cross_reference(layer.cross, "all")
        for m in CROSS_METHODS:
            got, expected = res.cross.maps[m], ref["maps"][m]
            assert got.dtype == dtype and got.shape == (2, 7, 9 + CROSS_METHODS[m].residual)
            assert (got.double() - expected).abs().max() <= tol * expected.abs().max(), (family, index, m)
            assert (got[..., :9][~pair] == 0).all() and (got[~valid] == 0).all()
        for m in ("cross_attn_w", "cross_attn_n"):
            expected = ref["head_maps"][m]
            assert (res.cross.head_maps[m].double() - expected).abs().max() <= tol * expected.abs().max()
        torch.testing.assert_close(res.cross.head_maps["cross_attn_w"].mean(1), res.cross.maps["cross_attn_w"])
        row_sums = res.cross.maps["cross_attn_w"].sum(-1)
        torch.testing.assert_close(row_sums[valid], torch.ones_like(row_sums[valid]))
        for m in ("cross_attnres_n", "cross_attnresln_n"):
            torch.testing.assert_close(res.cross.ratios[m].double(), ref["ratios"][m], rtol=tol, atol=tol, equal_nan=True)
            assert res.cross.ratios[m][~valid].isnan().all() and (res.cross.ratios[m][valid] > 0).all()
            torch.testing.assert_close(res.cross.bias_norms[m].double(), ref["bias"][m].norm(dim=-1), rtol=tol, atol=tol)
        # completeness against the model's own y and g(y) (from hooks independent of capture): the source parts, the
        # preserved p_i and the bias sum to them
        p, y, g = (t.double() for t in real_cross_states(seen, index, placement))
        assert_rows_close(ref["total"]["cross_attnres_n"], y, valid, tol)
        assert_rows_close(ref["total"]["cross_attnresln_n"], g, valid, tol)
        assert res.cross.model_error.max() < 10 * tol
        for m in ("cross_attnres_n", "cross_attnresln_n"):
            assert res.cross.completeness[m].max() < 10 * tol, m
        # the self-attention block through kobattr.attribute, against the layer reference
        self_ref = reference(layer.self_attn, methods=DECODER_SELF_METHODS[placement])
        for m in DECODER_SELF_METHODS[placement]:
            expected = self_ref["maps"][m]
            assert (res.maps[m].double() - expected).abs().max() <= tol * expected.abs().max(), (family, index, m)
        assert res.self_attn.model_error.max() < 10 * tol
        # attnresln_n's parts plus bias sum to the model's own norm after the self-attention residual: LN_s post-LN,
        # LN_c (the cross-attention's pre-norm, read by its queries) pre-LN
        after = "self_attn_layer_norm.out" if placement == "post" else "encoder_attn_layer_norm.out"
        assert_rows_close(self_ref["total"]["attnresln_n"], seen[index, after].double(), valid, tol)
        for m in ("attnres_w", "attnresln_n"):
            torch.testing.assert_close(res.ratios[m].double(), self_ref["ratios"][m], rtol=tol, atol=tol, equal_nan=True)
        # attnres_w = 0.5 A + 0.5 I and its ratio half of attn_w's, as in encoders
        eye = torch.eye(7, dtype=dtype) * valid[:, :, None]
        torch.testing.assert_close(res.maps["attnres_w"], 0.5 * res.maps["attn_w"] + 0.5 * eye)
        torch.testing.assert_close(res.ratios["attnres_w"], 0.5 * res.ratios["attn_w"], equal_nan=True)
        # what a real target position keeps shows in the last column: ||p_i||, and ||g_i(p_i)|| through g
        norm = layer.cross.norm
        keep = norm.split(p) * norm.inv_std(y)[..., None]
        assert_rows_close(res.cross.maps["cross_attnres_n"][..., -1].double(), p.norm(dim=-1), valid, tol)
        assert_rows_close(res.cross.maps["cross_attnresln_n"][..., -1].double(), keep.norm(dim=-1), valid, tol)


def test_cross_maps_without_the_models_attention_output():
    """Recomputing the row sums from q, k and v gives the same maps as the model's own attention output."""
    layer = decoder_layers(tiny_seq2seq("m2m_100"), pair_batch(), layers=[1])[1]
    own = attribute_cross(layer.cross, heads=True)
    recomputed = attribute_cross(dataclasses.replace(layer.cross, head_outputs=None), heads=True, budget=64)
    for m in CROSS_METHODS:
        torch.testing.assert_close(own.maps[m], recomputed.maps[m], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_pairs_equal_each_pair_alone(family):
    model = tiny_seq2seq(family)
    sources, targets = [9, 6, 4], [5, 7, 3]
    inputs = pair_batch(sources, targets)
    together = {i: attribute_decoder(layer, "all", backend="torch") for i, layer in decoder_layers(model, inputs).items()}
    for b, (s, t) in enumerate(zip(sources, targets)):
        alone_inputs = dict(input_ids=inputs["input_ids"][b:b + 1, :s], attention_mask=inputs["attention_mask"][b:b + 1, :s],
                            decoder_input_ids=inputs["decoder_input_ids"][b:b + 1, :t],
                            decoder_attention_mask=inputs["decoder_attention_mask"][b:b + 1, :t])
        for index, layer in decoder_layers(model, alone_inputs).items():
            alone, joint = attribute_decoder(layer, "all", backend="torch"), together[index]
            for m, single in alone.maps.items():
                batched = joint.maps[m][b]
                if decoder_map_width(m) in ("S", "P"):  # a cross map (P: with the residual column last)
                    residual = decoder_map_width(m) == "P"
                    cols = list(range(s)) + ([batched.shape[-1] - 1] if residual else [])
                    padding_cols = batched[:, s:batched.shape[-1] - residual]
                else:
                    cols, padding_cols = list(range(t)), batched[:, t:]
                torch.testing.assert_close(batched[:t, cols], single[0], rtol=1e-4, atol=1e-5, msg=f"{family} {index} {m}")
                assert (batched[t:] == 0).all() and (padding_cols == 0).all()
            for m, single in alone.ratios.items():
                torch.testing.assert_close(joint.ratios[m][b, :t], single[0], rtol=1e-4, atol=1e-5)
                assert joint.ratios[m][b, t:].isnan().all()


@pytest.mark.parametrize("family", ["bart", "m2m_100"])
def test_a_planted_cross_attention_aligns_each_target_position_to_its_source_position(family):
    """Set the last decoder layer's cross-attention q/k projections so that, on this input, every head's query of target
    position i matches the key of source position i only (least squares on the projections' real inputs, exact
    because there are fewer tokens than dimensions): cross_attn_w and cross_attn_n then peak at (i, i)."""
    model = tiny_seq2seq(family)
    inputs = pair_batch([7, 7], [5, 5])  # no padding
    attn = model.decoder.layers[1].encoder_attn
    seen = {}
    handles = [getattr(attn, name).register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, a[0].double()))
               for name in ("q_proj", "k_proj")]
    try:
        with torch.no_grad():
            model.base_model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    before = attribute_decoder(decoder_layers(model, inputs)[1], ["cross_attn_w"], verify=0).maps["cross_attn_w"]
    assert not (before.argmax(-1) == torch.arange(5)).all()

    eye = torch.eye(16, dtype=torch.float64)
    queries, keys = 80.0 * eye[:5].repeat(1, 4), eye[:7].repeat(1, 4)  # (position, H * Dh): every head alike
    with torch.no_grad():
        for name, rows, wanted in (("q_proj", 5, queries), ("k_proj", 7, keys)):
            proj, inputs_ = getattr(attn, name), seen[name].reshape(-1, 64)  # (B * rows, D), rank B * rows
            target = wanted.repeat(2, 1) - proj.bias.double()
            proj.weight.copy_((torch.linalg.pinv(inputs_) @ target).T.float())
    layer = decoder_layers(model, inputs)[1]
    res = attribute_decoder(layer, ["cross_attn_w", "cross_attn_n"], heads=True, backend="torch")
    positions = torch.arange(5).expand(2, 5)
    for m in ("cross_attn_w", "cross_attn_n"):
        assert torch.equal(res.maps[m].argmax(-1), positions), m
    assert (res.maps["cross_attn_w"].diagonal(dim1=-2, dim2=-1) > 0.99).all()
    assert (res.head_maps["cross_attn_w"].argmax(-1) == positions[:, None]).all()


def test_cross_maps_of_a_random_block_with_grouped_heads_and_rmsnorm():
    """A CrossAttention built by hand: 4 query heads sharing 2 key/value heads, an RMSNorm g, padding on both sides;
    alpha checked against a plain softmax written here, every map against cross_reference."""
    from kobattr.layer import Norm
    from kobattr.seq2seq import CrossAttention

    g = torch.Generator().manual_seed(3)
    B, H, KV, T, S, Dh, D = 2, 4, 2, 5, 6, 8, 24
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    source_valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    target_valid = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    cross = CrossAttention(q=rand(B, H, T, Dh), k=rand(B, KV, S, Dh), v=rand(B, KV, S, Dh), w_o=rand(H, Dh, D) / 3,
                           p=rand(B, T, D), norm=Norm("rmsnorm", weight=1 + rand(D) / 5, eps=1e-6), b_o=rand(D),
                           scale=0.3, source_valid=source_valid, target_valid=target_valid)
    res = attribute_cross(cross, heads=True)
    scores = cross.q @ cross.k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3
    pair = target_valid[:, :, None] & source_valid[:, None, :]
    alpha = torch.softmax(scores.masked_fill(~pair[:, None], float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(res.head_maps["cross_attn_w"], alpha, rtol=1e-12, atol=1e-14)
    ref = cross_reference(cross)
    for m in CROSS_METHODS:
        torch.testing.assert_close(res.maps[m], ref["maps"][m], rtol=1e-10, atol=1e-12)
    y = cross.forward()["y"]
    for m, real in (("cross_attnres_n", y), ("cross_attnresln_n", cross.norm(y))):
        assert_rows_close(ref["total"][m], real, target_valid, 1e-12)
        assert res.completeness[m].max() < 1e-12
    # one batch element alone, and in float32
    one = attribute_cross(cross.select(1).to(torch.float32))
    for m in CROSS_METHODS:
        torch.testing.assert_close(one.maps[m][0], res.maps[m][1].float(), rtol=1e-5, atol=1e-6)


def test_a_decoder_layer_cast_and_selected():
    layer = decoder_layers(tiny_seq2seq("mbart"), pair_batch(), layers=[0])[0]
    wide = layer.to(torch.float64).validate()
    assert wide.cross.q.dtype == wide.ffn.w_in.dtype == wide.states["out"].dtype == torch.float64
    valid = layer.self_attn.valid
    assert_rows_close(wide.forward()["out"].float(), layer.states["out"], valid, 1e-5)
    alone = layer.select(1).validate()
    assert alone.cross.q.shape[0] == alone.x.shape[0] == alone.states["p"].shape[0] == 1
    torch.testing.assert_close(alone.forward()["out"][0, :4], layer.forward()["out"][1, :4])
