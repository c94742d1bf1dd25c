"""Gradient importance of attention (Clark et al. 2019, section 3.2; kobattr.analyses.gradient): dL/d alpha
against autograd on the eager model and against finite differences, padding, the masking recipe, the
category means against a plain loop, the head check and the restored attention implementation."""

import copy
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from test_cli import run
from transformers import (AttentionInterface, AutoModelForCausalLM, BertConfig, BertForMaskedLM, BertModel, GPT2Config,
                          LlamaConfig)
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from kobattr.analyses import gradient
from kobattr.analyses.gradient import MissingMLMHeadError, attention_gradients, gradient_importance, mask_tokens
from kobattr.models import default_model_path, load_default_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXTS = ["The cat sat on the mat, and then it slept.", "Hello.", "A dog, a cat and a bird ran home."]


@pytest.fixture(scope="module")
def wordpiece():
    return load_default_model()[1]


def tiny_bert(vocab_size, head=True, attn="sdpa"):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=vocab_size, max_position_embeddings=64, attn_implementation=attn)
    return (BertForMaskedLM if head else BertModel)(config).eval()


def tiny_llama(attn="sdpa"):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=30522, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def tiny_gpt2(attn="sdpa"):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=30522, n_positions=64, initializer_range=0.1)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


MODELS = {"bert": lambda tok: tiny_bert(len(tok)), "llama": lambda tok: tiny_llama(), "gpt2": lambda tok: tiny_gpt2()}


