"""Word alignment from target x source maps and its alignment error rate (spec section 7, last bullet).

Model-independent: everything here works on piece-level maps, token ids and token strings that the caller
captured, so that `kobattr align` (issue 12) only has to run the model and call these functions.

Links are ``(source_word, target_word)`` pairs of 0-based word indices, source index first, as in the
Pharaoh format. One sentence pair's alignment is a set of links; a corpus is a list of them.

Pipeline for one sentence pair:

1. ``group_words``: the word index of every piece, from the tokenizer's pieces (strings as
   ``convert_ids_to_tokens`` gives them), with special pieces mapped to None (see *Word grouping*).
2. ``target_row_words``: the target word each map row stands for in a setting (see *Settings*).
3. ``word_map``: the piece-level map (T, S) or (T, S + 1) to a word-level map (T_words, S_words): sum over
   the source pieces of a word, mean over the target pieces (rows) of a word; special pieces and the
   preserved column (the last column of cross_attnres_n / cross_attnresln_n) are dropped.
4. ``align``: target word t aligns to the source word with the largest value in row t (ties: the lowest
   source index); the preserved column never aligns, since it is no longer there.

``align_sentence`` (and ``sentence_word_map``) do 1-4 in one call. ``read_pharaoh`` / ``write_pharaoh``
read and write alignments, ``aer`` scores a corpus.

Word grouping
-------------
Words are what the tokenizer's word markers say (for gold files, the corpus' whitespace tokens, which the
markers reproduce when the text is tokenised as it is written in the gold corpus). Schemes:

- ``"sentencepiece"`` (Marian, mBART, M2M-100, NLLB, T5): a piece starting with "▁" (U+2581) starts a word;
- ``"bytelevel"`` (BART, RoBERTa, GPT-2 style byte-level BPE): a piece starting with "Ġ" (U+0120) starts a word;
- ``"wordpiece"`` (BERT style): a piece starting with "##" continues the previous word, any other starts one.

In every scheme the first non-special piece starts word 0 whatever its form (byte-level BPE without a
prefix space, a language code before the first "▁" piece). Special pieces (those whose id is in
``special_ids``: BOS, EOS, padding, language codes, i.e. the tokenizer's ``all_special_ids``) get None and
do not end a word. A standalone marker piece ("▁", "Ġ") starts a word that the following pieces continue.
Detection (``scheme=None``): the first of "▁", "Ġ", "##" that some non-special piece starts with, in that
order; with no marker at all, two or more non-special pieces are ambiguous (one word in the first two
schemes, one word each in WordPiece) and raise, one piece or none is one word or none in every scheme.
Note that ``all_special_ids`` usually holds the unknown token too: a word-initial unknown piece (WordPiece
"[UNK]" stands for a whole word) is then dropped and the later word indices shift against the gold; leave
the unknown id out of ``special_ids`` where the text has unknown pieces.

Settings
--------
Teacher forcing on the reference translation y_0 ... y_{n-1} (the labels, usually ending with EOS): the
decoder input at row i is y_{i-1}, with row 0 holding the decoder start token (BOS, EOS or a language code,
depending on the model), and row i predicts y_i. Hence, for target token y_t:

- ``"output"`` (the word predicted at row i): y_t uses map row t;
- ``"input"`` (the word fed as decoder input at row i): y_t uses map row t + 1.

Row 0 in setting "input" is the decoder start token and never a target word; the label of the last row
(usually EOS, special) has no row in setting "input". ``target_row_words`` takes either the decoder input
ids (``ids_are="decoder_input"``, row r holds input token r) or the labels (``ids_are="labels"``, row r
predicts label r). The decoder input ids do not contain the label of the last row: in setting "output" that
row is taken to predict no word (right when the labels end with EOS, as seq2seq tokenizers make them); pass
the labels where they may not. Special targets (EOS, language codes, padding) never become words.

AER
---
AER(A; S, P) = 1 - (|A & S| + |A & P|) / (|A| + |S|) with S the sure and P the possible gold links, P
completed with S (sure links count as possible), the four counts summed over the whole corpus before the
division (the standard), not averaged per sentence; with no predicted and no sure link anywhere (0/0) it
is undefined and ``aer`` returns None.

Pharaoh format
--------------
One line per sentence pair, links separated by whitespace, source index first, 0-based by default
(``one_based=True`` for 1-based files): "i-j" and "i-j-S" are sure, "i?j" and "i-j-P" possible; an empty
line is a pair without links. ``write_pharaoh`` writes sure links as "i-j" and possible-only links as "i?j".
"""

