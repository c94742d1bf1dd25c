"""analyze() on real and random-init Hugging Face models, results, save/load, rollout, words, CLI."""

import json
import os

import pytest
import torch
from random_layers import random_layer
from test_models import DECODERS, TINY, tiny_model, token_batch

import kobattr
from kobattr.api import analyze
from kobattr.cli import main as cli_main
from kobattr.models import capture, load_default_model, residual_stream
from kobattr.reference import reference
from kobattr.result import Attribution, merge_pieces, word_groups

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXTS = ["The cat sat on the mat because it was tired.", "Kobayashi measured norms, not weights!"]


@pytest.fixture(scope="module")
def minilm():
    return load_default_model()


@pytest.fixture(scope="module")
def minilm_result(minilm):
    model, tokenizer = minilm
    return analyze(model, TEXTS, tokenizer=tokenizer, methods="all", heads=True, backend="torch")


def test_minilm_decomposition_is_complete_against_the_model(minilm, minilm_result):
    model, tokenizer = minilm
    res = minilm_result
    assert res.layers == tuple(range(6)) and res.structure == "post"
    assert res.model_error.max() < 1e-5
    assert set(res.completeness) == {"atbff", "atbffres", "atbffresln", "alti", "alti_l2"}
    for m, err in res.completeness.items():
        assert err.max() < 1e-5, m  # parts + bias = the model's own hidden state
    # the captured layers stream exactly the model's own residual stream: input of layer l, output of l
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    stream = residual_stream(model, batch)
    layers = {}
    capture(model, batch, lambda i, layer: layers.__setitem__(i, layer))
    valid = batch["attention_mask"].bool()
    for i, layer in layers.items():
        torch.testing.assert_close(layer.x[valid], stream[i][valid])
        torch.testing.assert_close(layer.forward()["out"][valid], stream[i + 1][valid], rtol=1e-5, atol=1e-5)
    assert len(layers) == len(stream) - 1 == 6


def test_minilm_attention_weights_equal_the_models_own(minilm, minilm_result):
    _, tokenizer = minilm
    eager, _ = load_default_model(attn_implementation="eager")
    with torch.no_grad():
        out = eager(**tokenizer(TEXTS, return_tensors="pt", padding=True), output_attentions=True)
    valid = minilm_result.attention_mask
    pair = valid[:, None, :, None] & valid[:, None, None, :]
    for li, attentions in enumerate(out.attentions):
        ours = minilm_result.head_maps["attn_w"][li]
        torch.testing.assert_close(ours * pair, attentions * pair, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(minilm_result.maps["attn_w"][li], (attentions * pair).mean(1), rtol=1e-5, atol=1e-6)


def test_minilm_sdpa_equals_eager(minilm, minilm_result):
    _, tokenizer = minilm
    eager, _ = load_default_model(attn_implementation="eager")
    res = analyze(eager, TEXTS, tokenizer=tokenizer, methods="all", backend="torch")
    for m in res.methods:
        torch.testing.assert_close(res.maps[m], minilm_result.maps[m], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(TINY))
def test_tiny_models_complete_and_equal_the_reference(family):
    model = tiny_model(family)
    batch = token_batch(family, [9, 6])
    res = analyze(model, batch, methods="all", backend="torch")
    assert res.model_error.max() < 1e-5
    for m, err in res.completeness.items():
        assert err.max() < 1e-5, (family, m)
    layers = {}
    capture(model, batch, lambda i, layer: layers.__setitem__(i, layer))
    for li, layer in layers.items():
        ref = reference(layer, methods="all")
        for m in res.methods:
            expected = ref["maps"][m].float()
            assert (res.maps[m][li] - expected).abs().max() <= 1e-5 * expected.abs().max(), (family, li, m)


@pytest.mark.parametrize("family", list(TINY))
def test_padded_batch_equals_each_text_alone(family):
    model = tiny_model(family)
    side = "left" if family in DECODERS else "right"
    batch = token_batch(family, [8, 5], side=side)
    together = analyze(model, batch, methods="all", backend="torch")
    assert together.spot_check and all(e.max() < 1e-4 for e in together.spot_check.values())
    for b in range(2):
        keep = batch["attention_mask"][b].bool()
        alone = analyze(model, {k: v[b:b + 1, keep] for k, v in batch.items()}, methods="all", backend="torch")
        for m in together.methods:
            joint = together.maps[m][:, b][:, keep][:, :, keep]
            torch.testing.assert_close(joint, alone.maps[m][:, 0], rtol=1e-4, atol=1e-5)
            assert (together.maps[m][:, b][:, ~keep] == 0).all() and (together.maps[m][:, b][:, :, ~keep] == 0).all()
            assert together.ratios[m][:, b][:, ~keep].isnan().all()


def test_rows_and_contraction_modes_through_analyze(minilm, minilm_result):
    model, tokenizer = minilm
    rows = analyze(model, TEXTS, tokenizer=tokenizer, methods=["attnresln_n"], rows=[0, 3], backend="torch")
    torch.testing.assert_close(rows.maps["attnresln_n"], minilm_result.maps["attnresln_n"][:, :, [0, 3]])
    ones = torch.ones(1, rows.attention_mask.shape[1])
    colsum = analyze(model, TEXTS, tokenizer=tokenizer, methods=["attnresln_n"], contract=ones, backend="torch")
    torch.testing.assert_close(colsum.maps["attnresln_n"][:, :, 0], minilm_result.maps["attnresln_n"].sum(2))
    with pytest.raises(ValueError, match="full maps"):
        rows.rollout("attnresln_n")


def test_save_load_round_trip(tmp_path, minilm_result):
    path = minilm_result.save(tmp_path / "res" / "attribution")
    assert path.exists()
    back = Attribution.load(tmp_path / "res" / "attribution")
    for field in ("methods", "layers", "tokens", "structure", "contracted", "ff_amp", "model_name", "backends"):
        assert getattr(back, field) == getattr(minilm_result, field), field
    for group in ("maps", "ratios", "bias_norms", "completeness", "head_maps", "context_change", "spot_check"):
        a, b = getattr(minilm_result, group), getattr(back, group)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=f"{group} {k}")
    assert torch.equal(back.value_norms, minilm_result.value_norms)
    assert torch.equal(back.attention_mask, minilm_result.attention_mask)


