"""Coreference heads (kobattr.analyses.coref; Clark et al. 2019 section 4.3): the CorefUD reader on hand-made
snippets, the baselines on a hand-made two-cluster document, the head accuracies against a plain loop over the
eager model's own attentions and value vectors, MiniLM and the CLI."""

import json
import os

import pytest
import torch
from test_cli import checkpoint, run  # noqa: F401  (fixture)

from kobattr.analyses import coref
from kobattr.analyses.coref import coreference_heads, read_corefud
from kobattr.models import default_model_path, load_default_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def conllu(rows: str) -> str:
    """CoNLL-U text from rows written with single spaces between the ten columns."""
    return "\n".join(line if line.startswith("#") or not line else "\t".join(line.split(" "))
                     for line in rows.strip().splitlines()) + "\n\n"


SNIPPET = conllu("""
# newdoc id = a
# global.Entity = eid-etype-head-other
# sent_id = a1
1 The _ DET DT _ 2 det _ Entity=(e1-person-2
2 teacher _ NOUN NN _ 4 nsubj _ Entity=e1)
3-4 isn't _ _ _ _ _ _ _ _
3 is _ AUX VBZ _ 4 cop _ Entity=(e2-thing-1)
4 n't _ PART RB _ 0 root _ _
5 here _ ADV RB _ 4 advmod _ _

# sent_id = a2
1 She _ PRON PRP _ 2 nsubj _ Entity=(e1-person-1)
2 met _ VERB VBD _ 0 root _ _
3 Bob _ PROPN NNP _ 2 obj _ Entity=(e3-person-1(e4[1/2]-thing-2
4 Lee _ PROPN NNP _ 3 flat _ Entity=e3)e4[1/2])
5 and _ CCONJ CC _ 7 cc _ _
6 his _ PRON PRP$ _ 7 nmod:poss _ Entity=(e4[2/2]-thing-(e3-person-1)
7 dogs _ NOUN NNS _ 3 conj _ Entity=e4[2/2])
7.1 _ _ PRON PRP _ _ _ _ Entity=(e5-thing-1)

# newdoc id = b
# sent_id = b1
1 Old _ ADJ JJ _ 2 amod _ Entity=(e1-place-
2 towns _ NOUN NNS _ 0 root _ Entity=e1)
""")


def test_reader_gives_mentions_heads_and_clusters_exactly():
    docs = read_corefud(SNIPPET)
    assert [d.doc_id for d in docs] == ["a", "b"]
    a, b = docs
    # units: a multi-word token is one surface unit; the empty node is none
    assert a.units == ["The", "teacher", "isn't", "here", "She", "met", "Bob", "Lee", "and", "his", "dogs"]
    got = [(m.words, m.entity, a.units[m.head], m.type, m.text) for m in a.mentions]
    assert got == [
        ((0, 1), "e1", "teacher", "nominal", "the teacher"),  # head field 2
        ((2,), "e2", "isn't", "nominal", "isn't"),  # a syntactic word of a multi-word token maps to its unit
        ((4,), "e1", "She", "pronoun", "she"),
        ((6, 7), "e3", "Bob", "proper", "bob lee"),
        ((6, 7, 9, 10), "e4", "Lee", "proper", "bob lee his dogs"),  # discontinuous: union of parts, head field 2
        ((9,), "e3", "his", "pronoun", "his"),
    ]
    assert a.dropped == {"empty_only": 1}  # the mention on the empty node 7.1
    clusters = {}
    for m in a.mentions:
        clusters.setdefault(m.entity, []).append(m.words)
    assert clusters == {"e1": [(0, 1), (4,)], "e2": [(2,)], "e3": [(6, 7), (9,)], "e4": [(6, 7, 9, 10)]}
    # no head field: the word whose dependency head is outside the mention ("towns", the root)
    assert [(m.words, b.units[m.head], m.attributes) for m in b.mentions] == [((0, 1), "towns", ("pl", None, 3))]
    assert a.mentions[2].attributes == ("sg", "fem", 3)