def eager_copy(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def encode(tokenizer, texts):
    """A right-padded batch of ``texts`` and their lengths."""
    ids = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    batch = {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
             "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}
    return batch, [len(i) for i in ids]


def mlm_labels(tokenizer, batch, lengths, seed=0):
    """Masked inputs and labels by the documented recipe and seeding, text t draw 0 -> rng([seed, t, 0])."""
    ids, labels = batch["input_ids"].clone(), torch.full_like(batch["input_ids"], -100)
    for t, n in enumerate(lengths):
        masked, positions, _ = mask_tokens(ids[t, :n].tolist(), tokenizer, np.random.default_rng([seed, t, 0]),
                                           vocab_size=len(tokenizer))
        labels[t, positions] = ids[t, positions]
        ids[t, :n] = torch.tensor(masked)
    return {**batch, "input_ids": ids}, labels


def causal_labels(batch, lengths):
    labels = torch.full_like(batch["input_ids"], -100)
    for t, n in enumerate(lengths):
        labels[t, :n - 1] = batch["input_ids"][t, 1:n]
    return labels


def per_example_loss(logits, labels):
    """Sum over examples of each example's mean cross-entropy over its targets, by a loop."""
    total = 0
    for b in range(labels.shape[0]):
        keep = labels[b] != -100
        total = total + torch.nn.functional.cross_entropy(logits[b][keep], labels[b][keep])
    return total


# ------------------------------------------------------------------------------- gradients vs autograd
@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_gradients_match_autograd_on_the_eager_model(wordpiece, family):
    model = MODELS[family](wordpiece)
    assert model.config._attn_implementation == "sdpa"
    batch, lengths = encode(wordpiece, TEXTS[:2])
    if family == "bert":
        batch, labels = mlm_labels(wordpiece, batch, lengths)
    else:
        labels = causal_labels(batch, lengths)
    got = attention_gradients(model, batch, labels=labels)
    twin = eager_copy(model)
    out = twin(**batch, output_attentions=True)
    grads = torch.autograd.grad(per_example_loss(out.logits, labels), out.attentions)
    assert all(g is not None for g in grads)
    torch.testing.assert_close(got["alpha"], torch.stack(out.attentions).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["grad"], torch.stack(grads), rtol=1e-4, atol=1e-7)
    assert got["grad"].abs().max() > 0
    assert model.config._attn_implementation == "sdpa"  # only switched for the call


def _perturbing_attention(target, index, delta):
    """Eager attention written out (GQA repeated) that adds ``delta`` to alpha[index] in module ``target``."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        scores = query @ key.transpose(2, 3) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        alpha = torch.softmax(scores, -1)
        if module is target:
            bump = torch.zeros_like(alpha)
            bump[index] = delta
            alpha = alpha + bump
        return (alpha @ value).transpose(1, 2).contiguous(), alpha
    return attention


# GPT-2 as the causal LM: Llama's RMSNorm computes in float32 even in a float64 model, which would drown the
# finite differences in rounding
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_gradients_match_finite_differences(wordpiece, family):
    model = MODELS[family](wordpiece).double()
    batch, lengths = encode(wordpiece, TEXTS[:2])
    batch, labels = (mlm_labels(wordpiece, batch, lengths) if family == "bert"
                     else (batch, causal_labels(batch, lengths)))
    got = attention_gradients(model, batch, labels=labels)["grad"]
    twin = copy.deepcopy(model)
    layers = twin.base_model.encoder.layer if family == "bert" else twin.base_model.h
    AttentionMaskInterface.register("test_fd", eager_mask)
    twin.config._attn_implementation = "test_fd"
    eps = 1e-4  # central differences: O(eps^2) error, and far above the loss's rounding
    # per layer and text, the visible entry of largest gradient (in the last layer only rows of loss positions
    # have any) and one fixed early entry
    entries = [(0, 0, 1, 3, 2)]
    for li in range(2):
        for b, n in enumerate(lengths):
            g = got[li, b, :, :n, :n].abs()
            if family == "gpt2":
                g = g.tril()
            h, i, j = np.unravel_index(int(g.argmax()), g.shape)
            entries.append((li, b, int(h), int(i), int(j)))
    for li, b, h, i, j in entries:
        target = layers[li].attention.self if family == "bert" else layers[li].attn
        losses = []
        for delta in (eps, -eps):
            AttentionInterface.register("test_fd", _perturbing_attention(target, (b, h, i, j), delta))
            with torch.no_grad():
                losses.append(per_example_loss(twin(**batch).logits.double(), labels).item())
        fd = (losses[0] - losses[1]) / (2 * eps)
        assert fd == pytest.approx(got[li, b, h, i, j].item(), rel=1e-5, abs=1e-10)
        assert abs(fd) > 1e-8


def test_loss_is_the_models_own_per_example(wordpiece):
    bert, llama = tiny_bert(len(wordpiece)), tiny_llama()
    batch, lengths = encode(wordpiece, TEXTS[:1])
    masked, labels = mlm_labels(wordpiece, batch, lengths)
    assert attention_gradients(bert, masked, labels=labels)["loss"].item() == pytest.approx(
        bert(**masked, labels=labels).loss.item(), rel=1e-6)
    assert attention_gradients(llama, batch, labels=causal_labels(batch, lengths))["loss"].item() == pytest.approx(
        llama(**batch, labels=batch["input_ids"]).loss.item(), rel=1e-6)


# ------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_padded_batch_gives_each_text_its_result_alone(wordpiece, family):
    model = tiny_bert(len(wordpiece)) if family == "bert" else tiny_llama()
    texts = [TEXTS[0], TEXTS[1]]  # 14 and 4 tokens: the second is padded by 10
    together = gradient_importance(model, wordpiece, texts, batch_size=2)
    alone = gradient_importance(model, wordpiece, texts, batch_size=1)
    for key in ("grad_abs", "grad_x_input", "alpha", "fx_norm", "pairs"):
        for c in gradient.CATEGORIES:
            assert together[key][c] == pytest.approx(alone[key][c], rel=1e-5, abs=1e-9)
    assert together["loss_mean"] == pytest.approx(alone["loss_mean"], rel=1e-6)
    # the maps themselves: the short text's rows and keys in the padded batch equal the text run alone
    batch, lengths = encode(wordpiece, texts)
    labels = causal_labels(batch, lengths)
    joint = attention_gradients(model, batch, labels=labels)
    n = lengths[1]
    assert n < lengths[0]
    single = attention_gradients(model, {k: v[1:, :n] for k, v in batch.items()}, labels=labels[1:, :n])
    for key in ("grad", "alpha"):
        torch.testing.assert_close(joint[key][:, 1, :, :n, :n], single[key][:, 0], rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------- masking
def test_masking_counts_positions_kinds_and_seed(wordpiece):
    special = {wordpiece.cls_token_id, wordpiece.sep_token_id}
    for words in (3, 12, 40, 300):
        ids = wordpiece(" ".join(["cat"] * words))["input_ids"]
        T = len(ids)
        masked, positions, kinds = mask_tokens(ids, wordpiece, np.random.default_rng(0))
        assert len(positions) == min(20, max(1, round(0.15 * T))) == len(set(positions))
        assert not special & {ids[p] for p in positions}
        for p, kind in zip(positions, kinds):
            assert (masked[p] == wordpiece.mask_token_id) == (kind == "mask") or kind == "random"
            if kind == "keep":
                assert masked[p] == ids[p]
        assert [masked[p] for p in range(T) if p not in positions] == [ids[p] for p in range(T) if p not in positions]
    ids = wordpiece(" ".join(["dog"] * 60))["input_ids"]
    draws = [mask_tokens(ids, wordpiece, np.random.default_rng([0, 0, d])) for d in range(2)]
    assert mask_tokens(ids, wordpiece, np.random.default_rng([0, 0, 0])) == draws[0]
    assert draws[0][1] != draws[1][1]
    kinds = [k for d in range(1500) for k in mask_tokens(ids, wordpiece, np.random.default_rng(d))[2]]
    n = len(kinds)  # 9 per draw
    for kind, p in (("mask", 0.8), ("random", 0.1), ("keep", 0.1)):
        assert abs(kinds.count(kind) / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    mask_only = [k for d in range(20) for k in mask_tokens(ids, wordpiece, np.random.default_rng(d), 0.15, (1, 0, 0))[2]]
    assert set(mask_only) == {"mask"}


def test_gradient_importance_masking_is_seeded(wordpiece):
    model = tiny_bert(len(wordpiece))
    a = gradient_importance(model, wordpiece, TEXTS, seed=0)
    assert gradient_importance(model, wordpiece, TEXTS, seed=0) == a
    b = gradient_importance(model, wordpiece, TEXTS, seed=1)
    assert b["loss_mean"] != a["loss_mean"]
    two = gradient_importance(model, wordpiece, TEXTS, n_draws=2)
    T = [len(wordpiece(t)["input_ids"]) for t in TEXTS]
    assert two["examples"] == 6 and two["masking"]["masked_positions"] == 2 * sum(max(1, round(0.15 * t)) for t in T)
    m = two["masking"]
    assert m["mask"] + m["random"] + m["keep"] == m["masked_positions"]


# ------------------------------------------------------------------------------- aggregation
def loop_means(out, categories, lengths, causal, agg):
    """Per (layer, category): pooled mean (or per-row mass) of each quantity over heads, rows and keys."""
    L, _, H = out["alpha"].shape[:3]
    res = {}
    for c in gradient.CATEGORIES:
        for q in ("grad_abs", "grad_x_input", "alpha", "fx_norm"):
            res.setdefault(q, {})[c] = []
        for li in range(L):
            sums = {q: 0.0 for q in ("grad_abs", "grad_x_input", "alpha")}
            pairs = rows = 0
            fx, keys = 0.0, 0
            for b, n in enumerate(lengths):
                for h in range(H):
                    for j in range(n):
                        if categories[b][j] == c:
                            fx += float(out["value_norms"][li, b, h, j])
                            keys += 1
                    for i in range(n):
                        rows += 1
                        for j in range(i + 1 if causal else n):
                            if categories[b][j] != c:
                                continue
                            a, g = float(out["alpha"][li, b, h, i, j]), float(out["grad"][li, b, h, i, j])
                            sums["grad_abs"] += abs(g)
                            sums["grad_x_input"] += a * g
                            sums["alpha"] += a
                            pairs += 1
            for q, s in sums.items():
                res[q][c].append((s / (pairs if agg == "mean" else rows)) if pairs else None)
            res["fx_norm"][c].append(fx / keys if keys else None)
    return res


def direct_categories(tokenizer, ids, n):
    """Category names of one text by the token strings themselves."""
    names = []
    for tok in tokenizer.convert_ids_to_tokens(ids[:n]):
        names.append("cls_bos" if tok == "[CLS]" else "sep_eos" if tok == "[SEP]" else
                     "punct" if tok in (".", ",") else "other")
    return names


@pytest.mark.parametrize("family,agg", [("bert", "mean"), ("bert", "mass"), ("llama", "mean")])
def test_category_means_match_a_direct_loop(wordpiece, family, agg):
    model = tiny_bert(len(wordpiece)) if family == "bert" else tiny_llama()
    batch, lengths = encode(wordpiece, TEXTS)
    cats = [direct_categories(wordpiece, batch["input_ids"][b].tolist(), n) for b, n in enumerate(lengths)]
    inputs, labels = mlm_labels(wordpiece, batch, lengths) if family == "bert" else (batch, causal_labels(batch, lengths))
    expected = loop_means(attention_gradients(model, inputs, labels=labels), cats, lengths, family == "llama", agg)
    got = gradient_importance(model, wordpiece, TEXTS, agg=agg)
    for q, per_cat in expected.items():
        for c, values in per_cat.items():
            assert got[q][c] == pytest.approx(values, rel=1e-5, abs=1e-12), (q, c)
    assert got["measure"] == gradient.MEASURE
    assert got["objective"] == ("masked-LM loss" if family == "bert" else "next-token loss")
    json.dumps(got, allow_nan=False)


def test_value_norms_are_kobattrs(wordpiece):
    from kobattr import analyze

    model = tiny_bert(len(wordpiece))
    batch, lengths = encode(wordpiece, TEXTS[:1])
    masked, labels = mlm_labels(wordpiece, batch, lengths)
    got = attention_gradients(model, masked, labels=labels)["value_norms"]
    ref = analyze(model, masked, methods=["attn_w"], heads=True, backend="torch").value_norms
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- head check, objective
def test_model_without_head_is_refused_in_one_sentence(wordpiece, tmp_path):
    minilm = load_default_model()[0]
    for model in (tiny_bert(len(wordpiece), head=False), minilm):
        with pytest.raises(MissingMLMHeadError, match=r"load_with_head.*objective=") as err:
            gradient_importance(model, wordpiece, TEXTS[:1])
        message = str(err.value)
        assert isinstance(err.value, ValueError) and message.endswith(".") and "\n" not in message
        assert re.search(r"\. [A-Z]", message) is None  # one sentence
    with pytest.raises(MissingMLMHeadError, match="cls.predictions"):
        gradient.load_with_head(default_model_path())
    tiny_bert(len(wordpiece), head=False).save_pretrained(tmp_path / "bare")
    with pytest.raises(MissingMLMHeadError):
        gradient.load_with_head(tmp_path / "bare")
    tiny_bert(len(wordpiece)).save_pretrained(tmp_path / "mlm")
    wordpiece.save_pretrained(tmp_path / "mlm")
    model, tokenizer = gradient.load_with_head(tmp_path / "mlm")
    assert type(model).__name__ == "BertForMaskedLM" and tokenizer.mask_token == "[MASK]"
    tiny_llama().save_pretrained(tmp_path / "llama")
    wordpiece.save_pretrained(tmp_path / "llama")
    assert type(gradient.load_with_head(tmp_path / "llama")[0]).__name__ == "LlamaForCausalLM"


def test_custom_objective_on_a_headless_model(wordpiece):
    model = tiny_bert(len(wordpiece), head=False)
    objective = lambda out: out.last_hidden_state[0, 0].pow(2).sum()  # noqa: E731
    batch, _ = encode(wordpiece, TEXTS[:1])
    got = attention_gradients(model, batch, objective=objective)
    out = eager_copy(model)(**batch, output_attentions=True)
    torch.testing.assert_close(got["grad"], torch.stack(torch.autograd.grad(objective(out), out.attentions)),
                               rtol=1e-4, atol=1e-7)
    result = gradient_importance(model, wordpiece, TEXTS[:2], objective=objective)
    assert result["measure"] == "custom-objective (not Clark 2019)" and "masking" not in result


def test_attention_implementation_and_mode_are_restored(wordpiece):
    model = tiny_bert(len(wordpiece))
    batch, _ = encode(wordpiece, TEXTS[:2])
    before = model(**batch).logits
    model.train()
    configs = gradient._configs(model)
    assert len(configs) >= 1 and {c._attn_implementation for c in configs} == {"sdpa"}

    def failing(out):
        raise RuntimeError("objective failed")

    with pytest.raises(RuntimeError, match="objective failed"):
        gradient_importance(model, wordpiece, TEXTS[:1], objective=failing)
    gradient_importance(model, wordpiece, TEXTS[:1])
    assert {c._attn_implementation for c in configs} == {"sdpa"} and model.training
    assert not gradient._ACTIVE
    model.eval()
    torch.testing.assert_close(model(**batch).logits, before)


# ------------------------------------------------------------------------------- CLI, report
def test_cli_heads_gradient(wordpiece, tmp_path, capsys):
    tiny_bert(len(wordpiece)).save_pretrained(tmp_path / "mlm")
    wordpiece.save_pretrained(tmp_path / "mlm")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS), encoding="utf-8")
    code, printed, err = run(["heads", "--model", str(tmp_path / "mlm"), "--file", str(texts), "--gradient",
                              "--out", str(tmp_path / "out"), "--backend", "torch"], capsys)
    assert code == 0, err
    assert "mean |dL/d alpha|" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["gradient"]["measure"] == gradient.MEASURE and results["gradient"]["texts"] == 3
    assert (tmp_path / "out" / "gradient_importance.png").stat().st_size > 0
    assert "gradient_importance.png" in (tmp_path / "out" / "report.md").read_text()
    code, _, err = run(["heads", "--file", str(texts), "--gradient", "--out", str(tmp_path / "out2")], capsys)
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("kobattr heads: error: --gradient needs")
    assert "--mlm-model PATH" in errors[0]
    code, _, err = run(["heads", "--mlm-model", str(tmp_path / "mlm"), "--out", str(tmp_path / "out3")], capsys)
    assert code == 2 and "add --gradient" in err