def test_rollout_matches_a_plain_loop(minilm_result):
    res = minilm_result
    for method, add_residual in (("attn_w", True), ("attnresln_n", False)):
        b = 0
        valid = res.attention_mask[b]
        n = int(valid.sum())
        expected = torch.eye(n, dtype=torch.float64)
        for layer in res.maps[method][:, b, :n, :n].double():
            step = layer / layer.sum(-1, keepdim=True)
            if add_residual:
                step = 0.5 * step + 0.5 * torch.eye(n, dtype=torch.float64)
            expected = step @ expected
        got = res.rollout(method)[b, :n, :n]
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got.sum(-1), torch.ones(n, dtype=torch.float64))


@pytest.mark.parametrize("tokens,scheme,groups", [
    (["[CLS]", "kob", "##att", "##r", "works", "[SEP]"], "auto", [[0], [1, 2, 3], [4], [5]]),
    (["The", "\u0120kob", "att", "r", "\u0120works"], "auto", [[0], [1, 2, 3], [4]]),
    (["<s>", "\u2581kob", "att", "\u2581works", "</s>"], "auto", [[0], [1, 2], [3], [4]]),
])
def test_word_groups(tokens, scheme, groups):
    assert word_groups(tokens, scheme) == groups


def test_merge_sums_sources_and_averages_targets():
    maps = torch.arange(16.0).view(4, 4)
    merged = merge_pieces(maps, [[0], [1, 2], [3]])
    assert merged[1, 0] == (maps[1, 0] + maps[2, 0]) / 2
    assert merged[0, 1] == maps[0, 1] + maps[0, 2]
    assert merged[1, 1] == (maps[1:3, 1:3].sum()) / 2


def test_word_maps_of_minilm(minilm_result):
    maps, words = minilm_result.word_maps("attnresln_n", batch=1)
    assert words[0] == "[CLS]" and words[-1] == "[SEP]" and "kobayashi" in words
    assert maps.shape == (6, len(words), len(words))


def test_cli_analyze_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["analyze", "The cat sat on the mat.", "A second text.", "--out", str(out),
                     "--methods", "attn_w", "attnresln_n", "--backend", "torch"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "attnresln_n" in printed and "mean context-mixing ratio" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"attn_w", "attnresln_n"} and len(summary["attn_w"]) == 6
    for k in ("text000", "text001"):
        assert (out / k / "attribution.safetensors").exists() and (out / k / "report.html").exists()
        assert (out / k / "attnresln_n_layer6.png").stat().st_size > 1000
    assert (out / "mixing_ratios.png").exists()
    loaded = [Attribution.load(out / k / "attribution") for k in ("text000", "text001")]
    pooled = torch.cat([r.ratios["attnresln_n"].flatten(1) for r in loaded], 1).nanmean(1)
    assert pooled.tolist() == pytest.approx(summary["attnresln_n"], rel=1e-6)


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["analyze", "x", "--methods", "bogus", "--out", str(tmp_path), "--backend", "torch"]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["analyze", "x", "--model", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        cli_main(["frobnicate"])


def test_cli_info(capsys):
    assert cli_main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "torch" in printed and "backends:" in printed and kobattr.__version__ in printed


def test_unsupported_model_is_a_clear_error():
    from transformers import AutoModel, T5Config

    from kobattr.models import UnsupportedModelError

    model = AutoModel.from_config(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=50, d_kv=16))
    with pytest.raises(UnsupportedModelError, match="t5"):
        analyze(model, {"input_ids": torch.ones(1, 3, dtype=torch.long)})


def test_text_without_tokenizer_is_a_clear_error(minilm):
    with pytest.raises(ValueError, match="tokenizer"):
        analyze(minilm[0], "some text")


def test_layer_selection(minilm):
    model, tokenizer = minilm
    res = analyze(model, TEXTS[0], tokenizer=tokenizer, layers=[-1, 2], methods=["attn_n"], backend="torch")
    assert res.layers == (2, 5)
    with pytest.raises(ValueError, match="does not exist"):
        analyze(model, TEXTS[0], tokenizer=tokenizer, layers=[6])


def test_random_layer_helper_is_usable_for_attribute():
    # a guard that the public per-layer entry point is exported
    res = kobattr.attribute(random_layer("bert"), methods=["attn_n"], backend="torch")
    assert res.maps["attn_n"].shape == (2, 7, 7)


def test_source_tree_kernels_folder_says_why_it_cannot_stand_in_for_hugging_faces():
    """From the repository root, kernels/ would be imported as the top-level `kernels` that transformers
    imports (Hugging Face's package): it refuses with a sentence instead of a missing-name error."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", "import kernels"], cwd=root, capture_output=True, text=True)
    assert run.returncode != 0 and "installed as kobattr.kernels" in run.stderr
    run = subprocess.run([sys.executable, "-c", "import kobattr.kernels.rows, kobattr.models"],
                         cwd=tempfile.gettempdir(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