@pytest.mark.parametrize("misc, message", [
    ("Entity=(e1-x-1", "never close"),
    ("Entity=e9)", "not open"),
    ("Entity=(e1-x-3)", "head '3'"),
    ("Entity=(e1-x-1)junk", "not a sequence"),
])
def test_reader_rejects_broken_brackets(misc, message):
    with pytest.raises(ValueError, match=message):
        read_corefud(conllu(f"1 Hi _ INTJ UH _ 0 root _ {misc}"))


# ------------------------------------------------------------------------------- baselines, by hand
# "The doctor met Mary. He thanked her. The doctor smiled." with e1 = {The doctor, He, The doctor}, e2 = {Mary, her}
TWO_CLUSTERS = conllu("""
# newdoc id = two
1 The _ DET DT _ 2 det _ Entity=(e1-person-2
2 doctor _ NOUN NN _ 3 nsubj _ Entity=e1)
3 met _ VERB VBD _ 0 root _ _
4 Mary _ PROPN NNP _ 3 obj _ Entity=(e2-person-1)
5 . _ PUNCT . _ 3 punct _ _

1 He _ PRON PRP _ 2 nsubj _ Entity=(e1-person-1)
2 thanked _ VERB VBD _ 0 root _ _
3 her _ PRON PRP _ 2 obj _ Entity=(e2-person-1)
4 . _ PUNCT . _ 2 punct _ _

1 The _ DET DT _ 2 det _ Entity=(e1-person-2
2 doctor _ NOUN NN _ 3 nsubj _ Entity=e1)
3 smiled _ VERB VBD _ 0 root _ _
4 . _ PUNCT . _ 3 punct _ _
""")


def test_baselines_on_a_two_cluster_document_exactly():
    (doc,) = read_corefud(TWO_CLUSTERS)
    preds = coref.baseline_predictions(doc.mentions)
    text = lambda m: None if m is None else (m.text, m.start)  # noqa: E731
    got = [(m.text, {b: text(p) for b, p in bp.items()}) for m, bp in preds]
    assert got == [
        # He: nearest Mary; no earlier "he"; gender of names unknown, so the compatible sieve takes Mary too
        ("he", {"nearest": ("mary", 3), "head_match": None, "rule_based": ("mary", 3)}),
        # her: nearest He; He is masculine, so the compatible sieve skips it for Mary
        ("her", {"nearest": ("he", 5), "head_match": None, "rule_based": ("mary", 3)}),
        # the doctor: exact string and head match find the first one
        ("the doctor", {"nearest": ("her", 7), "head_match": ("the doctor", 0), "rule_based": ("the doctor", 0)}),
    ]
    model, tokenizer = tiny_bert()
    result = coreference_heads(model, tokenizer, [doc], verify=0)
    assert result["queries"] == {"all": 3, "pronoun": 2, "proper": 0, "nominal": 1}
    assert result["baselines"] == {
        "nearest": {"all": 0.0, "pronoun": 0.0, "proper": None, "nominal": 0.0},
        "head_match": {"all": 1 / 3, "pronoun": 0.0, "proper": None, "nominal": 1.0},
        "rule_based": {"all": 2 / 3, "pronoun": 0.5, "proper": None, "nominal": 1.0},
    }


# ------------------------------------------------------------------------------- heads against a plain loop
def tiny_bert():
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=160, attn_implementation="eager")
    return BertModel(config).eval(), tokenizer


