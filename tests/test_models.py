"""Capture of Layers from Hugging Face models: real MiniLM weights and tiny random models of every family."""

import dataclasses

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BloomConfig,
    DistilBertConfig,
    ElectraConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    ModernBertConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
    T5Config,
    XLMRobertaConfig,
)

from kobattr.layer import cap_logits
from kobattr.models import (
    SUPPORTED_FAMILIES,
    CaptureError,
    UnsupportedModelError,
    capture,
    default_model_path,
    get_adapter,
    load_default_model,
    residual_stream,
)

TEXTS = ["The cat sat on the mat because it was warm.", "Attribution is hard.", "A third, medium sentence here."]
N_TOKENS = 10  # > the sliding window (4) of the tiny Mistral, Qwen2, Qwen3, Phi-3, Gemma 2/3; > ModernBERT's 2 * radius + 1


def collect(model, inputs, layers=None):
    captured = {}
    capture(model, inputs, lambda index, layer: captured.__setitem__(index, layer), layers=layers)
    return captured


def assert_close_rows(actual, expected, valid, rtol=1e-5):
    """actual/expected (B, N, ...) agree on the rows where valid (B, N) is True, relative to their scale."""
    a, e = actual[valid], expected[valid]
    atol = rtol * e.abs().max().item()
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def alpha(layer):
    """(B, H, N, N) softmax attention of a captured layer under its structured mask; 0 on padding rows."""
    group = layer.n_heads // layer.n_kv_heads
    scores = cap_logits(layer.q @ layer.k.repeat_interleave(group, 1).transpose(-1, -2) * layer.softmax_scale, layer.softcap)
    scores = scores.masked_fill(~layer.visible()[:, None], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0)


# ----------------------------------------------------------------------------- (a) real MiniLM weights
@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_default_model()
    eager, _ = load_default_model(attn_implementation="eager")
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    return model, eager, inputs


def test_default_model_path_holds_the_weights():
    path = default_model_path()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


def test_minilm_layers_reproduce_hidden_states(minilm):
    model, _, inputs = minilm
    assert model.config._attn_implementation == "sdpa"
    layers = collect(model, inputs)
    assert model.config._attn_implementation == "sdpa"  # restored
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    valid = inputs["attention_mask"].bool()
    assert sorted(layers) == list(range(6))
    for index, layer in layers.items():
        assert (layer.placement, layer.causal, layer.window, layer.ffn.activation) == ("post", False, 0, "gelu")
        assert layer.q.shape == (3, 12, valid.shape[1], 32) and layer.w_o.shape == (12, 32, 384)
        torch.testing.assert_close(layer.x, hidden[index], rtol=0, atol=0)
        assert_close_rows(layer.forward()["out"], hidden[index + 1], valid)


def test_minilm_alpha_matches_eager_attentions(minilm):
    model, eager, inputs = minilm
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    valid = inputs["attention_mask"].bool()
    for layers in (collect(model, inputs), collect(eager, inputs)):
        for index, layer in layers.items():
            a = alpha(layer).transpose(1, 2)  # (B, N, H, N): padding rows selectable by valid
            assert_close_rows(a, attentions[index].transpose(1, 2), valid)


