"""`kobattr selftest`: every available implementation against the reference on this device."""

import json
from pathlib import Path

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if torch sees a GPU, else cpu")
    parser.add_argument("--backends", default=None, help="comma-separated implementations to test (default: all available)")
    parser.add_argument("--dtypes", default=None, help="comma-separated, e.g. float32,bfloat16 (default: float32, plus "
                                                       "float16 and bfloat16 on cuda)")
    parser.add_argument("--json", default=None, help="also write every outcome to this JSON file")
    parser.add_argument("--verbose", action="store_true", help="print each outcome as soon as it is known")


def run(args) -> int:
    from ..selftest import run

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
