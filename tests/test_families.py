"""The families added after the first six (issue 11): XLM-RoBERTa, ELECTRA, DistilBERT, Qwen3, Phi-3; and Gemma;
then the families with new block structures: GPT-NeoX / Pythia (parallel), Gemma 2 and Gemma 3 (sandwich),
OLMo 2 (post_only), ModernBERT (pre-LN encoder with symmetric local windows).

Capture reproducing each tiny model's hidden states (sdpa and eager), padding, and analyze()'s completeness
and agreement with the reference run for them through the TINY / EXPECTED tables of test_models.py (the new
features mattering, ModernBERT's missing layer-0 norm and Pythia's sequential variant are tested there); here:
the CLI on saved checkpoints with trained tokenizers, and what is particular to each family (ELECTRA's
embedding projection, Qwen3's and OLMo 2's q/k norms, Phi-3's and ModernBERT's fused projections, Gemma's
(1 + weight) RMSNorms).
"""

import json
import os

import pytest
import torch
from test_models import EAGER_ONLY, TINY, collect, tiny_model, token_batch
from transformers import AutoModel, PreTrainedTokenizerFast

from kobattr.cli import main as cli_main
from kobattr.models import SUPPORTED_FAMILIES, UnsupportedModelError, get_adapter
from kobattr.models.adapters import Adapter
from kobattr.result import Attribution

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NEW = ("xlm-roberta", "electra", "distilbert", "qwen3", "phi3", "gemma")
STRUCTURES = ("gpt_neox", "gemma2", "gemma3_text", "olmo2", "modernbert")  # the families with new block structures
TEXTS = ["the cat sat on the mat", "a dog ran"]


def test_new_families_are_supported_and_named():
    assert {"XLM-RoBERTa", "ELECTRA", "DistilBERT", "Qwen3", "Phi-3", "Gemma"} <= set(SUPPORTED_FAMILIES)
    assert set(NEW) <= set(TINY)
    assert {"GPT-NeoX", "Gemma 2", "Gemma 3", "OLMo 2", "ModernBERT"} <= set(SUPPORTED_FAMILIES)
    assert set(STRUCTURES) <= set(TINY)
    for family in NEW + STRUCTURES:
        assert get_adapter(tiny_model(family)).model_types == (family,)


# ----------------------------------------------------------------------------- CLI on saved checkpoints
SPECIALS = {  # special tokens in the order that gives each family's config its pad id (XLM-R pads with 1)
    "xlm-roberta": (["<s>", "<pad>", "</s>", "<unk>"], dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                                         unk_token="<unk>", cls_token="<s>", sep_token="</s>")),
    "electra": (["[PAD]", "[UNK]", "[CLS]", "[SEP]"], dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                                          sep_token="[SEP]")),
    "qwen3": (["<|endoftext|>"], dict(eos_token="<|endoftext|>")),  # no pad token, like Qwen's own
}
SPECIALS["distilbert"] = SPECIALS["electra"]
SPECIALS["phi3"] = SPECIALS["qwen3"]
# Gemma's config pads with 0, ends with 1 and begins with 2
SPECIALS["gemma"] = (["<pad>", "<eos>", "<bos>"], dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"))
SPECIALS["gemma2"] = SPECIALS["gemma3_text"] = SPECIALS["gemma"]
SPECIALS["gpt_neox"] = SPECIALS["qwen3"]  # the tiny config begins and ends with 0 and has no pad token
SPECIALS["olmo2"] = (["<|endoftext|>", "<|pad|>"], dict(eos_token="<|endoftext|>", pad_token="<|pad|>"))
SPECIALS["modernbert"] = (["[PAD]", "[UNK]", "[CLS]", "[SEP]"], dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                                                    sep_token="[SEP]"))
PADDED = ("xlm-roberta", "electra", "distilbert", "gemma", "gemma2", "gemma3_text", "olmo2", "modernbert")