from __future__ import annotations

import os
import re
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from .io import atomic_write

Link = tuple[int, int]  # (source word, target word)
GoldPair = tuple[set[Link], set[Link]]  # (sure, possible), possible including the sure links

SCHEMES = ("sentencepiece", "bytelevel", "wordpiece")
SETTINGS = ("input", "output")
IDS_ARE = ("decoder_input", "labels")
SP_MARK = "\u2581"  # "▁"
BL_MARK = "\u0120"  # "Ġ"
WP_CONT = "##"
_MARKERS = ((SP_MARK, "sentencepiece"), (BL_MARK, "bytelevel"), (WP_CONT, "wordpiece"))
_LINK = re.compile(r"(\d+)-(\d+)(?:-([SP]))?|(\d+)\?(\d+)")


class AlignmentInputError(ValueError):
    """Bad input to the alignment toolkit (tokens, maps, settings, Pharaoh files); one sentence, no traceback
    needed."""


# ----------------------------------------------------------------------------------------------- words


def _ints(ids: Iterable, what: str) -> list[int]:
    """The ids as a list of Python ints (lists, tuples, 1-D tensors and arrays all accepted)."""
    if isinstance(ids, Tensor) and ids.dim() != 1:
        raise AlignmentInputError(f"{what} must be one-dimensional, got shape {tuple(ids.shape)}.")
    try:
        return [int(i) for i in ids]
    except (TypeError, ValueError) as exc:
        raise AlignmentInputError(f"{what} must be a sequence of integer ids ({exc}).") from None


def detect_scheme(tokens: Sequence[str], special: Optional[Sequence[bool]] = None) -> Optional[str]:
    """The subword scheme the tokens show: the first of "▁" (sentencepiece), "Ġ" (bytelevel), "##"
    (wordpiece) that some non-special piece starts with, or None when no piece carries a marker.

    ``special``: per token, whether it is a special piece (left out of the detection); all False if omitted."""
    pieces = [tok for k, tok in enumerate(tokens) if not (special is not None and special[k])]
    for mark, scheme in _MARKERS:
        if any(tok.startswith(mark) for tok in pieces):
            return scheme
    return None


def group_words(tokens: Sequence[str], ids: Iterable, special_ids: AbstractSet[int],
                scheme: Optional[str] = None) -> list[Optional[int]]:
    """The 0-based word index of each piece, None for pieces whose id is in ``special_ids``.

    ``tokens``: the pieces as ``convert_ids_to_tokens(ids)`` gives them; ``scheme``: "sentencepiece",
    "bytelevel", "wordpiece" or None to detect it from the tokens (rules: the module docstring)."""
    ids = _ints(ids, "ids")
    tokens = list(tokens)
    if len(tokens) != len(ids):
        raise AlignmentInputError(f"tokens and ids differ in length ({len(tokens)} vs {len(ids)}).")
    special = [i in special_ids for i in ids]
    n_pieces = len(ids) - sum(special)
    if scheme is None:
        scheme = detect_scheme(tokens, special)
        if scheme is None:
            if n_pieces > 1:
                raise AlignmentInputError(
                    f"cannot tell the subword scheme from {n_pieces} pieces without a '▁', 'Ġ' or '##' marker; "
                    f"pass scheme= (one of {', '.join(SCHEMES)}).")
            scheme = "sentencepiece"  # one piece or none: every scheme groups it the same way
    elif scheme not in SCHEMES:
        raise AlignmentInputError(f"unknown subword scheme {scheme!r}; expected one of {', '.join(SCHEMES)}.")

    words: list[Optional[int]] = []
    current = -1
    for tok, is_special in zip(tokens, special):
        if is_special:
            words.append(None)
            continue
        if scheme == "wordpiece":
            starts = not tok.startswith(WP_CONT)
        else:
            starts = tok.startswith(SP_MARK if scheme == "sentencepiece" else BL_MARK)
        if starts or current < 0:
            current += 1
        words.append(current)
    return words


