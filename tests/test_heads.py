"""`kobattr heads` and kobattr.analyses.heads (spec section 8): every statistic against a plain loop over the
maps of analyze(..., heads=True), synthetic layers with known answers, dependency probing on hand-made trees."""

import dataclasses
import json
import math
import os

import pytest
import torch
from random_layers import random_layer
from scipy.stats import spearmanr
from test_cli import run
from test_inputs import _decoder, byte_tokenizer  # noqa: F401  (fixture)

from kobattr.analyses import heads
from kobattr.analyses.heads import CATEGORIES, HeadStatistics, head_statistics, read_conllu, token_categories
from kobattr.api import analyze
from kobattr.cli import MANIFEST
from kobattr.core import attribute
from kobattr.models import load_default_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXTS = ["The cat sat on the mat, and then it slept.", "Hello.", "A dog, a cat and a bird ran home."]


@pytest.fixture(scope="module")
def minilm():
    return load_default_model()


# ------------------------------------------------------------------------------------- plain loop reference
def loop_reference(alpha, norms, fx, mask, cats, causal=False):
    """Every surface statistic by explicit loops over texts, rows and keys (absolute positions)."""
    L, B, H, N, _ = alpha.shape
    C = len(CATEGORIES)
    out = {k: {} for k in ("entropy", "first", "prev", "next", "share", "alpha_cat", "fx_cat", "spearman")}
    for li in range(L):
        for h in range(H):
            acc = {k: {"entropy": 0.0, "first": 0.0, "prev": 0.0, "next": 0.0, "share": [0.0] * C}
                   for k in ("weights", "norms")}
            a_cat, f_cat, cat_rows = [0.0] * C, [0.0] * C, [0] * C
            rows = texts = 0
            uniform = 0.0
            rhos = []
            for b in range(B):
                P = [p for p in range(N) if mask[b, p]]
                texts += 1
                xs, ys = [], []
                for r, i in enumerate(P):
                    keys = [j for j in P if not causal or j <= i]
                    rows += 1
                    uniform += math.log(len(keys))
                    total_n = sum(float(norms[li, b, h, i, j]) for j in keys)
                    for kind in ("weights", "norms"):
                        A = {j: float(alpha[li, b, h, i, j]) if kind == "weights" else
                             float(norms[li, b, h, i, j]) / total_n for j in keys}
                        e = -sum(v * math.log(v) for v in A.values() if v > 0)
                        acc[kind]["entropy"] += e
                        if r == 0:
                            acc[kind]["first"] += e
                        acc[kind]["prev"] += A.get(i - 1, 0.0)
                        acc[kind]["next"] += A.get(i + 1, 0.0)
                        for j, v in A.items():
                            acc[kind]["share"][int(cats[b, j])] += v
                    for c in range(C):
                        kc = [j for j in keys if cats[b, j] == c]
                        if kc:
                            a_cat[c] += sum(float(alpha[li, b, h, i, j]) for j in kc) / len(kc)
                            f_cat[c] += sum(float(fx[li, b, h, j]) for j in kc) / len(kc)
                            cat_rows[c] += 1
                    for j in keys:
                        xs.append(float(alpha[li, b, h, i, j]))
                        ys.append(float(fx[li, b, h, j]))
                if len(set(xs)) > 1 and len(set(ys)) > 1:
                    rhos.append(spearmanr(xs, ys)[0])
            for kind in ("weights", "norms"):
                for name in ("entropy", "prev", "next"):
                    out[name].setdefault(kind, {})[(li, h)] = acc[kind][name] / rows
                out["first"].setdefault(kind, {})[(li, h)] = acc[kind]["first"] / texts
                out["share"].setdefault(kind, {})[(li, h)] = [s / rows for s in acc[kind]["share"]]
            out["alpha_cat"][(li, h)] = [a / k if k else float("nan") for a, k in zip(a_cat, cat_rows)]
            out["fx_cat"][(li, h)] = [f / k if k else float("nan") for f, k in zip(f_cat, cat_rows)]
            out["spearman"][(li, h)] = sum(rhos) / len(rhos)
            out["uniform"] = uniform / rows
    return out


def categories_of(result, tokenizer):
    cats = torch.zeros(result.attention_mask.shape, dtype=torch.long)
    for b in range(cats.shape[0]):
        keep = result.attention_mask[b].nonzero().flatten().tolist()
        ids = tokenizer.convert_tokens_to_ids([result.tokens[b][p] for p in keep])
        cats[b, keep] = torch.tensor(token_categories(ids, [result.tokens[b][p] for p in keep], tokenizer))
    return cats


