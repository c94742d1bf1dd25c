"""kobattr.analyses.probes (Clark et al. 2019 section 5; spec clark2019.md section 3): a planted relation is
learned, random maps give chance, features against direct loops and against a tiny eager BERT's own
attentions, determinism, punct left out of UAS, the CLI options."""

import json
import math
import os

import pytest
import torch
from test_cli import run
from transformers import BertConfig, BertModel

from kobattr.analyses import heads, probes
from kobattr.analyses.heads import DepSentence
from kobattr.models import load_default_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
L, H = 2, 3


def random_tree(U: int, gen: torch.Generator) -> DepSentence:
    """A uniformly ordered random tree: the first word of a random order is the root, each later one attaches to
    a random earlier one."""
    order = torch.randperm(U, generator=gen).tolist()
    arcs = [(d, order[int(torch.randint(k, (1,), generator=gen))], "dep") for k, d in enumerate(order) if k > 0]
    return DepSentence(units=[f"w{int(torch.randint(50, (1,), generator=gen))}" for _ in range(U)], arcs=arcs,
                       roots=[order[0]])


def synthetic(count: int, seed: int, planted: bool):
    """Sentences of 6..13 units and word-level maps (L, H, S, S) with random rows; with ``planted`` map (1, 0)
    puts most of each dependent's row on its gold head ([CLS] = column 0 for the root)."""
    gen = torch.Generator().manual_seed(seed)
    sents, feats = [], []
    for _ in range(count):
        U = int(torch.randint(6, 14, (1,), generator=gen))
        s = random_tree(U, gen)
        maps = torch.rand(L, H, U + 2, U + 2, generator=gen)
        if planted:
            for d, g, _ in probes.gold_examples(s):
                maps[1, 0, d + 1, g] += 3.0
        sents.append(s)
        feats.append(maps / maps.sum(-1, keepdim=True))
    return sents, feats


@pytest.fixture(scope="module")
def planted_data():
    return synthetic(800, 1, True), synthetic(200, 2, True)


def test_probe_learns_planted_relation_far_above_baselines(planted_data):
    (train_s, train_f), (test_s, test_f) = planted_data
    vectors = probes.random_vectors(train_s + test_s, dim=16)
    probe = probes.train_probe(train_f, train_s, kind="attn")
    score = probes.uas(probe, test_f, test_s)
    words = probes.train_probe(train_f, train_s, kind="attn_words", word_vectors=vectors)
    dist = probes.train_probe(None, train_s, kind="distances", word_vectors=vectors)
    right = probes.right_branching_uas(test_s)
    baseline = max(right, probes.uas(dist, None, test_s))
    assert score > 0.95 and score > baseline + 0.5
    # the word-conditioned weights learn more slowly (one epoch), still far above the baselines
    assert probes.uas(words, test_f, test_s) > baseline + 0.4
    # the planted map carries the weight (map index of layer 1, head 0 among the 2LH maps)
    assert int(probe.weight.abs().argmax()) == 1 * H + 0


def test_random_maps_give_chance_uas():
    train_s, train_f = synthetic(400, 3, False)
    test_s, test_f = synthetic(600, 4, False)
    probe = probes.train_probe(train_f, train_s, kind="attn")
    got = probes.uas(probe, test_f, test_s)
    n = torch.tensor([len(s.units) for s in test_s for _ in probes.gold_examples(s)], dtype=torch.float64)
    chance = (1 / (n + 1)).mean().item()
    # Independent of the gold tree, a prediction hits with probability (1 - P(self)) / U whatever its ROOT rate
    # (the gold head is never self, and the word columns are exchangeable); P(self) = 1 / (U + 1) gives the
    # chance level. 4 binomial standard errors of the mean over the test words, plus the spread of P(self)
    # between 0 and 2 / (U + 1) (the self column's map and transpose features coincide).
    sigma = math.sqrt((chance * (1 - chance)) / len(n))
    spread = (1 / (n * (n + 1))).mean().item()
    assert abs(got - chance) < 4 * sigma + spread, (got, chance, sigma, spread)


def test_seeded_and_deterministic(planted_data):
    (train_s, train_f), _ = planted_data
    train_s, train_f = train_s[:60], train_f[:60]
    vectors = probes.random_vectors(train_s, dim=8)
    a = probes.train_probe(train_f, train_s, kind="attn_words", word_vectors=vectors, seed=0)
    b = probes.train_probe(train_f, train_s, kind="attn_words", word_vectors=vectors, seed=0)
    c = probes.train_probe(train_f, train_s, kind="attn_words", word_vectors=vectors, seed=1)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.dense.weight, c.dense.weight)


