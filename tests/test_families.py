"""The families added after the first six (issue 11): XLM-RoBERTa, ELECTRA, DistilBERT, Qwen3, Phi-3; and Gemma.

Capture reproducing each tiny model's hidden states (sdpa and eager), padding, and analyze()'s completeness
and agreement with the reference run for them through the TINY / EXPECTED tables of test_models.py; here:
analyze() on padded batches, the CLI on saved checkpoints with trained tokenizers, and what is particular
to each family (ELECTRA's embedding projection, Qwen3's q/k norms, Phi-3's fused projections, Gemma's
(1 + weight) RMSNorm).
"""

import json
import os

import pytest
import torch
from test_models import TINY, collect, tiny_model, token_batch
from transformers import AutoModel, PreTrainedTokenizerFast

from kobattr.cli import main as cli_main
from kobattr.models import SUPPORTED_FAMILIES, UnsupportedModelError, get_adapter
from kobattr.models.adapters import Adapter
from kobattr.result import Attribution

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NEW = ("xlm-roberta", "electra", "distilbert", "qwen3", "phi3", "gemma")
TEXTS = ["the cat sat on the mat", "a dog ran"]


def test_new_families_are_supported_and_named():
    assert {"XLM-RoBERTa", "ELECTRA", "DistilBERT", "Qwen3", "Phi-3", "Gemma"} <= set(SUPPORTED_FAMILIES)
    assert set(NEW) <= set(TINY)
    for family in NEW:
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


@pytest.mark.parametrize("family", NEW)
def test_cli_on_a_saved_tiny_model(family, tmp_path, capsys):
    auto, make_config = TINY[family]
    config = make_config()
    config.vocab_size = 320
    torch.manual_seed(0)
    model = AutoModel.from_config(config, attn_implementation="sdpa").eval()
    tokenizer = trained_tokenizer(family)
    if family in ("xlm-roberta", "electra", "distilbert", "gemma"):
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


def test_gemma_norms_scale_by_one_plus_weight():
    model = tiny_model("gemma")
    block = model.model.layers[0]
    y = torch.randn(3, 64)
    for module, norm in zip((block.input_layernorm, block.post_attention_layernorm), get_adapter(model).norms(block)):
        assert norm.kind == "rmsnorm" and norm.bias is None and norm.eps == module.eps
        torch.testing.assert_close(norm.weight, module.weight.detach() + 1, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(norm(y), module(y))


def test_a_slice_that_does_not_divide_the_outputs_is_an_error():
    model = tiny_model("phi3")
    bad = Adapter("bad", ("phi3",), layers="layers", attention="self_attn", out_proj="self_attn.o_proj",
                  ln1="input_layernorm", ln2="post_attention_layernorm", ffn_in="mlp.gate_up_proj[1/3]", ffn_out="mlp.down_proj")
    with pytest.raises(UnsupportedModelError, match="3 equal slices"):
        bad.feed_forward(model.model.layers[0], model.config)