def check_against_loop(result, stats_out, ref, L, H):
    def close(a, b):
        if b is None or (isinstance(b, float) and math.isnan(b)):
            assert a is None or math.isnan(a)
        else:
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9)

    for li in range(L):
        for h in range(H):
            for kind in ("weights", "norms"):
                close(stats_out["entropy"][kind][li][h], ref["entropy"][kind][(li, h)])
                close(stats_out["entropy_first_row"][kind][li][h], ref["first"][kind][(li, h)])
                close(stats_out["prev_token"][kind][li][h], ref["prev"][kind][(li, h)])
                close(stats_out["next_token"][kind][li][h], ref["next"][kind][(li, h)])
                for ci, c in enumerate(CATEGORIES):
                    close(stats_out["special_share"][kind][c][li][h], ref["share"][kind][(li, h)][ci])
            for ci, c in enumerate(CATEGORIES):
                close(stats_out["noop"]["alpha_mean"][c][li][h], ref["alpha_cat"][(li, h)][ci])
                close(stats_out["noop"]["fx_norm_mean"][c][li][h], ref["fx_cat"][(li, h)][ci])
            close(stats_out["noop"]["spearman_alpha_fx"][li][h], ref["spearman"][(li, h)])
        close(stats_out["entropy_uniform"][li], ref["uniform"])


def test_every_statistic_equals_a_plain_loop_with_padding(minilm):
    model, tokenizer = minilm
    result = analyze(model, TEXTS, tokenizer=tokenizer, methods=["attn_w", "attn_n"], heads=True, layers=[0, 1],
                     backend="torch", verify=0)
    assert not result.attention_mask.all()  # padding is there
    cats = categories_of(result, tokenizer)
    assert set(cats[result.attention_mask].tolist()) == {0, 1, 2, 3}
    alpha, norms, fx = result.head_maps["attn_w"], result.head_maps["attn_n"], result.value_norms
    stats = HeadStatistics(2, alpha.shape[2])
    stats.add(alpha, norms, fx, result.attention_mask, cats)
    out = stats.results(result.layers)
    ref = loop_reference(alpha, norms, fx, result.attention_mask, cats)
    check_against_loop(result, out, ref, 2, alpha.shape[2])
    assert out["tokens"] == int(result.attention_mask.sum()) and out["texts"] == len(TEXTS)
    # the driver (its own tokenisation, batching by 2, streaming) gives the same numbers
    driven = head_statistics(model, tokenizer, texts=TEXTS, layers=[0, 1], batch_size=2, backend="torch", verify=0)
    for key in ("entropy", "entropy_first_row", "prev_token", "next_token", "special_share", "entropy_uniform", "noop"):
        assert flat(driven[key]) == pytest.approx(flat(out[key]), rel=1e-4, abs=1e-6, nan_ok=True), key