def test_glorot_initialisation_follows_tf():
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        p = probes.Probe("attn_words", 12, 5, gen)
    limit = math.sqrt(6 / (10 + 12))
    assert p.dense.weight.abs().max() <= limit and p.dense.weight.abs().max() > 0.8 * limit
    assert torch.count_nonzero(p.dense.bias) == 0 and abs(p.root_start.item()) <= math.sqrt(3)


def test_candidate_features_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    U = 5
    maps = torch.rand(L, H, U + 2, U + 2, generator=gen)
    rs, re = 0.7, -1.3
    F = probes.candidate_features(maps, rs, re)
    K = L * H
    assert F.shape == (2 * K, U, U + 1)
    for k in range(2 * K):
        M = maps.reshape(K, U + 2, U + 2)[k % K]
        at = (lambda i, j: M[i, j]) if k < K else (lambda i, j: M[j, i])  # the transpose: c attends to d
        for d in range(U):
            assert torch.isclose(F[k, d, 0], rs * at(d + 1, 0) + re * at(d + 1, U + 1))
            for c in range(1, U + 1):
                assert F[k, d, c] == at(d + 1, c)


def test_distance_features_and_word_pairs_against_a_loop():
    n = 6
    D = probes.distance_features(n)
    assert D.shape == (8, n, n + 1)
    for d in range(n):
        assert D[:, d, 0].tolist() == [0] * 7 + [1]
        for c in range(n):
            off = c - d
            want = [off / n if off > 0 else 0, -off / n if off < 0 else 0,
                    off == 0, off == -1, off == 1, off == -2, off == 2, 0]
            assert torch.allclose(D[:, d, c + 1], torch.tensor(want, dtype=torch.float32))
    v = torch.randn(4, 3)
    P = probes.word_pairs(v)
    assert torch.equal(P[:, 0], torch.zeros(4, 6))
    for d in range(4):
        for c in range(4):
            assert torch.equal(P[d, c + 1], torch.cat([v[d], v[c]]))


def test_uas_leaves_out_punct():
    s = DepSentence(units=["a", "b", "c", "."], arcs=[(0, 1, "det"), (1, 2, "nsubj"), (3, 2, "punct")], roots=[2])
    # right-branching: a -> b and b -> c right, c -> "." wrong (gold ROOT), "." -> ROOT wrong (punct)
    assert probes.right_branching_uas([s]) == pytest.approx(2 / 3)
    sents, feats = synthetic(30, 5, True)
    for t in sents[:10]:
        t.arcs = [(d, h, "punct" if d % 2 else r) for d, h, r in t.arcs]
    probe = probes.train_probe(feats, sents, kind="attn")
    pairs = [p for sent in probes.predictions(probe, feats, sents) for p in sent]
    kept = [p == g for p, g, r in pairs if r != "punct"]
    assert len(kept) < len(pairs) and probes.uas(probe, feats, sents) == pytest.approx(sum(kept) / len(kept))


def test_read_conllu_records_roots():
    sents = heads.read_conllu(heads.sample_conllu_path())
    assert sents[0].roots == [2]
    assert probes.gold_examples(sents[0])[2] == (2, 0, "root")
    assert all(len(s.roots) == s.skipped["root"] for s in sents)


# ------------------------------------------------------------------------------------------- a tiny BERT
@pytest.fixture(scope="module")
def tiny():
    _, tokenizer = load_default_model()
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval()
    model.config._attn_implementation = "eager"
    return model, tokenizer


SPLIT = DepSentence(units=["Xylophones", "reverberated", "magnificently", "tonight", "."],
                    arcs=[(0, 1, "nsubj"), (2, 1, "advmod"), (3, 1, "obl"), (4, 1, "punct")], roots=[1])


