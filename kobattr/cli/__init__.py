"""The `kobattr` command: builds the parser from COMMANDS and dispatches. Each command is one module with
``add_arguments(parser)`` and ``run(args)`` (its exit status); adding a command is such a module and one line in
COMMANDS. What the commands share is in kobattr.cli.common, the output folder in kobattr.io."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..io import MANIFEST, STAGING_PREFIX, WRITE_ERRNOS  # noqa: F401 (MANIFEST, STAGING_PREFIX: the output layout, as tests and scripts import it)
from .common import user_errors

# (name, module, help) in the order of `kobattr --help`; relative modules are inside kobattr.cli
COMMANDS = [
    ("analyze", ".analyze", "attribute texts and write maps, plots and an HTML page"),
    ("info", ".info", "versions, available backends and compiled extensions"),
    ("selftest", ".selftest", "every available implementation against the reference on this device "
                              "(run it after installing on a GPU machine)"),
    ("reproduce", ".reproduce", "re-measure the Kobayashi et al. 2020/2021/2024 findings on a bundled corpus"),
    ("heads", ".heads", "per-head statistics and dependency probing (Clark et al. 2019, Kobayashi et al. 2020)"),
    ("align", ".align", "word alignment from the cross-attention maps of an encoder-decoder model, with AER "
                        "against gold alignments (Kobayashi et al. 2020, section 5)"),
    ("view", ".view", "a saved result as HTML views (tokens, heads, model) in a folder, no server needed"),
    ("corpus", ".corpus", "mixing ratios of every token of a corpus: pooled statistics, a per-token Parquet table, "
                          "resumable, shared by the ranks of torchrun"),
    ("bench", "kobattr.bench", "time each method's map for one layer against SDPA and this device's GEMM rate"),
    ("tune", "kobattr.tuner", "measure the fastest correct implementation per primitive on this device and cache it "
                              "(used with KOBATTR_TUNE=1)"),
]


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``kobattr analyze: error: ...``, and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="kobattr", description="Token-wise attribution analysis of transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, help in COMMANDS:
        command = importlib.import_module(module, __name__)
        command.add_arguments(sub.add_parser(name, help=help))
        sub.choices[name].set_defaults(func=command.run)
    return parser


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
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        # every output is staged (analyze, heads, align) or written file by file atomically (corpus, view), so a
        # failed write left no partial file behind
        kept = ("its complete shards are kept for --resume" if args.command == "corpus" else
                "it is as it was before this run" if hasattr(args, "overwrite") else "no partial file was left")
        print(f"kobattr {args.command}: error: cannot write the output into {getattr(args, 'out', None) or '.'}: "
              f"{err.strerror}; {kept}.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kobattr {args.command}: interrupted", file=sys.stderr)
        return 130