def test_minilm_capture_is_the_same_under_sdpa_and_eager(minilm):
    """On the real tokens: padded rows carry no attribution, and the two forwards differ there by 1e-4 after
    a few layers (transformers 5.25), against ~3e-6 on the real tokens."""
    model, eager, inputs = minilm
    valid = inputs["attention_mask"].bool()
    from_sdpa, from_eager = collect(model, inputs), collect(eager, inputs)
    for index in range(6):
        a, b = from_sdpa[index], from_eager[index]
        for name in ("q", "k", "v"):  # (B, H, N, Dh) -> (B, N, H, Dh)
            torch.testing.assert_close(getattr(a, name).transpose(1, 2)[valid], getattr(b, name).transpose(1, 2)[valid],
                                       rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.x[valid], b.x[valid], rtol=1e-5, atol=1e-5)
        for name in ("w_o", "b_o", "key_valid"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
        assert (a.scale, a.causal, a.window) == (b.scale, b.causal, b.window)


# ----------------------------------------------------------------------------- (b) tiny random models
LLAMA_DIMS = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=100, max_position_embeddings=64, initializer_range=0.1,
)
TINY = {
    "gpt2": (AutoModelForCausalLM, lambda: GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, initializer_range=0.1,
        bos_token_id=0, eos_token_id=0)),
    "roberta": (AutoModel, lambda: RobertaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
        max_position_embeddings=64, initializer_range=0.1)),
    "llama": (AutoModelForCausalLM, lambda: LlamaConfig(**LLAMA_DIMS, hidden_act="silu")),
    "mistral": (AutoModel, lambda: MistralConfig(**LLAMA_DIMS, sliding_window=4)),
    "qwen2": (AutoModel, lambda: Qwen2Config(
        **LLAMA_DIMS, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "xlm-roberta": (AutoModel, lambda: XLMRobertaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
        max_position_embeddings=64, initializer_range=0.1)),
    # embedding_size != hidden_size: ELECTRA's embeddings_project runs before layer 0
    "electra": (AutoModel, lambda: ElectraConfig(
        embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=100, max_position_embeddings=64, initializer_range=0.1, hidden_act="relu")),
    "distilbert": (AutoModel, lambda: DistilBertConfig(
        dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=100, max_position_embeddings=64,
        initializer_range=0.1, activation="gelu")),
    "qwen3": (AutoModel, lambda: Qwen3Config(
        **LLAMA_DIMS, head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "phi3": (AutoModelForCausalLM, lambda: Phi3Config(
        **LLAMA_DIMS, sliding_window=4, bos_token_id=0, eos_token_id=0, pad_token_id=0)),
    # RMSNorm scaling by (1 + weight), GeGLU with tanh GELU (the config default gelu_pytorch_tanh)
    "gemma": (AutoModelForCausalLM, lambda: GemmaConfig(**LLAMA_DIMS, head_dim=32)),  # heads x head_dim != hidden
    # parallel residual, partial rotary (half of each head), biases everywhere
    "gpt_neox": (AutoModelForCausalLM, lambda: GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=64, initializer_range=0.1, rotary_pct=0.5, bos_token_id=0, eos_token_id=0)),
    # sandwich norms, a soft-cap small enough to bite, a local then a global layer, scale 24 ** -0.5 (not 16 ** -0.5)
    "gemma2": (AutoModelForCausalLM, lambda: Gemma2Config(
        **LLAMA_DIMS, head_dim=16, sliding_window=4, attn_logit_softcapping=2.0, query_pre_attn_scalar=24)),
    # sandwich norms, per-head q/k norms, local (window 4, local RoPE) then global layers
    "gemma3_text": (AutoModel, lambda: Gemma3TextConfig(
        **LLAMA_DIMS, head_dim=16, sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=24)),
    # norms after attention and after the FFN only, q/k norms over the whole projection
    "olmo2": (AutoModelForCausalLM, lambda: Olmo2Config(**LLAMA_DIMS, pad_token_id=1, bos_token_id=None, eos_token_id=0)),
    # pre-LN encoder without a norm before layer 0's attention, GeGLU from a fused Wi, a global then a local
    # layer (|i - j| <= local_attention // 2 = 2); norm and projection biases switched on, so they are tested
    "modernbert": (AutoModel, lambda: ModernBertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=64, initializer_range=0.1, global_attn_every_n_layers=2, local_attention=4,
        norm_bias=True, attention_bias=True, mlp_bias=True,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)),
}
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt_neox", "gemma2", "gemma3_text", "olmo2")
EAGER_ONLY = ("gemma2",)  # transformers refuses SDPA for Gemma 2: it cannot soft-cap the logits
EXPECTED = {  # placement, structure, causal, windows and radii per layer, softcap, activation, KV heads
    "gpt2": ("pre", "pre", True, [0, 0], [0, 0], 0.0, "gelu_tanh", 4),
    "roberta": ("post", "post", False, [0, 0], [0, 0], 0.0, "gelu", 4),
    "llama": ("pre", "pre", True, [0, 0], [0, 0], 0.0, "swiglu", 2),
    "mistral": ("pre", "pre", True, [4, 4], [0, 0], 0.0, "swiglu", 2),
    "qwen2": ("pre", "pre", True, [0, 4], [0, 0], 0.0, "swiglu", 2),
    "xlm-roberta": ("post", "post", False, [0, 0], [0, 0], 0.0, "gelu", 4),
    "electra": ("post", "post", False, [0, 0], [0, 0], 0.0, "relu", 4),
    "distilbert": ("post", "post", False, [0, 0], [0, 0], 0.0, "gelu", 4),
    "qwen3": ("pre", "pre", True, [0, 4], [0, 0], 0.0, "swiglu", 2),
    "phi3": ("pre", "pre", True, [4, 4], [0, 0], 0.0, "swiglu", 2),
    "gemma": ("pre", "pre", True, [0, 0], [0, 0], 0.0, "geglu_tanh", 2),
    "gpt_neox": ("parallel", "parallel", True, [0, 0], [0, 0], 0.0, "gelu", 4),
    "gemma2": ("pre", "sandwich", True, [4, 0], [0, 0], 2.0, "geglu_tanh", 2),
    "gemma3_text": ("pre", "sandwich", True, [4, 0], [0, 0], 0.0, "geglu_tanh", 2),
    "olmo2": ("pre", "post_only", True, [0, 0], [0, 0], 0.0, "swiglu", 2),
    "modernbert": ("pre", "pre", False, [0, 0], [0, 2], 0.0, "geglu", 4),
}