def direct_maps(model, tokenizer, sentence, normalize_rows=True, norm_to="vector"):
    """Word-level maps by loops over the eager model's own attentions and f^h(x) = (x W_V^h + b_V^h) W_O^h."""
    enc = tokenizer(sentence.units, is_split_into_words=True, return_tensors="pt")
    wid = enc.word_ids()
    out = model(**enc, output_attentions=True, output_hidden_states=True)
    n, U = len(wid), len(sentence.units)
    groups = [[0]] + [[p for p in range(n) if wid[p] == u] for u in range(U)] + [[n - 1]]
    S = U + 2
    Wm, Nm = torch.zeros(L, 4, S, S), torch.zeros(L, 4, S, S)
    for li, layer in enumerate(model.encoder.layer):
        x = out.hidden_states[li][0]
        alpha = out.attentions[li][0].double()
        v = layer.attention.self.value(x)
        Wo = layer.attention.output.dense.weight
        for h in range(4):
            f = (v[:, h * 8:(h + 1) * 8] @ Wo[:, h * 8:(h + 1) * 8].T).double()  # (n, D)
            total = [sum(alpha[h, i, j] * f[j].norm() for j in range(n)) for i in range(n)]
            for a in range(S):
                for b in range(S):
                    w = nrm = 0.0
                    for i in groups[a]:
                        w += sum(alpha[h, i, t] for t in groups[b])
                        if norm_to == "vector":
                            val = sum(alpha[h, i, t] * f[t] for t in groups[b]).norm()
                        else:
                            val = sum(alpha[h, i, t] * f[t].norm() for t in groups[b])
                        nrm += val / total[i] if normalize_rows else val
                    Wm[li, h, a, b] = w / len(groups[a])
                    Nm[li, h, a, b] = nrm / len(groups[a])
    return {"weights": Wm, "norms": Nm}, groups


@pytest.mark.parametrize("normalize_rows,norm_to", [(True, "vector"), (False, "sum")])
def test_features_against_the_eager_model(tiny, normalize_rows, norm_to):
    model, tokenizer = tiny
    sample = heads.read_conllu(heads.sample_conllu_path(), limit=2)
    feats = probes.probe_features(model, tokenizer, [sample[0], SPLIT, sample[1]], batch_size=2, backend="torch",
                                  normalize_rows=normalize_rows, norm_to=norm_to)
    for sent, got in zip([sample[0], SPLIT, sample[1]], feats):
        want, groups = direct_maps(model, tokenizer, sent, normalize_rows, norm_to)
        for kind in probes.KINDS:
            assert got[kind].shape == (L, 4, len(sent.units) + 2, len(sent.units) + 2)
            torch.testing.assert_close(got[kind], want[kind], rtol=1e-4, atol=1e-5)
    assert any(len(g) > 1 for g in direct_maps(model, tokenizer, SPLIT)[1])  # SPLIT does have split words
    assert torch.allclose(feats[0]["weights"].sum(-1), torch.ones(1))  # [CLS] .. [SEP] rows are distributions


def test_attention_probes_end_to_end(tiny):
    model, tokenizer = tiny
    sents = heads.read_conllu(heads.sample_conllu_path())
    long = DepSentence(units=["word"] * 140, arcs=[(d, 0, "dep") for d in range(1, 140)], roots=[0])
    result = probes.attention_probes(model, tokenizer, sents[:12], sents[12:20], sents[20:] + [long],
                                     word_vectors="random", layers=[1])
    json.dumps(result, allow_nan=False)
    assert result["layers"] == [2] and result["heads"] == 4
    assert result["counts"]["test"]["dropped_over_max_pieces"] == 1
    assert result["word_vectors"]["source"].startswith("random")
    for split in ("dev", "test"):
        for p in probes.PROBES:
            assert set(result["uas"][split][p]) == {"weights", "norms"}
            assert all(0 <= v <= 1 for v in result["uas"][split][p].values())
    assert result["uas"]["test"]["right_branching"] == probes.right_branching_uas(sents[20:])
    lines = probes.summary_lines(result)
    assert len(lines) == 5 and "norms" in lines[1]


def test_cli_needs_all_three_files(tmp_path, capsys):
    path = str(heads.sample_conllu_path())
    code, _, err = run(["heads", "--probe-train", path, "--probe-test", path, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--probe-dev" in err and err.count("\n") == 1
    code, _, err = run(["heads", "--glove", path, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--glove goes with" in err


def test_glove_text_format(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("the 1 2\ncat 3 4\nthe 9 9\n", encoding="utf-8")
    table = probes.glove_vectors(path)
    s = DepSentence(units=["The", "CAT", "zebra"], arcs=[], roots=[0])
    assert table.vectors(s).tolist() == [[1, 2], [3, 4], [1, 2]]  # lowercased; OOV -> row 0
    path.write_text("the 1 2\ncat 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        probes.glove_vectors(path)
