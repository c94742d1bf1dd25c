"""kobattr.alignment: word grouping, word maps, argmax links, the two teacher-forcing settings, Pharaoh files
and corpus-level AER, all on hand-computed cases."""

import numpy as np
import pytest
import torch

from kobattr.alignment import (AlignmentInputError, aer, align, align_sentence, detect_scheme, format_pharaoh,
                               group_words, read_pharaoh, sentence_word_map, target_row_words, word_map,
                               write_pharaoh)


# ---------------------------------------------------------------------------------------------------- AER


def test_aer_perfect_is_zero():
    links = {(0, 0), (1, 1), (2, 1)}
    assert aer([links], [(links, links)]) == 0.0


def test_aer_disjoint_is_one():
    assert aer([{(0, 1), (1, 0)}], [({(0, 0), (1, 1)}, {(0, 0), (1, 1)})]) == 1.0


def test_aer_possible_only_link_counts_in_a_and_p_not_a_and_s():
    # S = {(0,0)}, P = {(0,0),(1,1)}, A = {(1,1)}: |A&S| = 0, |A&P| = 1 -> 1 - 1 / (1 + 1)
    assert aer([{(1, 1)}], [({(0, 0)}, {(0, 0), (1, 1)})]) == pytest.approx(0.5)
    # the same link as sure: |A&S| = |A&P| = 1, |S| = 2 -> 1 - 2 / 3
    assert aer([{(1, 1)}], [({(0, 0), (1, 1)}, {(0, 0), (1, 1)})]) == pytest.approx(1 / 3)


def test_aer_completes_possible_with_sure():
    # P given without the sure link: it still counts as possible -> 1 - (1 + 1) / (1 + 1) = 0, not 0.5
    assert aer([{(0, 0)}], [({(0, 0)}, set())]) == 0.0


def test_aer_is_corpus_level_not_per_sentence_mean():
    predicted = [{(0, 0)}, {(0, 0), (1, 1), (2, 2)}]
    gold = [({(0, 0)}, {(0, 0)}), ({(2, 2)}, {(2, 2)})]
    # per sentence: 0 and 1 - 2/4 = 0.5, mean 0.25; corpus: 1 - (2 + 2) / (4 + 2) = 1/3
    assert aer(predicted, gold) == pytest.approx(1 / 3)
    assert aer(predicted, gold) != pytest.approx(0.25)


def test_aer_empty_cases():
    assert aer([set()], [(set(), set())]) is None  # 0/0: undefined
    assert aer([], []) is None
    assert aer([set(), set()], [(set(), {(0, 0)}), (set(), set())]) is None  # possible links only, no A
    assert aer([set()], [({(0, 0)}, {(0, 0)})]) == 1.0  # nothing predicted, something sure
    assert aer([{(0, 0)}], [(set(), {(0, 0)})]) == 0.0  # no sure link, the prediction is possible


def test_aer_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length"):
        aer([set(), set()], [(set(), set())])


# ------------------------------------------------------------------------------------------------ Pharaoh


def test_pharaoh_round_trip(tmp_path):
    alignments = [{(0, 0), (2, 1), (1, 3)}, set(), ({(0, 0)}, {(0, 0), (1, 1)})]
    path = tmp_path / "alignments" / "cross_attn_n.output.layer3.txt"
    write_pharaoh(alignments, path)
    assert path.read_text() == "0-0 1-3 2-1\n\n0-0 1?1\n"
    back = read_pharaoh(path)
    assert back == [({(0, 0), (2, 1), (1, 3)}, {(0, 0), (2, 1), (1, 3)}), (set(), set()),
                    ({(0, 0)}, {(0, 0), (1, 1)})]
    assert read_pharaoh(str(path)) == back


def test_pharaoh_possible_forms():
    [(sure, possible)] = read_pharaoh(["0-0 1?2 3-4-P 5-6-S\n"])
    assert sure == {(0, 0), (5, 6)}
    assert possible == {(0, 0), (1, 2), (3, 4), (5, 6)}  # possible includes the sure links
    assert read_pharaoh(["  ", ""]) == [(set(), set()), (set(), set())]