def target_row_words(target_ids: Iterable, target_tokens: Sequence[str], special_ids: AbstractSet[int],
                     setting: str, *, ids_are: str = "decoder_input",
                     scheme: Optional[str] = None) -> list[Optional[int]]:
    """The target word each map row stands for in ``setting`` ("input" or "output"), None for rows that
    stand for no target word (the decoder start token, special targets, the unknown last label).

    ``target_ids`` / ``target_tokens``: one per map row, the decoder input ids (``ids_are="decoder_input"``)
    or the labels (``ids_are="labels"``). Word indices count the non-special words of the reference
    translation from 0; row shifts: the module docstring (*Settings*)."""
    if setting not in SETTINGS:
        raise AlignmentInputError(f"unknown setting {setting!r}; expected 'input' or 'output'.")
    if ids_are not in IDS_ARE:
        raise AlignmentInputError(f"unknown ids_are {ids_are!r}; expected 'decoder_input' or 'labels'.")
    ids = _ints(target_ids, "target_ids")
    tokens = list(target_tokens)
    if len(tokens) != len(ids):
        raise AlignmentInputError(f"target tokens and ids differ in length ({len(tokens)} vs {len(ids)}).")
    rows = len(ids)
    if rows == 0:
        return []
    if ids_are == "decoder_input":
        # y_t = input token t + 1; row 0 is the decoder start token, the label of the last row is not here.
        y_words = group_words(tokens[1:], ids[1:], special_ids, scheme)
        if setting == "input":  # row r is fed y_{r-1}
            return [None] + y_words
        return y_words + [None]  # row r predicts y_r
    # labels: row r predicts y_r = label r
    y_words = group_words(tokens, ids, special_ids, scheme)
    if setting == "output":
        return y_words
    return [None] + y_words[:-1]  # row r is fed y_{r-1}; row 0 the start token; the last label has no row


# -------------------------------------------------------------------------------------------- word maps


def _n_words(groups: Sequence[Optional[int]], side: str) -> int:
    """The number of words in ``groups``, checking that the indices are 0..n-1 each with at least one piece."""
    present = {w for w in groups if w is not None}
    if any(not isinstance(w, int) or w < 0 for w in present):
        raise AlignmentInputError(f"{side} word indices must be non-negative integers or None.")
    n = max(present) + 1 if present else 0
    if len(present) != n:
        missing = sorted(set(range(n)) - present)
        raise AlignmentInputError(f"{side} word {missing[0]} has no piece (word indices must run 0..{n - 1}).")
    return n


def _membership(groups: Sequence[Optional[int]], n: int) -> Tensor:
    """(pieces, n) float64 one-hot matrix of piece -> word (all-zero rows for None)."""
    m = torch.zeros(len(groups), n, dtype=torch.float64)
    for k, w in enumerate(groups):
        if w is not None:
            m[k, w] = 1.0
    return m


def word_map(piece_map, target_words: Sequence[Optional[int]], source_words: Sequence[Optional[int]],
             has_preserved_column: bool = False) -> Tensor:
    """The word-level map (T_words, S_words), float64: for target word t and source word s, the mean over
    the rows of t of the sum over the columns of s of ``piece_map``.

    ``piece_map``: (T, S) or, with ``has_preserved_column``, (T, S + 1) whose last column (what the target
    position keeps) is dropped; a tensor, array or nested list. ``target_words``: the word of each row
    (length T), ``source_words``: of each source column (length S), None for special pieces."""
    m = torch.as_tensor(piece_map).detach().to("cpu", torch.float64)
    if m.dim() != 2:
        raise AlignmentInputError(f"the piece map must be 2-D (target x source), got shape {tuple(m.shape)}.")
    extra = 1 if has_preserved_column else 0
    if m.shape[0] != len(target_words):
        raise AlignmentInputError(f"the piece map has {m.shape[0]} rows but {len(target_words)} target pieces.")
    if m.shape[1] != len(source_words) + extra:
        raise AlignmentInputError(
            f"the piece map has {m.shape[1]} columns but {len(source_words)} source pieces"
            + (" plus the preserved column." if extra else "."))
    if extra:
        m = m[:, :-1]
    n_t = _n_words(target_words, "target")
    n_s = _n_words(source_words, "source")
    t = _membership(target_words, n_t)  # (T, T_words)
    s = _membership(source_words, n_s)  # (S, S_words)
    # a piece that is None has an all-zero membership row, so it adds nothing (and NaN/inf there cannot leak)
    m = torch.where(t.sum(1, keepdim=True) > 0, m, 0.0)
    m = torch.where(s.sum(1).unsqueeze(0) > 0, m, 0.0)
    summed = m @ s  # (T, S_words): sum over source pieces
    return (t.T @ summed) / t.sum(0).unsqueeze(1)  # mean over target pieces


