"""`kobattr align`: word alignment from the cross-attention maps of an encoder-decoder model, with AER against
gold alignments (Kobayashi et al. 2020, section 5)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..io import MANIFEST, staged_output
from .common import UsageError, add_run_options, check_layers, check_out, check_run_options, load_model

ALIGN_METHODS = ("cross_attn_w", "cross_attn_n", "cross_attnres_n", "cross_attnresln_n")



def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="local encoder-decoder checkpoint (Marian, BART, M2M-100 / NLLB, "
                                                       "mBART) with its tokenizer")
    parser.add_argument("--src", required=True, help="source sentences, one per line (UTF-8)")
    parser.add_argument("--tgt", required=True, help="their reference translations, one per line (teacher forcing)")
    parser.add_argument("--gold", help="gold alignments in Pharaoh format, one line per pair ('i-j' sure, 'i?j' or "
                                       "'i-j-P' possible; source index first; 0-based unless --one-based)")
    parser.add_argument("--one-based", action="store_true", help="--gold counts words from 1")
    parser.add_argument("--src-lang", help="source language code for tokenizers that take one (M2M-100, NLLB, mBART: "
                                           "e.g. de, deu_Latn, de_DE)")
    parser.add_argument("--tgt-lang", help="target language code, likewise")
    parser.add_argument("--methods", nargs="+", help=f"cross maps (default: {' '.join(ALIGN_METHODS)}; or 'all')")
    parser.add_argument("--layers", nargs="+", type=int, help="decoder layer indices as in analyze, from 0 (default: "
                                                              "all); files and tables count layers from 1")
    parser.add_argument("--scheme", choices=("sentencepiece", "bytelevel", "wordpiece"),
                        help="how the tokenizer marks words (default: detected from its '▁', 'Ġ' or '##' markers)")
    parser.add_argument("--batch-size", type=int, default=8, help="sentence pairs per batch (default: 8)")
    parser.add_argument("--heatmaps", type=int, default=2, help="target x source heatmaps for this many first pairs "
                                                                "(default: 2)")
    add_run_options(parser, "kobattr_align")
    parser.add_argument("--no-plots", action="store_true", help="skip the AER plot and the heatmaps")


def _sentence_lines(path_arg: str, option: str, blank_ok: bool = False) -> list[str]:
    """The lines of a UTF-8 text file with one sentence (or alignment) per line; UsageError naming the option for a
    missing, unreadable or empty file, and for a blank line unless ``blank_ok`` (a gold pair without links)."""
    path = Path(path_arg)
    if not path.exists():
        raise UsageError(f"{option} {path_arg!r} does not exist.")
    if not path.is_file():
        raise UsageError(f"{option} {path_arg!r} is not a file; give a text file with one sentence per line.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"{option} {path_arg!r} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except OSError as err:
        raise UsageError(f"{option} {path_arg!r} cannot be read ({err.strerror}).") from None
    if not lines or (not blank_ok and not any(line.strip() for line in lines)):
        raise UsageError(f"{option} {path_arg!r} is empty; give one {'alignment' if blank_ok else 'sentence'} per line.")
    if not blank_ok:
        blank = next((k for k, line in enumerate(lines, 1) if not line.strip()), None)
        if blank is not None:
            raise UsageError(f"{option} {path_arg!r} has a blank line {blank}; every line must hold a sentence (line k "
                             "of --src, --tgt and --gold is sentence pair k).")
    return lines


def _align_methods(requested) -> tuple[str, ...]:
    from ..seq2seq import CROSS_METHODS

    if requested is None:
        return ALIGN_METHODS
    if requested == "all":
        return tuple(CROSS_METHODS)
    names = tuple(dict.fromkeys(m.strip().lower().replace("-", "_") for m in requested))
    for m in names:
        if m not in CROSS_METHODS:
            raise UsageError(f"--methods {m!r} is no target x source map; align takes {', '.join(CROSS_METHODS)} "
                             "or 'all'.")
    return names


def _word_count(tokens, ids, special, scheme) -> int:
    from ..alignment import AlignmentInputError, group_words

    try:
        words = [w for w in group_words(tokens, ids, special, scheme) if w is not None]
    except AlignmentInputError:
        return -1
    return max(words) + 1 if words else 0


def _residual(method: str) -> bool:
    from ..seq2seq import CROSS_METHODS

    return CROSS_METHODS[method].residual


def run(args) -> int:
    """`kobattr align`: word alignment from the cross maps of an encoder-decoder model teacher-forced on the reference
    translations (spec section 7), AER against gold alignments, published like `analyze` (staging directory,
    manifest last)."""
    from .. import plots
    from ..alignment import SETTINGS, AlignmentInputError, aer, read_pharaoh, write_pharaoh
    from ..api import analyze

    check_run_options(args)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 sentence pair, got {args.batch_size}.")
    if args.heatmaps < 0:
        raise UsageError(f"--heatmaps must be 0 or more sentence pairs, got {args.heatmaps}.")
    methods = _align_methods(args.methods)
    sources = _sentence_lines(args.src, "--src")
    targets = _sentence_lines(args.tgt, "--tgt")
    if len(sources) != len(targets):
        raise UsageError(f"--src has {len(sources)} lines but --tgt has {len(targets)}; line k of each file is "
                         "sentence pair k, so they must have as many lines.")
    gold = None
    if args.gold:
        gold_lines = _sentence_lines(args.gold, "--gold", blank_ok=True)
        if len(gold_lines) != len(sources):
            raise UsageError(f"--gold has {len(gold_lines)} lines but --src and --tgt have {len(sources)}; give one "
                             "alignment line per sentence pair.")
        try:
            gold = read_pharaoh(gold_lines, one_based=args.one_based)
        except AlignmentInputError as err:
            hint = "" if args.one_based else " (for a file counting from 1 pass --one-based)"
            raise UsageError(f"--gold {args.gold!r}: {err}{hint}") from None
    elif args.one_based:
        raise UsageError("--one-based says how --gold counts words; give --gold too.")
    check_out(args)
    model, tokenizer = load_model(args.model, prog="kobattr align")
    for option, name, value in (("--src-lang", "src_lang", args.src_lang), ("--tgt-lang", "tgt_lang", args.tgt_lang)):
        if value is not None:
            if not hasattr(tokenizer, name):
                raise UsageError(f"{option}: the tokenizer ({type(tokenizer).__name__}) has no {name}; its language "
                                 "codes come from the checkpoint.")
            try:
                setattr(tokenizer, name, value)
            except (KeyError, ValueError) as err:
                raise UsageError(f"{option} {value!r} is not a language of this tokenizer ({err}).") from None
    from ..models import get_decoder_adapter

    n_layers = len(get_decoder_adapter(model).layer_modules(model))
    check_layers(args.layers, n_layers, "decoder layers")
    wanted = sorted({i % n_layers for i in args.layers}) if args.layers else list(range(n_layers))
    numbers = [i + 1 for i in wanted]  # files, tables and plots count layers from 1
    links = {m: {s: {i: [] for i in wanted} for s in SETTINGS} for m in methods}
    mismatched = {"source": 0, "target": 0}
    outside = 0
    written: list[str] = []
    manifest = lambda: {"kobattr": __import__("kobattr").__version__, "complete": True, "command": "align",  # noqa: E731
                        "src": str(args.src), "tgt": str(args.tgt), "gold": args.gold, "pairs": len(sources),
                        "files": sorted(written)}
    out = Path(args.out)
    with staged_output(out, manifest, overwrite=args.overwrite) as stage:

        def note(path: Path) -> None:
            written.append(path.relative_to(stage).as_posix())

        from tqdm.auto import tqdm

        starts = range(0, len(sources), args.batch_size)
        first = None
        for start in tqdm(starts, desc="sentence batches", file=sys.stderr):
            chunk = slice(start, start + args.batch_size)
            result = analyze(model, sources[chunk], targets=targets[chunk], tokenizer=tokenizer, methods=list(methods),
                             layers=wanted, backend=args.backend, max_length=args.max_length, encoder_methods=[])
            if first is None:
                first = result
            special = set(result.special_ids)
            for b in range(len(result.source_tokens)):
                k = start + b
                s_len, t_len = int(result.source_mask[b].sum()), int(result.attention_mask[b].sum())
                n_src = _word_count(result.source_tokens[b][:s_len], result.source_ids[b, :s_len], special, args.scheme)
                n_tgt = _word_count(result.label_tokens[b][:t_len], result.labels[b, :t_len], special, args.scheme)
                mismatched["source"] += n_src != len(sources[k].split())
                mismatched["target"] += n_tgt != len(targets[k].split())
                if gold is not None:
                    outside += any(s >= n_src or t >= n_tgt for s, t in gold[k][1])
                if k < args.heatmaps and not args.no_plots:
                    png = stage / "heatmaps" / f"pair{k:03d}.png"
                    png.parent.mkdir(exist_ok=True)
                    maps = {}
                    for m in methods:  # without padding; the preserved column (residual maps) stays last
                        full = result.maps[m][:, b, :t_len]
                        maps[m] = torch.cat([full[..., :s_len], full[..., -1:]], -1) if _residual(m) else full[..., :s_len]
                    plots.cross_grid(maps, result.source_tokens[b][:s_len], result.tokens[b][:t_len], png,
                                     layers=numbers, title=f"pair {k}: {sources[k][:60]}")
                    note(png)
                    # the token viewer: click a target token, see each source token's contribution per layer; maps
                    # without a preserved column get an empty one, so that every method shares the columns
                    kept = {m: t if _residual(m) else torch.cat([t, torch.full_like(t[..., :1], float("nan"))], -1)
                            for m, t in maps.items()}
                    note(plots.html_report(kept, result.tokens[b][:t_len], png.with_suffix(".html"),
                                           title=f"pair {k}: {sources[k][:60]}",
                                           column_tokens=[*result.source_tokens[b][:s_len], plots.PRESERVED_LABEL]))
            for b in range(len(result.source_tokens)):
                try:
                    for m in methods:
                        for setting in SETTINGS:
                            for i in wanted:
                                links[m][setting][i] += result.alignments(m, setting, layer=i, pairs=[b],
                                                                          scheme=args.scheme)
                except AlignmentInputError as err:
                    raise UsageError(f"sentence pair {start + b + 1} (line {start + b + 1} of --src and --tgt): "
                                     f"{err.__cause__ or err} (kobattr align: --scheme)") from None
        for m in methods:
            for setting in SETTINGS:
                for i in wanted:
                    path = stage / "alignments" / f"{m}.{setting}.layer{i + 1}.txt"
                    write_pharaoh(links[m][setting][i], path)
                    note(path)
        results = {"model": first.model_name, "structure": first.structure, "pairs": len(sources),
                   "methods": list(methods), "settings": list(SETTINGS), "layers": numbers,
                   "special_ids": list(first.special_ids), "gold": args.gold, "one_based": bool(args.one_based),
                   "word_count_mismatches": mismatched}
        table = None
        if gold is not None:
            table = {m: {s: [aer(links[m][s][i], gold) for i in wanted] for s in SETTINGS} for m in methods}
            results["aer"] = table
            results["gold_pairs_with_links_outside_the_words"] = outside
            scored = [(v, m, s, numbers[k]) for m in methods for s in SETTINGS for k, v in enumerate(table[m][s])
                      if v is not None]
            if scored:
                v, m, s, layer = min(scored)
                results["best"] = {"method": m, "setting": s, "layer": layer, "aer": v}
            if not args.no_plots:
                plots.aer_plot(table, numbers, path=stage / "aer_by_layer.png",
                               title=f"AER by decoder layer ({len(sources)} pairs)")
                note(stage / "aer_by_layer.png")
        (stage / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
        note(stage / "results.json")
    print(f"model: {first.model_name} ({first.structure}-LN decoder)  pairs: {len(sources)}  decoder layers: "
          f"{numbers[0]}..{numbers[-1]}")
    if mismatched["source"] or mismatched["target"]:
        print(f"warning: {mismatched['source']} source and {mismatched['target']} target sentence(s) have a different "
              "number of words than whitespace tokens; gold indices count whitespace tokens, so tokenize the text as "
              "the gold corpus is (see results.json).")
    if outside:
        print(f"warning: {outside} gold line(s) link words beyond the sentence's words (see results.json); check that "
              "--gold counts words as --src/--tgt are tokenised (and --one-based).")
    if table is not None:
        width = max(len(m) for m in methods) + len(" (output)") + 1
        print("alignment error rate (%) by decoder layer (- where undefined):")
        print(f"{'method (setting)':<{width}}" + "".join(f"{'layer ' + str(layer):>9}" for layer in numbers))
        for m in methods:
            for setting in SETTINGS:
                cells = "".join(f"{100 * v:>9.1f}" if v is not None else f"{'-':>9}" for v in table[m][setting])
                print(f"{m + ' (' + setting + ')':<{width}}" + cells)
        if "best" in results:
            best = results["best"]
            print(f"lowest AER: {100 * best['aer']:.1f}% ({best['method']}, {best['setting']}, layer {best['layer']})")
    n_align = sum(f.startswith("alignments/") for f in written)
    n_heat = sum(f.startswith("heatmaps/") for f in written)
    top = sorted(f for f in written if "/" not in f) + [MANIFEST]
    print(f"wrote {out}/: {', '.join(top)}; alignments/ ({n_align} Pharaoh files)"
          + (f"; heatmaps/ ({n_heat} PNG)" if n_heat else ""))
    return 0
