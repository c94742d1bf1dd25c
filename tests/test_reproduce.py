"""kobattr reproduce on a slice of the corpus: files written, numbers equal to a direct analyze(), determinism
(the function and the command give the same results.json), and the rejection of families the findings are not
about."""

import json
import os

import pytest
import torch

from kobattr.api import analyze
from kobattr.cli import main as cli_main
from kobattr.models import load_default_model
from kobattr.reproduce import CORPUS_PATH, reproduce

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LIMIT = 4
BATCH_SIZE = 2  # two batches, so batching by length is exercised
FIGURES = ("mixing_ratio_by_layer.png", "noop_2020.png", "frequency_2021.png", "context_change_2024.png")


@pytest.fixture(scope="module")
def minilm():
    return load_default_model()


@pytest.fixture(scope="module")
def first_run(minilm, tmp_path_factory):
    model, tokenizer = minilm
    out = tmp_path_factory.mktemp("reproduce")
    results = reproduce(model, tokenizer, out_dir=out, limit=LIMIT, batch_size=BATCH_SIZE, progress=False)
    return out, results


def _masked_slice(tokenizer):
    """The first LIMIT sentences masked as the brief defines it, written independently of kobattr.reproduce:
    one uniform draw per token in corpus order from a generator seeded 0; ordinary tokens below 0.12 masked."""
    sentences = CORPUS_PATH.read_text(encoding="utf-8").splitlines()[:LIMIT]
    generator = torch.Generator().manual_seed(0)
    specials = set(tokenizer.all_special_ids)
    masked = []
    for sentence in sentences:
        ids = tokenizer(sentence)["input_ids"]
        draws = torch.rand(len(ids), generator=generator)
        masked.append([tokenizer.mask_token_id if t not in specials and u < 0.12 else t for t, u in zip(ids, draws)])
    return masked


def test_writes_report_results_and_figures(first_run):
    out, results = first_run
    for name in ("report.md", "results.json", *FIGURES):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text()) == results
    report = (out / "report.md").read_text()
    assert "Kobayashi et al. 2021, Table 1" in report and "97.1" in report and "not BERT-base" in report
    for figure in FIGURES:
        assert f"]({figure})" in report
    assert results["corpus"]["sentences"] == LIMIT and results["corpus"]["masked_tokens"] > 0


def test_numbers_equal_a_direct_analysis(minilm, first_run):
    model, tokenizer = minilm
    _, results = first_run
    masked = _masked_slice(tokenizer)
    assert results["corpus"]["masked_tokens"] == sum(t == tokenizer.mask_token_id for ids in masked for t in ids)
    batch = tokenizer.pad({"input_ids": masked}, return_tensors="pt")
    direct = analyze(model, batch, tokenizer=tokenizer, methods="all")
    valid = direct.attention_mask

    for method in ("attnresln_n", "attn_w"):
        assert results["table_2021"][method]["mean"] == pytest.approx(
            100 * direct.ratios[method].double().nanmean().item(), abs=1e-6)

    # share of ATTN-N row norms going to [SEP] keys in layer 1, averaged over every real query row
    maps = direct.maps["attn_n"][0].double()
    shares = maps / maps.sum(-1, keepdim=True)
    to_sep = (shares * (batch["input_ids"] == tokenizer.sep_token_id)[:, None, :]).sum(-1)
    assert results["noop_2020"]["attn_n"]["sep"][0] == pytest.approx(100 * to_sep[valid].mean().item(), abs=1e-6)

    assert results["context_change_2024"]["ff"][2] == pytest.approx(
        direct.context_change["ff"][2].double().mean().item(), abs=1e-6)


def test_the_cli_reproduces_the_same_results_and_prints_the_table(first_run, tmp_path, capsys):
    out, _ = first_run
    assert cli_main(["reproduce", "--limit", str(LIMIT), "--batch-size", str(BATCH_SIZE), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "report.md") in printed and "| ATTNRESLN-N |" in printed
    # deterministic: a second run, through the command, writes the same results.json
    assert (tmp_path / "results.json").read_text() == (out / "results.json").read_text()


def test_gpt2_is_rejected_with_a_clear_error(minilm, tmp_path):
    from transformers import GPT2Config, GPT2Model

    _, tokenizer = minilm
    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=64)).eval()
    with pytest.raises(ValueError, match="BERT, RoBERTa.*GPT-2"):
        reproduce(gpt2, tokenizer, out_dir=tmp_path, limit=2, progress=False)
    assert not (tmp_path / "report.md").exists()
