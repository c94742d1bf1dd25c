"""What each ff_gemm choice costs in accuracy: the FF maps' error against the float64 reference, per choice.

    python benchmarks/ff_gemm_accuracy.py [--N 64] [--shape bert-base] [--device cpu] [--causal]

On a layer of BERT-base's shape with random weights (benchmarks/run.py build_layer), for a float32 model and
its bfloat16 and float16 roundings: the largest row error (kobattr.verify.row_errors: max |got - ref| over a
row / max |ref| of that row) of every FF method against the materialising reference in float64 on the same
(rounded) weights, next to the error of the reference computed in the model's own dtype (the flash-attention
rule's yardstick). tf32 runs on CUDA only. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import build_layer  # noqa: E402

from kobattr.backends import BackendUnavailable  # noqa: E402
from kobattr.core import attribute  # noqa: E402
from kobattr.methods import ff_methods  # noqa: E402
from kobattr.reference import reference  # noqa: E402
from kobattr.verify import row_errors  # noqa: E402

CHOICES = {torch.float32: ("float32", "tf32", "bfloat16", "float16"), torch.bfloat16: ("auto", "float32"),
           torch.float16: ("auto", "float32")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    base = build_layer(args.N, args.device, causal=args.causal)
    base.head_outputs = None  # the reference recomputes attention; so do the implementations here
    methods = ff_methods(["atbff", "atbffres", "atbffresln"], base.structure)
    print(f"FF map error vs the float64 reference, BERT-base shape, N={args.N}, {args.device}"
          f"{', causal' if args.causal else ''} (max row error over the map)")
    print(f"{'model':<9} {'ff_gemm':<9} " + " ".join(f"{m:>11}" for m in methods) + "   reference in model dtype")
    for model_dtype, choices in CHOICES.items():
        layer = base.to(dtype=model_dtype)
        exact = reference(layer.to(dtype=torch.float64), methods=methods)["maps"]
        own = reference(layer, methods=methods, dtype=model_dtype)["maps"]
        yardstick = " ".join(f"{float(row_errors(own[m], exact[m]).max()):.1e}" for m in methods)
        for choice in choices:
            if choice == "tf32" and args.device != "cuda":
                print(f"{str(model_dtype)[6:]:<9} {choice:<9} (CUDA only)")
                continue
            try:
                res = attribute(layer, methods=methods, ff_gemm=choice, verify=0)
            except BackendUnavailable as err:
                print(f"{str(model_dtype)[6:]:<9} {choice:<9} (refused: {err})")
                continue
            errs = " ".join(f"{float(row_errors(res.maps[m], exact[m]).max()):>11.1e}" for m in methods)
            print(f"{str(model_dtype)[6:]:<9} {choice:<9} {errs}   {yardstick}")


if __name__ == "__main__":
    main()
