"""analyze() answers every input: index arguments, methods, empty and too long texts, NaN, missing pad tokens."""

import numpy as np
import pytest
import torch
from test_models import tiny_model, token_batch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from kobattr.api import analyze
from kobattr.layer import LayerInputError
from kobattr.models import load_default_model

TEXTS = ["the cat sat on the mat", "a dog ran"]


@pytest.fixture(scope="module")
def minilm():
    return load_default_model()


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE tokenizer with an EOS token and no pad token, like GPT-2's and Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    assert tokenizer.pad_token is None
    return tokenizer


def _decoder(family):
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=320, n_positions=40, initializer_range=0.1)
    else:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=320, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenizer_without_pad_token_pads_with_eos_on_its_side(byte_tokenizer, family, side):
    model = _decoder(family)
    byte_tokenizer.padding_side = side
    together = analyze(model, TEXTS, tokenizer=byte_tokenizer, methods=["attn_w", "attnresln_n"], backend="torch")
    assert byte_tokenizer.pad_token is None  # the caller's tokenizer is left as it was
    mask = together.attention_mask
    assert mask[1].sum() < mask.shape[1] and (mask[1, 0] if side == "right" else mask[1, -1])
    for b, text in enumerate(TEXTS):
        alone = analyze(model, text, tokenizer=byte_tokenizer, methods=["attn_w", "attnresln_n"], backend="torch")
        keep = mask[b]
        for m in together.methods:
            joint = together.maps[m][:, b][:, keep][:, :, keep]
            torch.testing.assert_close(joint, alone.maps[m][:, 0], rtol=1e-4, atol=1e-5)


def test_cli_with_a_tokenizer_without_pad_token(byte_tokenizer, tmp_path, capsys):
    from kobattr.cli import main

    model = _decoder("gpt2")
    model.save_pretrained(tmp_path / "model")
    byte_tokenizer.save_pretrained(tmp_path / "model")
    assert main(["analyze", *TEXTS, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                 "--no-plots", "--methods", "attn_n"]) == 0
    assert "mean context-mixing ratio" in capsys.readouterr().out


@pytest.mark.parametrize("layers,message", [
    ([], "layers is empty"),
    ((i for i in [0, 1]), "got generator"),
    ([True], "got True"),
    ([0.0], "got 0.0"),
    (np.array([0.5]), "float64"),
    ([6], "layer 6 does not exist; the model has 6 layers"),
    ([-7], "layer -7 does not exist"),
])
def test_bad_layer_indices(minilm, layers, message):
    model, tokenizer = minilm
    with pytest.raises(LayerInputError, match=message):
        analyze(model, TEXTS[0], tokenizer=tokenizer, layers=layers)


def test_integer_indices_of_any_kind(minilm):
    model, tokenizer = minilm
    expected = analyze(model, TEXTS[0], tokenizer=tokenizer, methods=["attn_n"], layers=[1, 4], rows=[0, 2])
    for layers, rows in ((np.array([1, 4]), np.array([0, 2])), (torch.tensor([4, 1]), torch.tensor([0, 2])),
                         ((np.int64(1), 4), [np.int32(0), 2]), (range(1, 5, 3), range(0, 3, 2))):
        got = analyze(model, TEXTS[0], tokenizer=tokenizer, methods=["attn_n"], layers=layers, rows=rows)
        assert got.layers == (1, 4)
        torch.testing.assert_close(got.maps["attn_n"], expected.maps["attn_n"])
    assert analyze(model, TEXTS[0], tokenizer=tokenizer, methods=["attn_n"], layers=np.int64(-1)).layers == (5,)


@pytest.mark.parametrize("rows,message", [([True, False], "got True"), ((r for r in [0]), "generator"),
                                          ([], "rows is empty"), ([99], r"in \[0, 8\)")])
def test_bad_rows(minilm, rows, message):
    model, tokenizer = minilm
    with pytest.raises(LayerInputError, match=message):
        analyze(model, TEXTS[0], tokenizer=tokenizer, rows=rows, methods=["attn_n"])


@pytest.mark.parametrize("methods,message", [
    (["all", "attn_w"], "'all' cannot be mixed"), ([None], "must be strings"), (["attn_w", 3], "must be strings"),
    ([], "no methods"), (["atblnff"], "defined for pre"), (7, "must be a name"),
])
def test_bad_methods(minilm, methods, message):
    model, tokenizer = minilm
    with pytest.raises(ValueError, match=message):
        analyze(model, TEXTS[0], tokenizer=tokenizer, methods=methods)


def test_empty_and_too_long_inputs(minilm, byte_tokenizer):
    model, tokenizer = minilm
    with pytest.raises(ValueError, match="no tokens"):
        analyze(model, {"input_ids": torch.zeros(1, 0, dtype=torch.long)})
    with pytest.raises(ValueError, match="empty list"):
        analyze(model, [], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="text 1 .* no tokens"):
        analyze(_decoder("gpt2"), ["abc", ""], tokenizer=byte_tokenizer)
    long_text = "word " * 600
    with pytest.raises(LayerInputError, match=r"at most 512 positions; truncate with max_length=512 \(CLI: --max-length 512\)"):
        analyze(model, long_text, tokenizer=tokenizer)
    res = analyze(model, long_text, tokenizer=tokenizer, max_length=20, methods=["attn_w"], layers=[0])
    assert res.maps["attn_w"].shape[-1] == 20
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        analyze(model, TEXTS[0], tokenizer=tokenizer, max_length=0)


def test_nan_names_the_layer():
    model = tiny_model("roberta")
    with torch.no_grad():
        model.encoder.layer[1].attention.self.query.weight[0, 0] = float("nan")
    with pytest.raises(LayerInputError, match="layer 1: q contains NaN"):
        analyze(model, token_batch("roberta", [6]), backend="torch")


def test_repr_is_a_short_summary(minilm):
    model, tokenizer = minilm
    res = analyze(model, TEXTS, tokenizer=tokenizer, methods=["attn_w", "attnresln_n"], layers=[0, 1])
    text = repr(res)
    assert text.startswith("Attribution(") and "tensor(" not in text and len(text) < 400
    assert "layers [0, 1]" in text and "2 text(s)" in text and "attention_maps=" in text