def align(word_level_map) -> set[Link]:
    """The links (source word, target word): each target word (row) to the source word (column) of its
    largest value, ties to the lowest source index; no links when there is no source word."""
    m = torch.as_tensor(word_level_map).detach().to("cpu", torch.float64)
    if m.dim() != 2:
        raise AlignmentInputError(f"the word map must be 2-D (target x source), got shape {tuple(m.shape)}.")
    if m.shape[0] == 0 or m.shape[1] == 0:
        return set()
    if torch.isnan(m).any():
        raise AlignmentInputError("the word map contains NaN, so no argmax is defined.")
    best = torch.argmax(m, dim=1)  # the first maximal value on ties
    return {(int(s), t) for t, s in enumerate(best.tolist())}


def sentence_word_map(piece_map, target_ids: Iterable, target_tokens: Sequence[str], source_ids: Iterable,
                      source_tokens: Sequence[str], special_ids: AbstractSet[int], setting: str, *,
                      ids_are: str = "decoder_input", has_preserved_column: Optional[bool] = None,
                      scheme: Optional[str] = None) -> Tensor:
    """The word-level map (T_words, S_words) of one sentence pair in ``setting`` ("input" or "output") from
    its piece-level map (T, S) or (T, S + 1).

    ``target_ids`` / ``target_tokens``: one per row, the decoder input (``ids_are="decoder_input"``) or the
    labels (``ids_are="labels"``); ``source_ids`` / ``source_tokens``: one per source column.
    ``has_preserved_column``: None infers it from the width (S + 1 columns: yes). ``scheme``: None detects
    it from the source and target tokens together."""
    src_ids = _ints(source_ids, "source_ids")
    src_tokens = list(source_tokens)
    tgt_ids = _ints(target_ids, "target_ids")
    tgt_tokens = list(target_tokens)
    if scheme is None and len(src_tokens) == len(src_ids) and len(tgt_tokens) == len(tgt_ids):
        # one tokenizer for both sides: the side with a marker decides for the other (lengths: checked below)
        scheme = detect_scheme(src_tokens + tgt_tokens, [i in special_ids for i in src_ids + tgt_ids])
    if has_preserved_column is None:
        shape = torch.as_tensor(piece_map).shape
        has_preserved_column = len(shape) == 2 and shape[1] == len(src_ids) + 1
    rows = target_row_words(tgt_ids, tgt_tokens, special_ids, setting, ids_are=ids_are, scheme=scheme)
    cols = group_words(src_tokens, src_ids, special_ids, scheme)
    return word_map(piece_map, rows, cols, has_preserved_column)


def align_sentence(piece_map, target_ids: Iterable, target_tokens: Sequence[str], source_ids: Iterable,
                   source_tokens: Sequence[str], special_ids: AbstractSet[int], setting: str, *,
                   ids_are: str = "decoder_input", has_preserved_column: Optional[bool] = None,
                   scheme: Optional[str] = None) -> set[Link]:
    """The word links (source word, target word) of one sentence pair in ``setting`` ("input" or "output"):
    ``align(sentence_word_map(...))``, with the same arguments as ``sentence_word_map``."""
    return align(sentence_word_map(piece_map, target_ids, target_tokens, source_ids, source_tokens, special_ids,
                                   setting, ids_are=ids_are, has_preserved_column=has_preserved_column,
                                   scheme=scheme))


# ---------------------------------------------------------------------------------------------- Pharaoh


def parse_pharaoh_line(line: str, one_based: bool = False, line_number: int = 1) -> GoldPair:
    """The (sure, possible) links of one Pharaoh line, 0-based, possible including the sure links:
    "i-j" and "i-j-S" sure, "i?j" and "i-j-P" possible, source index first."""
    sure: set[Link] = set()
    possible: set[Link] = set()
    for token in line.split():
        match = _LINK.fullmatch(token)
        if match is None:
            raise AlignmentInputError(
                f"line {line_number}: malformed link {token!r} (expected 'i-j', 'i?j', 'i-j-S' or 'i-j-P').")
        if match.group(4) is not None:
            src, tgt, is_sure = int(match.group(4)), int(match.group(5)), False
        else:
            src, tgt, is_sure = int(match.group(1)), int(match.group(2)), match.group(3) != "P"
        if one_based:
            if src == 0 or tgt == 0:
                raise AlignmentInputError(f"line {line_number}: link {token!r} has index 0 in a 1-based file.")
            src, tgt = src - 1, tgt - 1
        (sure if is_sure else possible).add((src, tgt))
    return sure, possible | sure