def tiny_model(family, attn_implementation=None, **config_changes):
    """The tiny random model of a family (attention: SDPA where transformers allows it, else eager), with
    random 1-d parameters; ``config_changes`` override the tiny config's arguments (the config is rebuilt with
    them, so that what its __post_init__ derives from them follows)."""
    torch.manual_seed(0)
    auto, make_config = TINY[family]
    if attn_implementation is None:
        attn_implementation = "eager" if family in EAGER_ONLY else "sdpa"
    config = make_config()
    if config_changes:
        config = type(config).from_dict({**config.to_dict(), **config_changes})
    model = auto.from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():  # random norm weights and biases, so that swapping LN1/LN2 or dropping a bias shows
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model


def token_batch(family, lengths, side="right"):
    """Random token ids for texts of the given lengths, padded on one side to the longest."""
    generator = torch.Generator().manual_seed(1)
    n = max(lengths)
    pad = 1  # RoBERTa's padding_idx; real tokens avoid it, as RoBERTa derives positions from it
    ids = torch.full((len(lengths), n), pad)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for row, length in enumerate(lengths):
        span = slice(n - length, n) if side == "left" else slice(0, length)
        ids[row, span] = torch.randint(2, 100, (length,), generator=generator)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def assert_layers_reproduce_the_model(model, inputs):
    """Capture every layer and check each one's forward() against the model's own hidden states: the layer
    output, and every intermediate state (attn, y, mid, ffn_out) that a module of the layer reads or returns
    (Adapter.probes). Returns the captured layers."""
    adapter = get_adapter(model)
    stream = residual_stream(model, inputs)
    seen = {}

    def keep(index, state, which):
        def hook(module, args, kwargs, output):
            if which == "input":
                seen[index, state] = args[0] if args else next(iter(kwargs.values()))
            else:
                seen[index, state] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [module.register_forward_hook(keep(index, state, which), with_kwargs=True)
               for index, block in enumerate(adapter.layer_modules(model))
               for state, (module, which) in adapter.probes(block, model.config).items()]
    try:
        layers = collect(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    valid = inputs["attention_mask"].bool()
    structure = adapter.structure(model.config)
    assert {state for (_, state) in seen} == {"attn", "mid", "ffn_out"} | ({"y"} if structure != "parallel" else set())
    for index, layer in layers.items():
        assert layer.structure == structure
        out = layer.forward()
        torch.testing.assert_close(layer.x, stream[index], rtol=0, atol=0)
        for state in ("attn", "y", "mid", "ffn_out"):
            if (index, state) in seen:
                assert_close_rows(out[state], seen[index, state], valid)
        assert_close_rows(out["out"], stream[index + 1], valid)
    return layers


@pytest.mark.parametrize("family,attn_implementation",
                         [(f, impl) for f in TINY for impl in ("sdpa", "eager") if not (f in EAGER_ONLY and impl == "sdpa")])
def test_tiny_model_layers_reproduce_the_model(family, attn_implementation):
    model = tiny_model(family, attn_implementation)
    inputs = token_batch(family, [N_TOKENS, N_TOKENS])
    layers = assert_layers_reproduce_the_model(model, inputs)
    assert model.config._attn_implementation == attn_implementation
    placement, structure, causal, windows, radii, softcap, activation, kv_heads = EXPECTED[family]
    assert sorted(layers) == list(range(len(windows)))
    for index, layer in layers.items():
        assert (layer.placement, layer.structure, layer.causal) == (placement, structure, causal)
        assert (layer.window, layer.radius, layer.softcap) == (windows[index], radii[index], softcap)
        assert layer.ffn.activation == activation and layer.n_kv_heads == kv_heads and layer.n_heads == 4


def test_tiny_mistral_window_matters():
    """The window must change the attention of a sequence longer than it, or the test above proves nothing."""
    model = tiny_model("mistral")
    layer = collect(model, token_batch("mistral", [N_TOKENS]), layers=[0])[0]
    unwindowed = dataclasses.replace(layer, window=0)
    assert not torch.allclose(layer.forward()["out"], unwindowed.forward()["out"])


def _swap_out_norms(layer):
    return dict(attn_out_norm=layer.ffn_out_norm, ffn_out_norm=layer.attn_out_norm)


@pytest.mark.parametrize("family,index,change", [
    ("gemma2", 0, lambda layer: dict(softcap=0.0)),  # the soft-cap bites on the tiny model's logits
    ("gemma2", 0, lambda layer: dict(window=0)),  # Gemma 2's local layer
    ("gemma3_text", 0, lambda layer: dict(window=0)),
    ("modernbert", 1, lambda layer: dict(radius=0)),  # ModernBERT's local layer
    ("gemma2", 1, lambda layer: dict(attn_out_norm=None, ffn_out_norm=None)),  # sandwich without its out norms: pre
    ("gemma2", 1, _swap_out_norms),
    ("olmo2", 1, _swap_out_norms),  # post_only: each out norm is where it belongs
    ("gpt_neox", 1, lambda layer: dict(placement="pre")),  # parallel is not sequential
])
def test_each_new_feature_changes_the_output(family, index, change):
    """What the new structures and options add must matter on the tiny models, or reproducing them proves nothing."""
    layer = collect(tiny_model(family), token_batch(family, [N_TOKENS]), layers=[index])[index]
    changed = dataclasses.replace(layer, **change(layer))
    assert not torch.allclose(layer.forward()["out"], changed.forward()["out"], rtol=1e-3, atol=1e-3)


def test_modernbert_layer_zero_has_no_norm_before_attention():
    model = tiny_model("modernbert")
    adapter = get_adapter(model)
    blocks = adapter.layer_modules(model)
    assert isinstance(blocks[0].attn_norm, nn.Identity) and isinstance(blocks[1].attn_norm, nn.LayerNorm)
    norms = [adapter.norms(block) for block in blocks]
    assert norms[0]["ln1"] is None and norms[1]["ln1"] is not None
    assert all(n["ln2"] is not None and n["attn_out_norm"] is None and n["ffn_out_norm"] is None for n in norms)
    layers = collect(model, token_batch("modernbert", [N_TOKENS]))
    assert layers[0].ln1 is None and layers[0].structure == "pre"
    assert layers[1].ln1.bias is not None and layers[1].ln1.kind == "layernorm"  # norm_bias=True


def test_pythia_sequential_variant_is_pre_ln():
    """GPT-NeoX with use_parallel_residual=False is a plain pre-LN block, chosen from the config."""
    model = tiny_model("gpt_neox", use_parallel_residual=False)
    assert get_adapter(model).structure(model.config) == "pre"
    layers = assert_layers_reproduce_the_model(model, token_batch("gpt_neox", [N_TOKENS, 6]))
    assert all(layer.placement == "pre" and layer.structure == "pre" for layer in layers.values())


def test_bidirectional_gemma3_has_symmetric_local_windows():
    """EmbeddingGemma-style Gemma 3: no causal mask; local layers see |i - j| < sliding_window, the config's
    window w having become w // 2 + 1 (so window 8 gives radius 4)."""
    model = tiny_model("gemma3_text", use_bidirectional_attention=True, sliding_window=8)
    assert model.config.sliding_window == 5
    layers = assert_layers_reproduce_the_model(model, token_batch("gemma3_text", [N_TOKENS, 7]))
    assert [(layer.causal, layer.window, layer.radius) for layer in layers.values()] == [(False, 0, 4), (False, 0, 0)]


def test_gemma2_scale_is_query_pre_attn_scalar():
    layer = collect(tiny_model("gemma2"), token_batch("gemma2", [5]), layers=[0])[0]
    assert layer.scale == 24 ** -0.5 and layer.q.shape[-1] == 16


def test_a_softcap_the_adapter_does_not_describe_is_an_error():
    """Gemma2Attention keeps the soft-cap it was built with; a config changed afterwards no longer says what it does."""
    model = tiny_model("gemma2")
    model.config.attn_logit_softcapping = 3.0
    with pytest.raises(CaptureError, match="softcap=2.0 but the adapter says softcap=3.0"):
        capture(model, token_batch("gemma2", [5]), lambda i, layer: None)


def test_a_window_the_adapter_does_not_describe_is_an_error():
    """ModernBERT's attention passes its window (built from the config) to the attention call: they must agree."""
    model = tiny_model("modernbert")
    model.config.local_attention = 6
    with pytest.raises(CaptureError, match="sliding_window=3 but the adapter says window=0, radius=3"):
        capture(model, token_batch("modernbert", [N_TOKENS]), lambda i, layer: None)


def test_capture_leaves_the_model_unchanged():
    model = tiny_model("llama")
    model.train()
    inputs = token_batch("llama", [N_TOKENS])
    before = [p.clone() for p in model.parameters()]
    hooks = [dict(m._forward_hooks) for m in model.modules()]
    collect(model, inputs)
    assert model.training and all(m.training for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert hooks == [dict(m._forward_hooks) for m in model.modules()]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- (c) padding
@pytest.mark.parametrize("family,side", [(f, "right") for f in TINY] + [(f, "left") for f in DECODERS])
def test_padded_batch_rows_equal_each_text_alone(family, side):
    model = tiny_model(family)
    lengths = [N_TOKENS, 6, 3]
    batch = token_batch(family, lengths, side)
    batched = collect(model, batch)
    for row, length in enumerate(lengths):
        span = slice(N_TOKENS - length, N_TOKENS) if side == "left" else slice(0, length)
        alone = collect(model, {k: v[row : row + 1, span] for k, v in batch.items()})
        for index, layer in batched.items():
            single = alone[index]
            assert layer.key_valid[row].sum() == length
            for name in ("x", "q", "k", "v"):
                got = getattr(layer, name)[row : row + 1]
                got = got[:, span] if name == "x" else got[:, :, span]
                torch.testing.assert_close(got, getattr(single, name), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.forward()["out"][row : row + 1, span], single.forward()["out"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- (d) unsupported models
def test_unsupported_model_names_its_type_and_the_supported_families():
    model = AutoModel.from_config(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=50, d_kv=16))
    with pytest.raises(UnsupportedModelError, match="'t5'") as error:
        capture(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, lambda i, layer: None)
    assert all(family in str(error.value) for family in SUPPORTED_FAMILIES)
    assert "T5's learned relative position biases to the attention logits" in str(error.value)


def test_alibi_models_are_refused_with_the_reason():
    model = AutoModel.from_config(BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="'bloom'.*ALiBi position biases") as error:
        get_adapter(model)
    assert all(family in str(error.value) for family in SUPPORTED_FAMILIES)


def test_additive_biases_in_the_attention_call_are_refused():
    from kobattr.models.recording import _AttentionCall, _check_call

    q = torch.zeros(1, 2, 3, 4)
    call = _AttentionCall(q=q, k=q, v=q, mask=None, scale=0.5, inner="sdpa", module_causal=False, sliding_window=None,
                          softcap=None, position_bias=torch.zeros(1, 2, 3, 3), sinks=None)
    with pytest.raises(CaptureError, match="layer 0 adds a position bias .* not support"):
        _check_call(0, call)
    with pytest.raises(CaptureError, match="sinks"):
        _check_call(0, dataclasses.replace(call, position_bias=None, sinks=torch.zeros(2)))


def test_unknown_activation_is_rejected():
    config = TINY["gpt2"][1]()
    config.activation_function = "quick_gelu"
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="quick_gelu"):
        capture(model, token_batch("gpt2", [4]), lambda i, layer: None)


def test_a_mask_the_adapter_does_not_describe_is_an_error():
    """A BERT configured as a decoder masks causally; the BERT adapter says bidirectional: refuse, loudly."""
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100, is_decoder=True)
    model = AutoModel.from_config(config).eval()
    with pytest.raises(CaptureError, match="mask differs"):
        capture(model, token_batch("gpt2", [5]), lambda i, layer: None)
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- (e) streaming
def test_on_layer_streams_each_layer_as_soon_as_it_has_run():
    model = tiny_model("llama")
    events = []
    blocks = get_adapter(model).layer_modules(model)
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: events.append(("starts", i))) for i, b in enumerate(blocks)]
    try:
        capture(model, token_batch("llama", [5]), lambda index, layer: events.append(("on_layer", index)))
    finally:
        for handle in handles:
            handle.remove()
    assert events == [("starts", 0), ("on_layer", 0), ("starts", 1), ("on_layer", 1)]