def flat(x):
    if isinstance(x, dict):
        return [v for k in sorted(x) for v in flat(x[k])]
    if isinstance(x, list):
        return [v for item in x for v in flat(item)]
    return [float("nan") if x is None else float(x)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_rows_and_padding_equal_a_plain_loop(byte_tokenizer, side):  # noqa: F811
    model = _decoder("gpt2")
    byte_tokenizer.padding_side = side
    texts = ["the cat sat on the mat", "a dog ran", "the mat, the cat."]
    result = analyze(model, texts, tokenizer=byte_tokenizer, methods=["attn_w", "attn_n"], heads=True,
                     backend="torch", verify=0)
    cats = categories_of(result, byte_tokenizer)
    alpha, norms, fx = result.head_maps["attn_w"], result.head_maps["attn_n"], result.value_norms
    L, H = alpha.shape[0], alpha.shape[2]
    stats = HeadStatistics(L, H, causal=True)
    stats.add(alpha, norms, fx, result.attention_mask, cats)
    out = stats.results(result.layers)
    check_against_loop(result, out, loop_reference(alpha, norms, fx, result.attention_mask, cats, causal=True), L, H)
    assert all(v == 0 for kind in ("weights", "norms") for row in out["next_token"][kind] for v in row)
    assert all(abs(v) < 1e-12 for row in out["entropy_first_row"]["weights"] for v in row)  # one visible key
    assert out["special_share"]["weights"]["punct"][0][0] > 0


def test_token_categories(minilm):
    _, tokenizer = minilm
    tokens = ["[CLS]", "hi", ".", ",", "!", "##s", "[SEP]"]
    assert token_categories(tokenizer.convert_tokens_to_ids(tokens), tokens, tokenizer) == [0, 3, 2, 2, 3, 3, 1]

    class OneEndToken:  # GPT-2: BOS and EOS are one token
        cls_token_id = sep_token_id = None
        bos_token_id = eos_token_id = 5

    assert token_categories([5, 7, 8, 9, 5], ["<e>", "\u0120.", ",", "cat", "<e>"], OneEndToken()) == [0, 2, 2, 3, 1]


def _with_qk(layer, q, k):
    return dataclasses.replace(layer, q=q.to(layer.q.dtype), k=k.to(layer.k.dtype))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_synthetic_previous_token_head_is_flagged_and_uniform_head_meets_the_baseline(kind):
    layer = random_layer(kind, N=7, B=2, Dh=8, pad=2)
    B, H, N, Dh = layer.q.shape
    q, k = layer.q.clone(), layer.k.clone()
    eye = torch.eye(N, Dh, dtype=q.dtype)  # key j = e_j, query i = 60 e_{i-1}: head 0 looks at i-1
    k[:, 0] = eye
    q[:, 0] = 0
    q[:, 0, 1:] = 60 * eye[:-1]
    q[:, 1] = 0  # head 1: all logits 0, uniform over the visible keys
    layer = _with_qk(layer, q, k)
    r = attribute(layer, methods=["attn_w", "attn_n"], heads=True, backend="torch", verify=0)
    alpha, norms, fx = r.head_maps["attn_w"][None], r.head_maps["attn_n"][None], r.value_norms[None]
    mask = layer.valid if hasattr(layer, "valid") else layer.key_valid
    stats = HeadStatistics(1, H, causal=layer.causal)
    stats.add(alpha, norms, fx, mask, torch.zeros(B, N, dtype=torch.long))
    out = stats.results([4])
    assert out["prev_token_heads"]["weights"] == [[5, 1]]
    rows = int(mask.sum())
    assert out["prev_token"]["weights"][0][0] == pytest.approx((rows - B) / rows, abs=1e-6)  # first rows count 0
    assert out["entropy"]["weights"][0][1] == pytest.approx(out["entropy_uniform"][0], abs=1e-9)
    first_rows = sum(0.0 if layer.causal else math.log(n) for n in mask.sum(1).tolist())  # q = 0: uniform row 0
    assert out["entropy"]["weights"][0][0] == pytest.approx(first_rows / rows, abs=1e-6)
    expected = [math.log(i + 1 if layer.causal else n) for n in mask.sum(1).tolist() for i in range(n)]
    assert out["entropy_uniform"][0] == pytest.approx(sum(expected) / len(expected), abs=1e-12)


# ------------------------------------------------------------------------------------- dependency probing
TREE = """# text = I don't like thunderstorms.
1	I	_	PRON	_	_	4	nsubj	_	_
2-3	don't	_	_	_	_	_	_	_	_
2	do	_	AUX	_	_	4	aux	_	_
3	n't	_	PART	_	_	4	advmod	_	_
4	like	_	VERB	_	_	0	root	_	_
5	thunderstorms	_	NOUN	_	_	4	obj	_	SpaceAfter=No
5.1	liked	_	VERB	_	_	_	_	4:conj	_
6	.	_	PUNCT	_	_	4	punct	_	_

# text = We can't go.
1	We	_	PRON	_	_	4	nsubj	_	_
2-3	can't	_	_	_	_	_	_	_	_
2	ca	_	AUX	_	_	4	aux	_	_
3	n't	_	PART	_	_	2	advmod	_	_
4	go	_	VERB	_	_	0	root	_	SpaceAfter=No
5	.	_	PUNCT	_	_	4	punct	_	_
"""


def test_read_conllu_maps_multiword_tokens_and_skips_empty_nodes():
    first, second = read_conllu(TREE)
    assert first.units == ["I", "don't", "like", "thunderstorms", "."]
    assert first.arcs == [(0, 2, "nsubj"), (1, 2, "aux"), (1, 2, "advmod"), (3, 2, "obj"), (4, 2, "punct")]
    assert first.skipped == {"root": 1, "within_token": 0, "empty_node": 1, "no_head": 0}
    assert second.arcs == [(0, 2, "nsubj"), (1, 2, "aux"), (3, 2, "punct")]
    assert second.skipped["within_token"] == 1  # n't -> ca inside "can't": not scorable
    sample = read_conllu(heads.sample_conllu_path())
    assert len(sample) >= 30 and heads.sample_conllu_path().read_text().startswith("# license: CC0")
    assert any(s.units != [u for u in s.units if "'" not in u] for s in sample)  # multi-word tokens present


def _piece_maps(word_ids, rows_by_unit, N):
    """(N, N) piece map: rows_by_unit[u] = list per query piece of {key: weight}, key a unit (spread evenly
    over its pieces), "cls" or "self" (the query piece itself)."""
    A = torch.zeros(N, N, dtype=torch.float64)
    pieces = {}
    for p, u in enumerate(word_ids):
        if u is not None:
            pieces.setdefault(u, []).append(p)
    for u, specs in rows_by_unit.items():
        for p, spec in zip(pieces[u], specs * len(pieces[u]) if len(specs) == 1 else specs):
            for key, w in spec.items():
                targets = [0] if key == "cls" else [p] if key == "self" else pieces[key]
                for t in targets:
                    A[p, t] += w / len(targets)
    sep = word_ids.index(None, 1)
    A[sep, 0] = 1.0
    A[0, 0] = 1.0
    return A


def test_dependency_accuracy_and_offset_baseline_on_hand_made_maps(minilm):
    _, tokenizer = minilm
    sentence = read_conllu(TREE)[0]
    item = heads._encode(sentence, tokenizer, None)
    word_ids = item.word_ids
    assert [word_ids.count(u) for u in range(5)] == [1, 3, 1, 3, 1]  # don't and thunderstorms: 3 pieces each
    n = len(word_ids)
    N = n + 2  # two padding positions
    I, DONT, LIKE, STORM, DOT = range(5)
    # head 0: every row points to the gold head, beside a bigger share for itself and [CLS]; "don't" points to
    # "I" (wrong); "like" gives thunderstorms 0.3 over 3 pieces (0.1 each) and "I" 0.15 (more than any piece)
    h0 = {I: [{"self": 0.4, "cls": 0.35, LIKE: 0.25}], DONT: [{"self": 0.4, "cls": 0.35, I: 0.25}],
          LIKE: [{"self": 0.3, "cls": 0.25, STORM: 0.3, I: 0.15}], STORM: [{"self": 0.4, "cls": 0.35, LIKE: 0.25}],
          DOT: [{"self": 0.4, "cls": 0.35, LIKE: 0.25}]}
    # head 1: "don't"'s first piece prefers I (0.5 vs 0.4) but the mean over its 3 pieces prefers like
    h1 = {I: [{DOT: 0.6, "cls": 0.4}], DONT: [{I: 0.5, LIKE: 0.4, "cls": 0.1}, {I: 0.1, LIKE: 0.4, "cls": 0.5},
                                              {I: 0.1, LIKE: 0.4, "cls": 0.5}],
          LIKE: [{DONT: 0.7, "cls": 0.3}], STORM: [{LIKE: 0.7, "cls": 0.3}], DOT: [{STORM: 0.7, "cls": 0.3}]}
    alpha = torch.zeros(1, 1, 2, N, N, dtype=torch.float64)
    alpha[0, 0, 0, :n, :n] = _piece_maps(word_ids, h0, n)
    alpha[0, 0, 1, :n, :n] = _piece_maps(word_ids, h1, n)
    # norms: the rows scaled arbitrarily (first piece of don't by 10): the per-row normalisation undoes it
    scale = torch.ones(N, dtype=torch.float64)
    scale[word_ids.index(DONT)] = 10.0
    norms = alpha * scale[:, None]
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[0, :n] = True
    stats = HeadStatistics(1, 2)
    stats.add(alpha, norms, torch.ones(1, 1, 2, N), mask, torch.zeros(1, N, dtype=torch.long),
              word_ids=[word_ids + [None, None]], sentences=[sentence])
    out = stats.results([2])
    dep = out["dependency"]
    expected_dep_to_head = {"nsubj": (1, 1.0), "aux": (2, 1.0), "advmod": (2, 1.0), "obj": (1, 1.0), "punct": (1, 1.0)}
    expected_head_to_dep = {"nsubj": (1, 0.0), "aux": (2, 1.0), "advmod": (2, 1.0), "obj": (1, 1.0), "punct": (1, 0.0)}
    offsets = {"nsubj": 2, "aux": 1, "advmod": 1, "obj": -1, "punct": -2}  # in surface words, not syntactic ids
    for kind in ("weights", "norms"):
        assert set(dep[kind]) == set(expected_dep_to_head)
        for rel, (head, acc) in expected_dep_to_head.items():
            entry = dep[kind][rel]
            assert entry["count"] == 1
            assert (entry["dep_to_head"]["layer"], entry["dep_to_head"]["head"]) == (3, head), (kind, rel)
            assert entry["dep_to_head"]["accuracy"] == acc
            head2, acc2 = expected_head_to_dep[rel]
            assert (entry["head_to_dep"]["head"], entry["head_to_dep"]["accuracy"]) == (head2, acc2), (kind, rel)
            assert entry["offset_baseline"] == {"offset": offsets[rel], "accuracy": 1.0}
    assert out["dependency_corpus"]["arcs"] == 5 and out["dependency_corpus"]["skipped"]["empty_node"] == 1


def test_dependency_probing_runs_on_a_decoder_with_pretokenised_words(byte_tokenizer):  # noqa: F811
    model = _decoder("gpt2")
    sentences = read_conllu(TREE)
    out = head_statistics(model, byte_tokenizer, sentences=sentences, backend="torch", verify=0)
    assert out["model"]["causal"] and out["dependency_corpus"]["arcs"] == 8
    # every head is to the right of the dependent only for "I"/"We" -> verb: the causal rows never see it
    for kind in ("weights", "norms"):
        assert out["dependency"][kind]["nsubj"]["dep_to_head"]["accuracy"] == 0.0


# ------------------------------------------------------------------------------------- CLI
def test_cli_writes_every_file_and_is_deterministic(tmp_path, capsys):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        code, printed, err = run(["heads", "--limit", "3", "--layers", "0", "1", "--out", str(out)], capsys)
        assert code == 0, err
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted([MANIFEST, "report.md", "results.json", heads.HEAD_VIEW, *heads.FIGURES.values()])
    assert sorted(p.name for p in outs[1].iterdir()) == files
    assert (outs[0] / "results.json").read_bytes() == (outs[1] / "results.json").read_bytes()
    assert (outs[0] / heads.HEAD_VIEW).read_bytes() == (outs[1] / heads.HEAD_VIEW).read_bytes()
    assert json.loads((outs[0] / MANIFEST).read_text())["files"] == [f for f in files if f != MANIFEST]
    results = json.loads((outs[0] / "results.json").read_text())
    assert results["layers"] == [1, 2] and results["heads"] == 12 and results["texts"] == 3
    assert len(results["entropy"]["weights"]) == 2 and len(results["entropy"]["weights"][0]) == 12
    assert results["dependency_corpus"]["sentences"] == 3 and "det" in results["dependency"]["norms"]
    assert set(results["special_share"]["norms"]) == set(CATEGORIES)
    report = (outs[0] / "report.md").read_text()
    assert "3 sentences" in report and "| det |" in report
    code, _, err = run(["heads", "--limit", "3", "--layers", "0", "--out", str(outs[0])], capsys)
    assert code == 2 and "not empty" in err  # no silent overwrite


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit"),
    (["--conllu", "missing.conllu"], "does not exist"),
    (["--file", "a.txt", "--conllu", "b.conllu"], "not allowed with"),
    (["--layers", "9", "--limit", "1"], "--layers 9"),
])
def test_cli_argument_errors_are_one_line(tmp_path, capsys, argv, message):
    code, _, err = run(["heads", *argv, "--out", str(tmp_path / "o")], capsys)
    errors = [line for line in err.splitlines() if "error" in line]  # (model loading may print a progress bar)
    assert code == 2 and len(errors) == 1 and message in errors[0] and errors[0].startswith("kobattr heads")
    assert not (tmp_path / "o").exists()


def test_cli_bad_conllu_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad.conllu"
    bad.write_text("1\tI\t_\tPRON\t_\t_\t7\tnsubj\t_\t_\n\n", encoding="utf-8")
    code, _, err = run(["heads", "--conllu", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "HEAD 7" in err