def read_pharaoh(source: Union[str, os.PathLike, Iterable[str]], one_based: bool = False) -> list[GoldPair]:
    """Per line (sentence pair), the (sure, possible) sets of 0-based (source, target) word links, possible
    including the sure links; an empty line has no links.

    ``source``: a path (str or PathLike) or an iterable of lines; ``one_based``: the file counts from 1.
    A malformed line raises AlignmentInputError (a ValueError) naming the line number and the bad token."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as fh:
            return [parse_pharaoh_line(line, one_based, k) for k, line in enumerate(fh, 1)]
    if isinstance(source, bytes):
        raise AlignmentInputError("read_pharaoh takes a path or an iterable of str lines, not bytes.")
    return [parse_pharaoh_line(line, one_based, k) for k, line in enumerate(source, 1)]


def _check_link(link, where: str) -> Link:
    """The link as a pair of non-negative ints."""
    try:
        src, tgt = link
        src_i, tgt_i = int(src), int(tgt)
    except (TypeError, ValueError):
        raise AlignmentInputError(f"{where}: {link!r} is not a (source, target) pair of integers.") from None
    if src_i != src or tgt_i != tgt or src_i < 0 or tgt_i < 0:
        raise AlignmentInputError(f"{where}: {link!r} is not a pair of non-negative integer word indices.")
    return src_i, tgt_i


def _is_gold_pair(item) -> bool:
    """Whether ``item`` is a (sure, possible) pair of sets rather than a set of links."""
    return isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, AbstractSet) for x in item)


def format_pharaoh(links, one_based: bool = False) -> str:
    """One Pharaoh line (no newline) for a set of links, or for a (sure, possible) pair: sure links as
    "i-j", possible-only links as "i?j", sorted by source then target index."""
    shift = 1 if one_based else 0
    if _is_gold_pair(links):
        sure = {_check_link(x, "sure link") for x in links[0]}
        possible = {_check_link(x, "possible link") for x in links[1]} - sure
    else:
        sure, possible = {_check_link(x, "link") for x in links}, set()
    marked = [(link, "-") for link in sure] + [(link, "?") for link in possible]
    return " ".join(f"{s + shift}{sep}{t + shift}" for (s, t), sep in sorted(marked))


def write_pharaoh(alignments: Iterable, path: Union[str, os.PathLike], one_based: bool = False) -> None:
    """Writes one Pharaoh line per sentence pair to ``path`` (atomically, parent folders created).

    Each item: a set of (source, target) links (written as "i-j"), or a (sure, possible) pair of sets
    (sure as "i-j", possible-only as "i?j"); ``one_based`` writes indices counted from 1."""
    lines = [format_pharaoh(item, one_based) + "\n" for item in alignments]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(lines)

    atomic_write(path, write)


# ------------------------------------------------------------------------------------------------- AER


def aer(predicted: Sequence[Iterable], gold: Sequence[tuple[Iterable, Iterable]]) -> Optional[float]:
    """The corpus-level alignment error rate 1 - (|A & S| + |A & P|) / (|A| + |S|), each count summed
    over all sentence pairs before the division, P completed with S; None when |A| + |S| is 0 (undefined).

    ``predicted``: per sentence pair, the predicted links A; ``gold``: per sentence pair, (sure S, possible P)
    as ``read_pharaoh`` gives them. Both must have one entry per sentence pair."""
    predicted = list(predicted)
    gold = list(gold)
    if len(predicted) != len(gold):
        raise AlignmentInputError(
            f"predicted and gold alignments differ in length ({len(predicted)} vs {len(gold)} sentence pairs).")
    n_a = n_s = a_and_s = a_and_p = 0
    for k, (links, pair) in enumerate(zip(predicted, gold)):
        try:
            sure_in, possible_in = pair
        except (TypeError, ValueError):
            raise AlignmentInputError(f"gold entry {k} is not a (sure, possible) pair.") from None
        a = {_check_link(x, f"predicted entry {k}") for x in links}
        s = {_check_link(x, f"gold entry {k}") for x in sure_in}
        p = {_check_link(x, f"gold entry {k}") for x in possible_in} | s
        n_a += len(a)
        n_s += len(s)
        a_and_s += len(a & s)
        a_and_p += len(a & p)
    if n_a + n_s == 0:
        return None
    return 1.0 - (a_and_s + a_and_p) / (n_a + n_s)


__all__ = ["AlignmentInputError", "GoldPair", "IDS_ARE", "Link", "SCHEMES", "SETTINGS", "aer", "align",
           "align_sentence", "detect_scheme", "format_pharaoh", "group_words", "parse_pharaoh_line", "read_pharaoh",
           "sentence_word_map", "target_row_words", "word_map", "write_pharaoh"]