def loop_accuracy(model, tokenizer, docs, candidates, norm_to, max_tokens=128):
    """correct[kind][group][layer][head] by plain loops over the eager model's attentions and value vectors of each
    document alone (no padding)."""
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    dh = model.config.hidden_size // H
    correct = {k: {g: [[0] * H for _ in range(L)] for g in coref.GROUPS} for k in ("weights", "norms")}
    for doc in docs:
        enc = tokenizer(doc.units, is_split_into_words=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        full = tokenizer(doc.units, is_split_into_words=True).word_ids()
        wid = enc.word_ids()
        inside = {u for u in wid if u is not None and wid.count(u) == full.count(u)}
        kept = [m for m in doc.mentions if all(u in inside for u in m.words)]
        torch.set_grad_enabled(False)
        out = model(**enc, output_attentions=True, output_hidden_states=True)
        pieces = {u: [p for p, w in enumerate(wid) if w == u] for u in inside}
        for li in range(L):
            att = model.encoder.layer[li].attention
            v = out.hidden_states[li][0] @ att.self.value.weight.T + att.self.value.bias  # (n, d)
            alpha = out.attentions[li][0].double()
            for h in range(H):
                f = (v[:, h * dh:(h + 1) * dh] @ att.output.dense.weight[:, h * dh:(h + 1) * dh].T).double()  # (n, d)

                def score(kind, q, w):
                    total = 0.0
                    for i in pieces[q]:
                        if kind == "weights":
                            total += sum(float(alpha[h, i, t]) for t in pieces[w])
                        elif norm_to == "vector":
                            total += float(sum(alpha[h, i, t] * f[t] for t in pieces[w]).norm())
                        else:
                            total += sum(float(alpha[h, i, t] * f[t].norm()) for t in pieces[w])
                    return total / len(pieces[q])

                for m in kept:
                    before = [c for c in kept if c.start < m.start]
                    antecedents = [c for c in before if c.entity == m.entity]
                    if not antecedents:
                        continue
                    if candidates == "mentions":
                        words = {c.head for c in before if c.head != m.head}
                    else:
                        words = inside - {m.head}
                    for kind in ("weights", "norms"):
                        ok = False
                        if words:
                            best = max(words, key=lambda w: score(kind, m.head, w))
                            ok = best in {c.head for c in antecedents}
                        for g in ("all", m.type):
                            correct[kind][g][li][h] += int(ok)
    torch.set_grad_enabled(True)
    return correct


def rare_names_document(seed=0, n=40) -> str:
    """A random CorefUD document whose mentions are mostly rare names of several pieces (one-word mentions)."""
    import random

    rng = random.Random(seed)
    names = ["Zorbulax", "Quintavelle", "Brimblecombe", "Thistlewaite", "Fenwickshire"]
    rows = []
    for k in range(1, n + 1):
        e = rng.randrange(len(names))
        if k % 3 == 0:
            rows.append(f"{k} {rng.choice(['met', 'and', 'saw'])} _ VERB VB _ 0 root _ _")
        elif k % 3 == 1:
            rows.append(f"{k} {names[e]} _ PROPN NNP _ 0 root _ Entity=(e{e}-person-1)")
        else:
            rows.append(f"{k} {rng.choice(['he', 'it', 'them'])} _ PRON PRP _ 0 root _ Entity=(e{e}-person-1)")
    return conllu("# newdoc id = rare\n" + "\n".join(rows))


@pytest.mark.parametrize("candidates, norm_to", [("mentions", "vector"), ("mentions", "sum"), ("all_words", "vector")])
def test_head_accuracy_equals_a_plain_loop_over_the_eager_model(candidates, norm_to):
    model, tokenizer = tiny_bert()
    docs = read_corefud(coref.sample_coref_path()) + read_corefud(rare_names_document())
    result = coreference_heads(model, tokenizer, docs, candidates=candidates, norm_to=norm_to, batch_size=3, verify=1)
    expected = loop_accuracy(model, tokenizer, docs, candidates, norm_to)
    for kind in ("weights", "norms"):
        for g in coref.GROUPS:
            n = result["queries"][g]
            assert result["accuracy"][kind][g] == [[c / n for c in row] for row in expected[kind][g]], (kind, g)
    json.dumps(result, allow_nan=False)


def test_word_norms_are_the_norm_of_the_summed_vectors_not_the_sum_of_norms():
    torch.manual_seed(1)
    H, n, D = 2, 4, 5
    alpha = torch.softmax(torch.randn(H, n, n), -1)
    f = torch.randn(n, H, D)
    norms = alpha * f.norm(dim=-1).T[:, None, :]
    word_ids = [None, 0, 0, None]  # one word of two pieces between two specials
    vector = coref.word_maps(alpha, norms, f, word_ids, 1, "vector")["norms"]
    total = coref.word_maps(alpha, norms, f, word_ids, 1, "sum")["norms"]
    for h in range(H):
        rows = [((alpha[h, i, 1] * f[1, h] + alpha[h, i, 2] * f[2, h]).norm().item(),
                 (alpha[h, i, 1] * f[1, h]).norm().item() + (alpha[h, i, 2] * f[2, h]).norm().item()) for i in (1, 2)]
        assert vector[h, 0, 0].item() == pytest.approx(sum(r[0] for r in rows) / 2, rel=1e-6)
        assert total[h, 0, 0].item() == pytest.approx(sum(r[1] for r in rows) / 2, rel=1e-6)
    assert (vector < total).all()  # the triangle inequality is strict for vectors in general position


def test_window_drops_mentions_not_wholly_inside():
    model, tokenizer = tiny_bert()
    (doc,) = read_corefud(TWO_CLUSTERS)
    result = coreference_heads(model, tokenizer, [doc], max_tokens=10, verify=0)
    # [CLS] + 8 pieces + [SEP]: every word here is one piece, so words 0..7 (up to "her") are inside
    assert [len(tokenizer.tokenize(u)) for u in doc.units[:8]] == [1] * 8
    assert result["mentions"] == 4 and result["dropped_mentions"]["outside_window"] == 1
    assert result["queries"]["all"] == 2  # He and her; the second "The doctor" is outside


def test_bad_arguments_are_refused_in_one_sentence():
    model, tokenizer = tiny_bert()
    docs = read_corefud(TWO_CLUSTERS)
    with pytest.raises(ValueError, match="candidates must be one of"):
        coreference_heads(model, tokenizer, docs, candidates="everything")
    with pytest.raises(ValueError, match="max_tokens must be"):
        coreference_heads(model, tokenizer, docs, max_tokens=0)


# ------------------------------------------------------------------------------- MiniLM and the CLI
def test_minilm_on_the_shipped_sample():
    model, tokenizer = load_default_model()
    docs = read_corefud(coref.sample_coref_path())
    assert len(docs) >= 3 and coref.sample_coref_path().read_text().startswith("# license: CC0")
    result = coreference_heads(model, tokenizer, docs, layers=[0, -1])
    with_antecedent = sum(any(c.entity == m.entity and c.start < m.start for c in d.mentions)
                          for d in docs for m in d.mentions)
    assert result["queries"]["all"] == with_antecedent > 10
    assert result["layers"] == [1, 6] and result["heads"] == 12
    for kind in ("weights", "norms"):
        grid = result["accuracy"][kind]["all"]
        best = result["best"][kind]
        assert best["all"] == max(max(row) for row in grid) == grid[[1, 6].index(best["layer"])][best["head"] - 1]
    assert result["worst_spot_check_error"] < 1e-3
    lines = coref.summary_lines(result)
    assert lines[0].startswith("coreference: 4 documents")


def test_cli_coref_flag_writes_its_part_of_the_results(checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    code, stdout, err = run(["heads", "--model", checkpoint, "--limit", "2", "--coref", "--out", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["coreference"]["queries"]["all"] > 0 and "clustering" not in results
    assert (out / "coreference.png").is_file() and "## Coreference heads" in (out / "report.md").read_text()
    assert "baseline rule_based" in stdout
    code, _, err = run(["heads", "--model", checkpoint, "--coref", str(tmp_path / "missing.conllu"),
                        "--out", str(tmp_path / "x")], capsys)
    assert code != 0 and "does not exist" in err
