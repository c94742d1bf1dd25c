"""`kobattr view`: a saved result as standalone HTML views in a folder."""

from pathlib import Path

from .common import UsageError


def add_arguments(parser) -> None:
    parser.add_argument("file", help="a result file written by Attribution.save or kobattr analyze (.safetensors)")
    parser.add_argument("--out", help="folder for the pages (default: <file name>_view beside the file); index.html and "
                                      "the view pages are replaced, nothing else is touched")
    parser.add_argument("--view", nargs="+", choices=("tokens", "head", "model"), help="views to write (default: all)")
    parser.add_argument("--part", nargs="+", choices=("encoder", "decoder", "cross"),
                        help="parts of an encoder-decoder result (default: all)")
    parser.add_argument("--method", nargs="+", help="methods to show (default: all; the head view: the per-head ones)")
    parser.add_argument("--layer", nargs="+", type=int, help="layer indices as in analyze, negative from the end "
                                                             "(default: all)")
    parser.add_argument("--heads", nargs="+", type=int, help="head indices (default: all)")
    parser.add_argument("--batch", nargs="+", type=int, help="which texts of the file (default: all)")
    parser.add_argument("--top-k", type=int, help="entries per query row to embed (default: all up to 64 tokens, else 20, "
                                                  "fewer when a page would hold over a million)")


def run(args) -> int:
    """`kobattr view`: a saved result as standalone HTML views in a folder (kobattr.views.write_folder)."""
    from ..result import SUFFIX, Attribution, attribution_path
    from ..views import write_folder

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