def test_pharaoh_one_based(tmp_path):
    [(sure, possible)] = read_pharaoh(["1-1 2?3 4-2-P"], one_based=True)
    assert sure == {(0, 0)} and possible == {(0, 0), (1, 2), (3, 1)}
    assert read_pharaoh(["1-1"]) == [({(1, 1)}, {(1, 1)})]  # 0-based by default
    path = tmp_path / "a.txt"
    write_pharaoh([{(0, 0), (3, 1)}, ({(0, 2)}, {(0, 2), (1, 0)})], path, one_based=True)
    assert path.read_text() == "1-1 4-2\n1-3 2?1\n"
    assert format_pharaoh({(0, 0), (3, 1)}) == "0-0 3-1"
    with pytest.raises(ValueError, match="line 2.*index 0"):
        read_pharaoh(["1-1", "0-1"], one_based=True)


@pytest.mark.parametrize("bad", ["1-", "a-b", "1-2-X", "1?2-P", "-1-2", "1--2"])
def test_pharaoh_malformed_line_names_line_and_token(bad):
    with pytest.raises(ValueError, match=rf"line 3: malformed link '{bad.replace('?', '[?]')}'"):
        read_pharaoh(["0-0", "", f"0-1 {bad} 2-2"])


def test_write_pharaoh_rejects_bad_links(tmp_path):
    with pytest.raises(ValueError, match="not a pair of non-negative"):
        write_pharaoh([{(-1, 0)}], tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


# ------------------------------------------------------------------------------------------ word grouping


def test_group_words_sentencepiece_with_language_code_and_specials():
    tokens = ["__de__", "▁Das", "▁Haus", "chen", "▁ist", "▁klein", ".", "</s>", "<pad>"]
    ids = [5, 10, 11, 12, 13, 14, 15, 2, 1]
    special = {1, 2, 5}
    assert detect_scheme(tokens) == "sentencepiece"
    assert group_words(tokens, ids, special) == [None, 0, 1, 1, 2, 3, 3, None, None]
    # mBART puts the language code last; a tensor of ids works too
    tokens = ["▁Das", "▁Haus", "chen", "</s>", "de_DE"]
    assert group_words(tokens, torch.tensor([10, 11, 12, 2, 7]), {2, 7}) == [0, 1, 1, None, None]
    # the first piece starts a word even without "▁"; a lone "▁" starts a word the next piece continues
    assert group_words(["eng_Latn", "Hi", "▁", "(", "x", "▁y"], [9, 20, 21, 22, 23, 24], {9},
                       scheme="sentencepiece") == [None, 0, 1, 1, 1, 2]


def test_group_words_bytelevel():
    tokens = ["<s>", "The", "Ġcat", "Ġsit", "s", ".", "</s>", "<pad>"]
    ids = [0, 100, 101, 102, 103, 104, 2, 1]
    assert detect_scheme(tokens) == "bytelevel"
    assert group_words(tokens, ids, {0, 1, 2}) == [None, 0, 1, 2, 2, 2, None, None]


def test_group_words_wordpiece():
    tokens = ["[CLS]", "the", "un", "##believ", "##able", "cat", "[SEP]", "[PAD]"]
    ids = [101, 1996, 4895, 9, 8, 4937, 102, 0]
    assert detect_scheme(tokens) == "wordpiece"
    assert group_words(tokens, ids, {0, 101, 102}) == [None, 0, 1, 1, 1, 2, None, None]


def test_group_words_specials_by_id_and_explicit_scheme():
    # specials are told by id, not by their string: a "</s>" whose id is not special is a word piece
    assert group_words(["▁a", "</s>"], [3, 4], {2}) == [0, 0]
    # an explicit scheme overrides detection: "▁" pieces read as WordPiece are one word each
    assert group_words(["▁a", "b", "▁c"], [3, 4, 5], set(), scheme="wordpiece") == [0, 1, 2]
    assert group_words(["▁a", "b", "▁c"], [3, 4, 5], set()) == [0, 0, 1]


def test_group_words_errors_and_ambiguity():
    assert group_words(["<s>", "hello", "</s>"], [0, 5, 2], {0, 2}) == [None, 0, None]  # one piece: no doubt
    assert group_words([], [], set()) == []
    with pytest.raises(ValueError, match="cannot tell the subword scheme"):
        group_words(["hel", "lo"], [5, 6], set())
    with pytest.raises(ValueError, match="differ in length"):
        group_words(["▁a"], [1, 2], set())
    with pytest.raises(ValueError, match="unknown subword scheme"):
        group_words(["▁a"], [1], set(), scheme="bpe")


# ----------------------------------------------------------------------------------------------- word_map


def test_word_map_sums_source_pieces_means_target_pieces_and_drops_preserved():
    # rows: start, word 0 (two pieces), word 1, eos; columns: source word 0 (two pieces), word 1, </s>, kept
    target = [None, 0, 0, 1, None]
    source = [0, 0, 1, None]
    piece = torch.tensor([
        [9.0, 9.0, 9.0, 9.0, 100.0],
        [1.0, 2.0, 3.0, 0.0, 100.0],
        [3.0, 0.0, 1.0, 0.0, 100.0],
        [0.0, 1.0, 5.0, 50.0, 100.0],
        [7.0, 7.0, 7.0, 7.0, 100.0],
    ])
    words = word_map(piece, target, source, has_preserved_column=True)
    # word 0: mean of rows 1, 2 of (sum of columns 0-1, column 2) = mean([3, 3], [3, 1]) = [3, 2]
    torch.testing.assert_close(words, torch.tensor([[3.0, 2.0], [1.0, 5.0]], dtype=torch.float64))
    # a mean over the source pieces would give [1.5, 2] and align word 0 to source word 1
    assert align(words) == {(0, 0), (1, 1)}  # the preserved column (the largest value) never aligns
    # numpy input; without the preserved column the width must be exactly S
    torch.testing.assert_close(word_map(piece[:, :4].numpy(), target, source), words)
    with pytest.raises(ValueError, match="5 columns but 4 source pieces"):
        word_map(piece, target, source)
    with pytest.raises(ValueError, match="4 columns but 4 source pieces plus the preserved column"):
        word_map(piece[:, :4], target, source, has_preserved_column=True)


def test_word_map_specials_do_not_leak_nan():
    piece = torch.tensor([[float("nan"), float("nan")], [1.0, float("nan")]])
    torch.testing.assert_close(word_map(piece, [None, 0], [0, None]), torch.tensor([[1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="source word 0 has no piece"):
        word_map(torch.zeros(1, 1), [0], [1])


def test_align_ties_empty_and_nan():
    assert align(torch.tensor([[2.0, 2.0, 1.0], [0.0, 3.0, 3.0]])) == {(0, 0), (1, 1)}  # ties: lowest source
    assert align(torch.zeros(2, 0)) == set()  # no source word: no link
    assert align(torch.zeros(0, 3)) == set()
    assert align(np.array([[0.1, 0.7]])) == {(1, 0)}
    with pytest.raises(ValueError, match="NaN"):
        align(torch.tensor([[float("nan"), 1.0]]))


# ------------------------------------------------------------------------------------------------ settings

START, Y0, Y1, Y2, EOS, PAD = 50, 60, 61, 62, 2, 1
SRC_TOKENS = ["▁s0", "▁s1", "▁s2", "▁s3", "</s>"]
SRC_IDS = [10, 11, 12, 13, EOS]
SPECIAL = {START, EOS, PAD}


def planted(rows: int = 4, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """(rows, 5 + 1): row r attends to source word r only (weight ``weights[r]``); the </s> column and the
    preserved column hold more than any source word."""
    m = torch.zeros(rows, len(SRC_IDS) + 1)
    for r in range(rows):
        m[r, r] = weights[r]
    m[:, 4] = 20.0
    m[:, 5] = 30.0
    return m


def test_target_row_words_shift():
    dec = ([START, Y0, Y1, Y2], ["de_DE", "▁y0", "▁y1", "▁y2"])
    lab = ([Y0, Y1, Y2, EOS], ["▁y0", "▁y1", "▁y2", "</s>"])
    assert target_row_words(*dec, SPECIAL, "output") == [0, 1, 2, None]
    assert target_row_words(*dec, SPECIAL, "input") == [None, 0, 1, 2]
    assert target_row_words(*lab, SPECIAL, "output", ids_are="labels") == [0, 1, 2, None]
    assert target_row_words(*lab, SPECIAL, "input", ids_are="labels") == [None, 0, 1, 2]
    # the decoder start token at row 0 is never a target word, even when its id is not in special_ids
    assert target_row_words([7, Y0, Y1], ["▁x", "▁y0", "▁y1"], SPECIAL, "input") == [None, 0, 1]
    # mBART-50 labels: [language code, words..., eos]
    assert target_row_words([START, Y0, Y1, EOS], ["de_DE", "▁y0", "▁y1", "</s>"], SPECIAL, "output",
                            ids_are="labels") == [None, 0, 1, None]
    assert target_row_words([START, Y0, Y1, EOS], ["de_DE", "▁y0", "▁y1", "</s>"], SPECIAL, "input",
                            ids_are="labels") == [None, None, 0, 1]
    with pytest.raises(ValueError, match="unknown setting"):
        target_row_words(*dec, SPECIAL, "middle")
    with pytest.raises(ValueError, match="unknown ids_are"):
        target_row_words(*dec, SPECIAL, "input", ids_are="targets")


def test_settings_on_planted_map():
    m = planted()
    dec = ([START, Y0, Y1, Y2], ["de_DE", "▁y0", "▁y1", "▁y2"])
    lab = ([Y0, Y1, Y2, EOS], ["▁y0", "▁y1", "▁y2", "</s>"])
    # output: y_t uses row t -> source word t; input: y_t uses row t + 1 -> source word t + 1
    for ids, tokens, ids_are in (dec + ("decoder_input",), lab + ("labels",)):
        assert align_sentence(m, ids, tokens, SRC_IDS, SRC_TOKENS, SPECIAL, "output",
                              ids_are=ids_are) == {(0, 0), (1, 1), (2, 2)}
        assert align_sentence(m, ids, tokens, SRC_IDS, SRC_TOKENS, SPECIAL, "input",
                              ids_are=ids_are) == {(1, 0), (2, 1), (3, 2)}
    # the preserved column is inferred from the width; without it (width S) the result is the same
    assert align_sentence(m[:, :5], *dec, SRC_IDS, SRC_TOKENS, SPECIAL, "input") == {(1, 0), (2, 1), (3, 2)}


def test_settings_with_a_two_piece_target_word():
    # y = "▁y0", "▁y1", "z" (word 1 has two pieces), eos; row r -> source word r with weight r + 1
    m = planted(weights=(1.0, 2.0, 3.0, 4.0))
    dec = ([START, Y0, Y1, 63], ["de_DE", "▁y0", "▁y1", "z"])
    out = sentence_word_map(m, *dec, SRC_IDS, SRC_TOKENS, SPECIAL, "output")
    # word 1 = mean of rows 1, 2 -> [0, 1, 1.5, 0] over the four source words
    torch.testing.assert_close(out, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.5, 0]], dtype=torch.float64))
    assert align(out) == {(0, 0), (2, 1)}
    assert align_sentence(m, *dec, SRC_IDS, SRC_TOKENS, SPECIAL, "input") == {(1, 0), (3, 1)}


# ------------------------------------------------------------------------------------ real tokenizer output


def _train(kind: str):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    corpus = ["the cat sat on the mat", "a dog sat on a log", "the unbelievable cats were sitting",
              "dogs and cats and logs"] * 5
    specials = ["<pad>", "<s>", "</s>", "de_DE"]
    if kind == "wordpiece":
        tok = tokenizers.Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=60, special_tokens=specials + ["<unk>"])
    else:
        tok = tokenizers.Tokenizer(models.BPE())
        if kind == "metaspace":
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            tok.decoder = decoders.Metaspace()
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        initial = pre_tokenizers.ByteLevel.alphabet() if kind == "bytelevel" else []
        trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=specials, initial_alphabet=initial)
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.mark.parametrize("kind,scheme,strip", [("metaspace", "sentencepiece", "▁"), ("bytelevel", "bytelevel", "Ġ"),
                                                ("wordpiece", "wordpiece", "##")])
def test_group_words_on_trained_tokenizer(kind, scheme, strip):
    tok = _train(kind)
    text = "the unbelievable dogs sat on logs"
    enc = tok.encode(text)
    special_ids = {tok.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "de_DE")}
    ids = [tok.token_to_id("de_DE")] + enc.ids + [tok.token_to_id("</s>"), tok.token_to_id("<pad>")]
    tokens = [tok.id_to_token(i) for i in ids]
    assert len(enc.ids) > len(text.split())  # some words really are split into pieces
    assert detect_scheme(tokens) == scheme
    words = group_words(tokens, ids, special_ids)
    assert words[0] is None and words[-2:] == [None, None]
    joined = {}
    for tok_str, w in zip(tokens, words):
        if w is not None:
            joined[w] = joined.get(w, "") + (tok_str[len(strip):] if tok_str.startswith(strip) else tok_str)
    assert [joined[w] for w in sorted(joined)] == text.split()
