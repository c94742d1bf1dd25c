"""Encoder-decoder models through kobattr.analyze (issue 12): teacher forcing on target texts or ready tensors, the
decoder maps of spec section 7 in a Seq2SeqAttribution with the encoder's Attribution inside, save/load of both in
one file, and `kobattr align` end to end on a tiny Marian whose last cross-attention is planted."""

import dataclasses
import json
import os

import pytest
import torch
from test_persistence import assert_same, rewrite_header
from test_seq2seq import decoder_layers, tiny_seq2seq

import kobattr
from kobattr.alignment import read_pharaoh
from kobattr.cli import MANIFEST
from kobattr.cli import main as cli_main
from kobattr.layer import LayerInputError
from kobattr.result import Attribution, AttributionFileError, Seq2SeqAttribution, decoder_map_width
from kobattr.seq2seq import CROSS_METHODS, DECODER_SELF_METHODS, attribute_decoder, cross_reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAMILIES = ["marian", "bart", "m2m_100"]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "__xx__"]  # ids 0-4: BOS 0, pad 1, EOS 2 as the tiny configs
SOURCE_WORDS = "ka ki ku ke ko sa si".split()
TARGET_WORDS = "ta ti tu te to".split()


def word_tokenizer():
    """One token per word ("▁ka", SentencePiece-style markers, so that words are pieces), every text wrapped as
    "__xx__ words </s>" on both sides (a language code first, as M2M-100 / NLLB do); __xx__ is an additional special
    token, so it is in all_special_ids; <unk> is the unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([" ".join(SOURCE_WORDS + TARGET_WORDS)], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="__xx__ $A </s>",
                                                       special_tokens=[("__xx__", 4), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=["__xx__"])


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


SOURCES = ["ka ki ku ke ko", "si ku ka sa", "ko ke"]
TARGETS = ["ta ti tu te", "to te ti", "tu to ta ti te"]


def batch_of(result):
    """The model inputs a Seq2SeqAttribution was computed from."""
    return dict(input_ids=result.source_ids, attention_mask=result.source_mask.long(),
                decoder_input_ids=result.decoder_input_ids, decoder_attention_mask=result.attention_mask.long())


# ----------------------------------------------------------------------------- analyze with targets
@pytest.mark.parametrize("family", FAMILIES)
def test_analyze_with_targets_equals_the_decoder_layers_and_the_encoder_alone(family, tokenizer):
    model = tiny_seq2seq(family)
    res = kobattr.analyze(model, SOURCES[:2], targets=TARGETS[:2], tokenizer=tokenizer, methods="all", heads=True,
                          backend="torch")
    placement = "post" if family in ("marian", "bart") else "pre"
    assert isinstance(res, Seq2SeqAttribution) and res.structure == placement and res.layers == (0, 1)
    # "all" brings the peers' ALTI of both blocks too (tests/test_alti_plus.py)
    assert res.methods == DECODER_SELF_METHODS[placement] + ("alti",) + tuple(CROSS_METHODS) + ("cross_alti",)

    # tokenisation: source and labels as the tokenizer gives them, right padding with the pad id, decoder inputs the
    # labels shifted right behind decoder_start_token_id (built here by hand, not by the model's shift)
    for b, (source, target) in enumerate(zip(SOURCES[:2], TARGETS[:2])):
        enc = tokenizer(source, text_target=target)
        s, t = len(enc["input_ids"]), len(enc["labels"])
        assert res.source_ids[b, :s].tolist() == enc["input_ids"] and (res.source_ids[b, s:] == 1).all()
        assert res.labels[b, :t].tolist() == enc["labels"] and (res.labels[b, t:] == 1).all()
        assert res.decoder_input_ids[b, :t].tolist() == [model.config.decoder_start_token_id] + enc["labels"][:-1]
        assert res.source_mask[b].sum() == s and res.attention_mask[b].sum() == t
        assert res.label_tokens[b][:t] == tokenizer.convert_ids_to_tokens(enc["labels"])
        assert res.tokens[b][:2] == ["</s>", "__xx__"] and res.source_tokens[b][0] == "__xx__"
    assert res.special_ids == (0, 1, 2, 4)  # all_special_ids without <unk> (3)
    B, S, T = 2, res.source_mask.shape[1], res.attention_mask.shape[1]
    assert (S, T) == (7, 6)

    # shapes of every map
    for m in res.methods:
        width = {"N": T, "S": S, "P": S + 1}[decoder_map_width(m)]
        assert res.maps[m].shape == (2, B, T, width), m
    assert set(res.head_maps) == {"attn_w", "attn_n", "cross_attn_w", "cross_attn_n"}
    assert res.head_maps["attn_n"].shape == (2, B, 4, T, T) and res.head_maps["cross_attn_w"].shape == (2, B, 4, T, S)
    assert set(res.ratios) == set(DECODER_SELF_METHODS[placement]) | {"cross_attnres_n", "cross_attnresln_n", "alti",
                                                                      "cross_alti"}
    assert all(r.shape == (2, B, T) for r in res.ratios.values())
    assert res.value_norms.shape == (2, B, 4, T) and res.cross_value_norms.shape == (2, B, 4, S)
    assert res.model_error.shape == (2, B) and res.model_error.max() < 1e-5
    assert set(res.completeness) == {"cross_attnres_n", "cross_attnresln_n", "alti", "cross_alti"}
    assert all(c.max() < 1e-5 for c in res.completeness.values())
    assert set(res.spot_check) == set(res.methods) and all(e.shape == (2, B) for e in res.spot_check.values())
    assert len(res.backends) == 2 and all(b["attention_maps"] == b["cross_maps"] == "torch" for b in res.backends)

    # the maps are attribute_decoder's on the captured layers, and the cross maps cross_reference's
    for index, layer in decoder_layers(model, batch_of(res)).items():
        own = attribute_decoder(layer, "all", heads=True, backend="torch")
        for m in res.methods:
            torch.testing.assert_close(res.maps[m][index], own.maps[m], rtol=0, atol=0)
        for m, t in own.head_maps.items():
            torch.testing.assert_close(res.head_maps[m][index], t, rtol=0, atol=0)
        for m, t in own.ratios.items():
            torch.testing.assert_close(res.ratios[m][index], t, rtol=0, atol=0, equal_nan=True)
        ref = cross_reference(layer.cross, "all")
        for m in CROSS_METHODS:
            expected = ref["maps"][m]
            assert (res.maps[m][index].double() - expected).abs().max() <= 1e-5 * expected.abs().max(), (m, index)
            if m in ref["ratios"]:
                torch.testing.assert_close(res.ratios[m][index].double(), ref["ratios"][m], rtol=1e-5, atol=1e-6,
                                           equal_nan=True)

    # result.encoder is analyze on the sources alone (the same right-padded batch)
    alone = kobattr.analyze(model, {"input_ids": res.source_ids, "attention_mask": res.source_mask.long()},
                            tokenizer=tokenizer, heads=True, backend="torch")
    assert type(res.encoder) is Attribution and res.encoder.methods == alone.methods
    assert res.encoder.tokens == res.source_tokens
    for m in alone.methods:
        torch.testing.assert_close(res.encoder.maps[m], alone.maps[m], rtol=0, atol=0)
        torch.testing.assert_close(res.encoder.ratios[m], alone.ratios[m], rtol=0, atol=0, equal_nan=True)

    # ready tensors give the same result, with or without the labels
    ready = kobattr.analyze(model, {**batch_of(res), "labels": res.labels}, tokenizer=tokenizer, methods="all",
                            backend="torch", encoder_methods=[])
    assert ready.encoder is None and torch.equal(ready.labels, res.labels)
    for m in res.methods:
        torch.testing.assert_close(ready.maps[m], res.maps[m], rtol=0, atol=0)
    shifted = kobattr.analyze(model, {"input_ids": res.source_ids, "attention_mask": res.source_mask.long(),
                                      "labels": res.labels.masked_fill(~res.attention_mask, -100)},
                              methods=["cross_attn_n"], backend="torch", encoder_methods=False)
    assert torch.equal(shifted.decoder_input_ids[res.attention_mask], res.decoder_input_ids[res.attention_mask])
    torch.testing.assert_close(shifted.maps["cross_attn_n"], res.maps["cross_attn_n"], rtol=0, atol=0)
    bare = kobattr.analyze(model, batch_of(res), methods=["cross_attn_w"], backend="torch", encoder_methods=[])
    assert bare.labels is None and bare.label_tokens is None and bare.special_ids == (0, 1, 2)  # from the config


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_pairs_equal_each_pair_alone(family, tokenizer):
    model = tiny_seq2seq(family)
    methods = ["attn_n", "attnres_n", "cross_attn_w", "cross_attnres_n", "cross_attnresln_n"]
    together = kobattr.analyze(model, SOURCES, targets=TARGETS, tokenizer=tokenizer, methods=methods,
                               encoder_methods=["attn_n"], backend="torch")
    assert together.source_mask.sum(1).tolist() == [7, 6, 4] and together.attention_mask.sum(1).tolist() == [6, 5, 7]
    for b, (source, target) in enumerate(zip(SOURCES, TARGETS)):
        alone = kobattr.analyze(model, source, targets=target, tokenizer=tokenizer, methods=methods,
                                encoder_methods=["attn_n"], backend="torch")
        s, t = alone.source_mask.shape[1], alone.attention_mask.shape[1]
        assert together.source_tokens[b][:s] == alone.source_tokens[0] and together.tokens[b][:t] == alone.tokens[0]
        for m in methods:
            joint = together.maps[m][:, b]
            if m in CROSS_METHODS:
                cols = list(range(s)) + ([joint.shape[-1] - 1] if CROSS_METHODS[m].residual else [])
                pad_cols = joint[..., s:joint.shape[-1] - CROSS_METHODS[m].residual]
            else:
                cols, pad_cols = list(range(t)), joint[..., t:]
            torch.testing.assert_close(joint[:, :t][..., cols], alone.maps[m][:, 0], rtol=1e-4, atol=1e-5,
                                       msg=f"{family} {b} {m}")
            assert (joint[:, t:] == 0).all() and (pad_cols == 0).all()
        for m, ratio in alone.ratios.items():
            torch.testing.assert_close(together.ratios[m][:, b, :t], ratio[:, 0], rtol=1e-4, atol=1e-5)
            assert together.ratios[m][:, b, t:].isnan().all()
        torch.testing.assert_close(together.encoder.maps["attn_n"][:, b, :s, :s], alone.encoder.maps["attn_n"][:, 0],
                                   rtol=1e-4, atol=1e-5)
        for layer in together.layers:  # argmax alignment of one pair, in a batch or alone
            for setting in ("input", "output"):
                assert together.alignments("cross_attnresln_n", setting, layer)[b] == \
                    alone.alignments("cross_attnresln_n", setting, layer)[0]


def test_input_errors(tokenizer):
    model = tiny_seq2seq("bart")
    with pytest.raises(LayerInputError, match="2 source text\\(s\\) but 1 target"):
        kobattr.analyze(model, SOURCES[:2], targets=TARGETS[:1], tokenizer=tokenizer)
    with pytest.raises(LayerInputError, match="text inputs need a tokenizer"):
        kobattr.analyze(model, SOURCES[0], targets=TARGETS[0])
    with pytest.raises(LayerInputError, match="rows=, contract= and normalize_rows="):
        kobattr.analyze(model, SOURCES[0], targets=TARGETS[0], tokenizer=tokenizer, rows=[0])
    with pytest.raises(ValueError, match="unknown method 'atbff'"):
        kobattr.analyze(model, SOURCES[0], targets=TARGETS[0], tokenizer=tokenizer, methods=["atbff"])
    with pytest.raises(LayerInputError, match="layer 2 does not exist; the model has 2 decoder layers"):
        kobattr.analyze(model, SOURCES[0], targets=TARGETS[0], tokenizer=tokenizer, layers=[2])
    ready = kobattr.analyze(model, SOURCES[:2], targets=TARGETS[:2], tokenizer=tokenizer, methods=["cross_attn_w"],
                            encoder_methods=[])
    left = dict(batch_of(ready), decoder_attention_mask=ready.attention_mask.flip(1).long())
    with pytest.raises(LayerInputError, match="the target of pair 1 is not padded on the right"):
        kobattr.analyze(model, left, methods=["cross_attn_w"], encoder_methods=[])
    with pytest.raises(LayerInputError, match="encoder_methods= goes with targets="):
        kobattr.analyze(model, {"input_ids": ready.source_ids}, encoder_methods=["attn_n"])


# ----------------------------------------------------------------------------- save / load
@pytest.fixture(scope="module")
def saved_pair(tokenizer, tmp_path_factory):
    model = tiny_seq2seq("m2m_100")
    res = kobattr.analyze(model, SOURCES[:2], targets=TARGETS[:2], tokenizer=tokenizer, methods="all", heads=True,
                          encoder_methods=["attn_w", "atblnffres"], backend="torch")
    return res, res.save(tmp_path_factory.mktemp("seq2seq") / "pairs")


def test_round_trip_with_the_encoder_inside(saved_pair, tmp_path):
    res, path = saved_pair
    assert sorted(os.listdir(path.parent)) == ["pairs.safetensors"]  # one file, the encoder's part inside
    for back in (Seq2SeqAttribution.load(path), Attribution.load(path)):  # the base class opens it too
        assert_same(res, back)
        assert_same(res.encoder, back.encoder)
        assert isinstance(back.special_ids, tuple) and back.labels.dtype == torch.long
        assert back.alignments("cross_attn_n", "output") == res.alignments("cross_attn_n", "output")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["kobattr"])
        assert "encoder/maps/atblnffres" in f.keys() and "maps/cross_attnres_n" in f.keys()
    assert header["class"] == "Seq2SeqAttribution" and header["format"] == 3
    assert header["fields"]["encoder"]["kind"] == "attribution"
    # a plain Attribution file loads as before, and is no Seq2SeqAttribution
    plain = res.encoder.save(tmp_path / "encoder")
    assert type(Attribution.load(plain)) is Attribution
    with pytest.raises(AttributionFileError, match="holds a plain Attribution, not a Seq2SeqAttribution"):
        Seq2SeqAttribution.load(plain)


def _set_field(name, value, inner=None):
    def edit(meta):
        fields = meta["fields"] if inner is None else meta["fields"][inner]["fields"]
        fields[name]["value"] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set_field("source_tokens", [["a"], ["b"]]), r"source_tokens is not 2 list\(s\) of 7 tokens"),
    (_set_field("label_tokens", None), r"labels and label_tokens must both be given"),
    (_set_field("layers", {"__tuple__": [0]}, inner="encoder"), r"its encoder part: .* the number of layers is 1"),
    (_set_field("special_ids", ["x"]), r"special_ids is not a tuple of token ids"),
    (lambda m: m.pop("class"), r"field 'source_tokens' that this kobattr's Attribution does not have"),
    (lambda m: m.__setitem__("class", "Other"), r"class 'Other', which this kobattr does not know"),
    (lambda m: m["fields"]["encoder"]["fields"]["maps"]["keys"].pop(), r"does not list \(encoder/maps/atblnffres\)"),
])
def test_tampered_files_are_refused(saved_pair, tmp_path, edit, message):
    import shutil

    path = shutil.copy(saved_pair[1], tmp_path / "copy.safetensors")
    rewrite_header(path, edit)
    with pytest.raises(AttributionFileError, match=message):
        Attribution.load(path)


def test_flipped_byte_and_bad_shapes_are_refused(saved_pair, tmp_path):
    import shutil

    res, path = saved_pair
    copy = shutil.copy(path, tmp_path / "copy.safetensors")
    data = bytearray(copy.read_bytes())
    data[-5] ^= 0x10
    copy.write_bytes(bytes(data))
    with pytest.raises(AttributionFileError, match="does not match its SHA-256 checksum"):
        Attribution.load(copy)
    no_kept = dataclasses.replace(res, maps={**res.maps, "cross_attnres_n": res.maps["cross_attnres_n"][..., :-1]})
    with pytest.raises(AttributionFileError, match=r"cannot save .* maps\['cross_attnres_n'\] has 7 in dimension 3 "
                                                   r"but the number of source tokens \+ 1 is 8"):
        no_kept.save(tmp_path / "bad")
    other = dataclasses.replace(res, encoder=dataclasses.replace(res.encoder, tokens=[["x"]] * 2))
    with pytest.raises(AttributionFileError, match=r"its encoder part: tokens is not 2 list"):
        other.save(tmp_path / "bad")
    assert sorted(os.listdir(tmp_path)) == ["copy.safetensors"]  # refused before anything was written


# ----------------------------------------------------------------------------- kobattr align, end to end
# Three pairs; target word t of pair p is aligned to source word PERMUTATIONS[p][t] (source and target lengths
# differ, and no permutation is its own inverse, so a swapped source/target order or a shifted index shows).
PAIRS = [("ka ki ku ke ko", "ta ti tu te", [2, 0, 4, 1]),
         ("si ku ka sa", "to te ti", [3, 1, 0]),
         ("ko ke ki ka ku", "tu to ta ti", [1, 3, 0, 2])]
POSSIBLE = {1: (2, 2)}  # an extra possible link in pair 1 (not predicted: AER stays 0)


def planted_marian(tokenizer):
    """A tiny Marian whose last decoder layer's cross-attention sends every target row to one source position.

    Row r of the decoder is fed label r - 1 (row 0: the decoder start token) and predicts label r (spec section 7).
    Labels are "__xx__ w_0 .. w_{n-1} </s>", so row r = t + 1 predicts target word t: it is planted to attend to the
    source position of word PERMUTATIONS[t] (source position s + 1: __xx__ comes first). The rows predicting
    __xx__ and </s> attend to the source's __xx__ (a special token). Hence the gold links are recovered in the
    "output" setting (the word predicted at row i), while the "input" setting reads target word t at row t + 2 and
    finds the next word's source.

    The planting: least squares on the projections' real inputs (fewer rows than dimensions, so exact), every head
    alike, queries 80 e_position and keys e_position (softmax scores 20 apart). Each pair runs alone here with
    decoder inputs built by hand from the labels, independently of kobattr's tokenisation."""
    model = tiny_seq2seq("marian")
    attn = model.decoder.layers[-1].encoder_attn
    start = model.config.decoder_start_token_id
    eye = torch.eye(16, dtype=torch.float64)
    rows = {"q_proj": [], "k_proj": []}
    wanted = {"q_proj": [], "k_proj": []}
    for source, target, perm in PAIRS:
        enc = tokenizer(source, text_target=target)
        labels = enc["labels"]
        inputs = dict(input_ids=torch.tensor([enc["input_ids"]]), decoder_input_ids=torch.tensor([[start] + labels[:-1]]))
        seen = {}
        handles = [getattr(attn, name).register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, a[0][0]))
                   for name in rows]
        try:
            with torch.no_grad():
                model(**inputs, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        rows["q_proj"].append(seen["q_proj"].double())
        rows["k_proj"].append(seen["k_proj"].double())
        positions = [0] + [perm[t] + 1 for t in range(len(perm))] + [0]  # per row r: the source position attended
        assert len(positions) == len(labels)
        wanted["q_proj"].append(80.0 * eye[positions])
        wanted["k_proj"].append(eye[:len(enc["input_ids"])])
    with torch.no_grad():
        for name in rows:
            proj, inputs_ = getattr(attn, name), torch.cat(rows[name])
            target = torch.cat(wanted[name]).repeat(1, 4) - proj.bias.double()
            proj.weight.copy_((torch.linalg.pinv(inputs_) @ target).T.float())
    return model


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("planted")
    planted_marian(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "src.txt").write_text("".join(s + "\n" for s, _, _ in PAIRS), encoding="utf-8")
    (root / "tgt.txt").write_text("".join(t + "\n" for _, t, _ in PAIRS), encoding="utf-8")
    gold = [" ".join([f"{s}-{t}" for t, s in enumerate(perm)] + ([f"{POSSIBLE[k][0]}?{POSSIBLE[k][1]}"]
                                                                 if k in POSSIBLE else []))
            for k, (_, _, perm) in enumerate(PAIRS)]
    (root / "gold.txt").write_text("\n".join(gold) + "\n", encoding="utf-8")
    one_based = [" ".join(f"{int(a) + 1}{sep}{int(b) + 1}" for a, sep, b in
                          (link.replace("?", " ? ").replace("-", " - ").split() for link in line.split()))
                 for line in gold]
    (root / "gold1.txt").write_text("\n".join(one_based) + "\n", encoding="utf-8")
    return root


def run(argv, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def align_args(root, out, *extra, gold="gold.txt"):
    return ["align", "--model", str(root / "model"), "--src", str(root / "src.txt"), "--tgt", str(root / "tgt.txt"),
            *(["--gold", str(root / gold)] if gold else []), "--out", str(out), "--backend", "torch",
            "--batch-size", "2", *extra]


def test_align_recovers_the_planted_links_in_the_output_setting(planted, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, err = run(align_args(planted, out, "--heatmaps", "1"), capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["layers"] == [1, 2] and results["pairs"] == 3 and results["special_ids"] == [0, 1, 2, 4]
    assert results["word_count_mismatches"] == {"source": 0, "target": 0}
    methods = ["cross_attn_w", "cross_attn_n", "cross_attnres_n", "cross_attnresln_n"]
    assert list(results["aer"]) == methods
    for m in methods:
        output, inputs = results["aer"][m]["output"], results["aer"][m]["input"]
        assert output[1] == 0.0, m  # the planted layer (2), in the setting the planting corresponds to
        assert inputs[1] > 0.5, m  # the other setting reads each target word one row later
        assert read_pharaoh(out / "alignments" / f"{m}.output.layer2.txt") == \
            [({(s, t) for t, s in enumerate(perm)},) * 2 for _, _, perm in PAIRS]
    assert results["best"]["aer"] == 0.0 and results["best"]["layer"] == 2
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = sorted([MANIFEST, "results.json", "aer_by_layer.png", "heatmaps/pair000.png", "heatmaps/pair000.html"]
                      + [f"alignments/{m}.{s}.layer{L}.txt" for m in methods for s in ("input", "output")
                         for L in (1, 2)])
    assert files == expected
    assert sorted(json.loads((out / MANIFEST).read_text())["files"] + [MANIFEST]) == expected
    # the token viewer: target rows, source columns plus the kept column
    page = (out / "heatmaps" / "pair000.html").read_text(encoding="utf-8")
    data = json.loads(page.split('id="kobattr-data">')[1].split("</script>")[0])
    assert data["square"] is False and data["columns"][-1] == "[kept]" and len(data["columns"]) == len(data["maps"][methods[0]][0][0])
    lines = printed.strip().splitlines()
    assert "lowest AER: 0.0%" in printed and lines[-1].startswith(f"wrote {out}/: ")
    assert "sentence batches" in err  # the progress bar

    # the same gold counted from 1; only the planted layer, no plots, into the same directory
    code, _, err = run(align_args(planted, out, "--one-based", "--layers", "-1", "--no-plots", "--overwrite",
                                  "--methods", "cross_attn_w", gold="gold1.txt"), capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["aer"] == {"cross_attn_w": {"input": [pytest.approx(results["aer"]["cross_attn_w"]["input"][0])],
                                               "output": [0.0]}} and results["layers"] == [2]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted(
        [MANIFEST, "results.json", "cross_attn_w.input.layer2.txt", "cross_attn_w.output.layer2.txt"])


def one_line_error(err):
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith(("Loading weights", "sentence batches"))]  # progress bars
    assert len(lines) == 1 and lines[0].startswith("kobattr align: error: "), err
    return lines[0]


@pytest.mark.parametrize("change,message", [
    ({"tgt.txt": "ta ti\nto\n"}, "--src has 3 lines but --tgt has 2"),
    ({"gold.txt": "0-0\n"}, "--gold has 1 lines but --src and --tgt have 3"),
    ({"gold.txt": None}, "gold.txt' does not exist"),
    ({"src.txt": ""}, "src.txt' is empty"),
    ({"src.txt": "ka\n\nki\n"}, "has a blank line 2"),
    ({"gold.txt": "0-0\n1-x\n\n"}, "line 2: malformed link '1-x'"),
    ({"extra": ["--one-based"]}, "line 1: link '0-0' has index 0 in a 1-based file"),
    ({"extra": ["--one-based"], "gold": False}, "--one-based says how --gold counts words; give --gold too"),
    ({"extra": ["--methods", "attn_n"]}, "--methods 'attn_n' is no target x source map"),
    ({"extra": ["--layers", "2"]}, "--layers 2 does not exist; the model has 2 decoder layers"),
    ({"extra": ["--src-lang", "de"]}, "has no src_lang; its language codes come from the checkpoint"),
])
def test_align_input_errors_are_one_line_and_write_nothing(planted, tmp_path, capsys, change, message):
    files = {"src.txt": "ka ki\nko\nsa\n", "tgt.txt": "ta\nti\nto\n", "gold.txt": "0-0\n0-0\n\n"}
    files.update({k: v for k, v in change.items() if k.endswith(".txt")})
    for name, text in files.items():
        if text is not None:
            (tmp_path / name).write_text(text, encoding="utf-8")
    os.symlink(planted / "model", tmp_path / "model")
    out = tmp_path / "out"
    code, printed, err = run(align_args(tmp_path, out, *change.get("extra", []),
                                        gold="gold.txt" if change.get("gold", True) else None), capsys)
    assert code == 2 and message in one_line_error(err) and printed == ""
    assert not out.exists()


def test_align_refuses_a_model_without_a_decoder(tmp_path, capsys, tokenizer):
    from transformers import AutoModel, BertConfig

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=20)
    AutoModel.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "src.txt").write_text("ka\n")
    (tmp_path / "tgt.txt").write_text("ta\n")
    capsys.readouterr()  # save_pretrained's progress bar
    code, _, err = run(align_args(tmp_path, tmp_path / "out", gold=None), capsys)
    assert code == 2 and "cannot capture the decoder of model_type 'bert'" in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_align_names_the_pair_it_cannot_group_into_words(planted, tmp_path, capsys):
    """A tokenizer without word markers ("▁", "Ġ", "##"): two-piece sentences are ambiguous, said in one line."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(SOURCE_WORDS + TARGET_WORDS)], trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(planted / "model" / name, model_dir / name)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(model_dir)
    (tmp_path / "src.txt").write_text("ka\nka ki\n")
    (tmp_path / "tgt.txt").write_text("ta\nti to\n")
    capsys.readouterr()
    code, _, err = run(align_args(tmp_path, tmp_path / "out", gold=None), capsys)
    assert code == 2 and "sentence pair 2 (line 2 of --src and --tgt): cannot tell the subword scheme" in \
        one_line_error(err)
    assert not (tmp_path / "out").exists()
    # told how the tokenizer marks words (WordLevel on whitespace: one piece per word, as WordPiece without "##")
    code, _, err = run(align_args(tmp_path, tmp_path / "out", "--scheme", "wordpiece", gold=None), capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "alignments" / "cross_attn_w.output.layer2.txt").read_text().count("\n") == 2


@pytest.mark.parametrize("family,others", [("bart", ["cross_attn_n"]), ("m2m_100", [])])
def test_the_whole_decoder_layer_through_analyze(family, others, tokenizer, tmp_path):
    """methods=["decoder_layer"] (alone or with others): (layer, batch, target, target + source) maps equal to
    attribute_decoder_layer on the captured layers, complete against the model's layer outputs."""
    from kobattr.decoder_layer import attribute_decoder_layer

    model = tiny_seq2seq(family)
    res = kobattr.analyze(model, SOURCES[:2], targets=TARGETS[:2], tokenizer=tokenizer,
                          methods=others + ["decoder_layer"], encoder_methods=[], backend="torch")
    assert res.methods == tuple(others) + ("decoder_layer",)
    T, S = res.attention_mask.shape[1], res.source_mask.shape[1]
    assert res.maps["decoder_layer"].shape == (2, 2, T, T + S)
    assert res.completeness["decoder_layer"].max() < 1e-5
    for index, layer in decoder_layers(model, batch_of(res)).items():
        own = attribute_decoder_layer(layer)
        torch.testing.assert_close(res.maps["decoder_layer"][index], own.map, rtol=0, atol=0)
        torch.testing.assert_close(res.ratios["decoder_layer"][index], own.ratio, rtol=0, atol=0, equal_nan=True)
    back = kobattr.Attribution.load(res.save(tmp_path / "whole"))
    torch.testing.assert_close(back.maps["decoder_layer"], res.maps["decoder_layer"], rtol=0, atol=0)