def trained_tokenizer(family):
    """A byte-level BPE trained here, with the family's special tokens; encoders wrap texts in CLS ... SEP."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, names = SPECIALS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    if "cls_token" in names:
        cls, sep = names["cls_token"], names["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)


@pytest.mark.parametrize("family", NEW + STRUCTURES)
def test_cli_on_a_saved_tiny_model(family, tmp_path, capsys):
    auto, make_config = TINY[family]
    config = make_config()
    config.vocab_size = 320
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="eager" if family in EAGER_ONLY else "sdpa").eval()
    tokenizer = trained_tokenizer(family)
    if family in PADDED:
        assert tokenizer.pad_token_id == config.pad_token_id
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    assert cli_main(["analyze", *TEXTS, "--model", str(tmp_path / "model"), "--out", str(out), "--no-plots",
                     "--backend", "torch"]) == 0
    assert "mean context-mixing ratio" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary and all(len(v) == 2 for v in summary.values())
    result = Attribution.load(out / "text001" / "attribution")
    tokens = result.tokens[0]
    if "cls_token" in SPECIALS[family][1]:
        assert (tokens[0], tokens[-1]) == (tokenizer.cls_token, tokenizer.sep_token)
    assert result.model_error.max() < 1e-5
    assert all(e.max() < 1e-5 for e in result.completeness.values())


# ----------------------------------------------------------------------------- what each family adds
def test_electra_embedding_projection_is_before_layer_zero():
    model = tiny_model("electra")
    assert model.embeddings_project.in_features == 32 and model.embeddings_project.out_features == 64
    layers = collect(model, token_batch("electra", [6]))
    assert layers[0].x.shape[-1] == 64


def test_qwen3_q_and_k_are_recorded_after_their_norms():
    model = tiny_model("qwen3")
    batch = token_batch("qwen3", [6])
    seen = {}
    attention = model.layers[0].self_attn
    handles = [getattr(attention, name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o))
               for name in ("q_norm", "k_norm")]
    try:
        layer = collect(model, batch, layers=[0])[0]
    finally:
        for handle in handles:
            handle.remove()
    # RoPE rotates pairs of dimensions, so it keeps each head vector's norm: q equals q_norm's output up to RoPE
    for name, captured in (("q_norm", layer.q), ("k_norm", layer.k)):
        torch.testing.assert_close(captured.norm(dim=-1), seen[name].transpose(1, 2).norm(dim=-1))


def test_phi3_fused_projections_are_sliced_gate_first():
    model = tiny_model("phi3")
    block = model.model.layers[0]
    ffn = get_adapter(model).feed_forward(block, model.config)
    gate, up = block.mlp.gate_up_proj.weight.chunk(2, dim=0)
    assert torch.equal(ffn.w_gate, gate.T) and torch.equal(ffn.w_in, up.T)
    assert ffn.w_out.shape == (128, 64) and ffn.b_in is None and ffn.b_gate is None


GEMMA_NORMS = {  # Layer norm field -> the module of each Gemma generation
    "gemma": dict(ln1="input_layernorm", ln2="post_attention_layernorm"),
    "gemma2": dict(ln1="input_layernorm", ln2="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
                   ffn_out_norm="post_feedforward_layernorm"),
}
GEMMA_NORMS["gemma3_text"] = GEMMA_NORMS["gemma2"]


@pytest.mark.parametrize("family", list(GEMMA_NORMS))
def test_gemma_norms_scale_by_one_plus_weight(family):
    model = tiny_model(family)
    block = get_adapter(model).layer_modules(model)[0]
    y = torch.randn(3, 64)
    norms = get_adapter(model).norms(block)
    assert {name for name, norm in norms.items() if norm is not None} == set(GEMMA_NORMS[family])
    for name, path in GEMMA_NORMS[family].items():
        module, norm = block.get_submodule(path), norms[name]
        assert norm.kind == "rmsnorm" and norm.bias is None and norm.eps == module.eps
        torch.testing.assert_close(norm.weight, module.weight.detach() + 1, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(norm(y), module(y))


def test_olmo2_norms_are_after_attention_and_ffn_only_and_its_qk_norms_span_the_projection():
    model = tiny_model("olmo2")
    block = model.model.layers[0]
    norms = get_adapter(model).norms(block)
    assert norms["ln1"] is None and norms["ln2"] is None
    for name, module in (("attn_out_norm", block.post_attention_layernorm), ("ffn_out_norm", block.post_feedforward_layernorm)):
        assert norms[name].kind == "rmsnorm" and norms[name].eps == module.variance_epsilon
        torch.testing.assert_close(norms[name].weight, module.weight.detach(), rtol=0, atol=0)
    # q_norm normalises the whole projection (all heads at once), before RoPE: the recorded q has, per token,
    # the squared norm q_norm's output has (RoPE rotates pairs of dimensions)
    seen = {}
    handle = block.self_attn.q_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o))
    try:
        layer = collect(model, token_batch("olmo2", [6]), layers=[0])[0]
    finally:
        handle.remove()
    assert block.self_attn.q_norm.weight.shape == (4 * 16,)
    torch.testing.assert_close(layer.q.pow(2).sum((1, 3)), seen["q"].pow(2).sum(-1))


def test_modernbert_geglu_gate_is_the_first_half_of_wi():
    """ModernBertMLP: input, gate = Wi(x).chunk(2); Wo(act(input) * gate): the activated half is kobattr's gate."""
    model = tiny_model("modernbert")
    block = model.layers[1]
    ffn = get_adapter(model).feed_forward(block, model.config)
    activated, linear = block.mlp.Wi.weight.chunk(2, dim=0)
    b_activated, b_linear = block.mlp.Wi.bias.chunk(2)
    assert ffn.activation == "geglu"
    assert torch.equal(ffn.w_gate, activated.T) and torch.equal(ffn.w_in, linear.T)
    assert torch.equal(ffn.b_gate, b_activated) and torch.equal(ffn.b_in, b_linear)
    z = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(ffn(z), block.mlp(z))


def test_gpt_neox_partial_rotary_leaves_the_rest_of_each_head_unrotated():
    """rotary_pct=0.5: only the first 8 of 16 dimensions of each head are rotated, so the others equal the plain
    projection of LN1(x) (q is the first third of each head's query_key_value output)."""
    model = tiny_model("gpt_neox")
    block = model.gpt_neox.layers[0]
    layer = collect(model, token_batch("gpt_neox", [6]), layers=[0])[0]
    with torch.no_grad():
        qkv = block.attention.query_key_value(block.input_layernorm(layer.x))
    q = qkv.view(1, 6, 4, 3 * 16).transpose(1, 2)[..., :16]
    torch.testing.assert_close(layer.q[..., 8:], q[..., 8:])
    assert not torch.allclose(layer.q[:, :, 1:, :8], q[:, :, 1:, :8])  # position 0 is not rotated


def test_a_slice_that_does_not_divide_the_outputs_is_an_error():
    model = tiny_model("phi3")
    bad = Adapter("bad", ("phi3",), layers="layers", attention="self_attn", out_proj="self_attn.o_proj",
                  ln1="input_layernorm", ln2="post_attention_layernorm", ffn_in="mlp.gate_up_proj[1/3]", ffn_out="mlp.down_proj")
    with pytest.raises(UnsupportedModelError, match="3 equal slices"):
        bad.feed_forward(model.model.layers[0], model.config)