def test_layers_selects_what_is_captured_and_stops_early():
    model = tiny_model("gpt2")
    inputs = token_batch("gpt2", [5])
    calls = []
    capture(model, inputs, lambda index, layer: calls.append(index), layers=[1])
    assert calls == [1]
    ran = []
    handle = get_adapter(model).layer_modules(model)[1].register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        assert list(collect(model, inputs, layers=[0])) == [0]
    finally:
        handle.remove()
    assert ran == []  # the forward pass stopped after layer 0
    assert list(collect(model, inputs, layers=[-1])) == [1]
    with pytest.raises(IndexError, match="out of range"):
        capture(model, inputs, lambda index, layer: None, layers=[2])


@pytest.mark.parametrize("family,side", [("roberta", "right"), ("llama", "left"), ("gemma2", "left"),
                                         ("modernbert", "right"), ("gpt_neox", "right")])
def test_the_attention_output_is_recorded_per_head(family, side):
    """Layer.head_outputs is sum_j alpha^h_ij v_j as the model computed it, 0 on padding rows."""
    model = tiny_model(family)
    batch = token_batch(family, [N_TOKENS, 5], side)
    valid = batch["attention_mask"].bool()
    for layer in collect(model, batch).values():
        assert layer.head_outputs is not None and layer.head_outputs.shape == layer.q.shape
        v = layer.v.repeat_interleave(layer.n_heads // layer.n_kv_heads, 1)
        expected = alpha(layer) @ v
        rows = valid[:, None, :].expand(-1, layer.n_heads, -1)
        assert_close_rows(layer.head_outputs.transpose(1, 2), expected.transpose(1, 2), valid)
        assert (layer.head_outputs[~rows] == 0).all()
