"""How the Triton key splits pay off on a GPU: rows= with few query rows, timed per FILL_PER_SM.

    python benchmarks/gpu_sweep.py [--sizes 4096 16384] [--rows 8 64] [--fill 0 1 2 4 8]

For each layer shape of gpu_bench.py (bf16 q/k, M = 3 Grams), N and number of selected rows R (the last R
rows, which see every key under causality), times the Triton attention_maps with
``kobattr.kernels.rows.FILL_PER_SM`` set to each --fill value; 0 stands for one program per query block
(no key split, the grid before the splits). Also times M = 1 (ATTNRESLN-N alone) on the full map and the
contraction beside SDPA forward, the issue's goal shape. Prints one JSON line per measurement.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_bench import LAYERS, attention_inputs, sdpa_time, timed  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--fill", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: sweep skipped.")
        return 0
    from kobattr.backends import implementation
    from kobattr.kernels import rows as triton_rows

    triton = implementation("triton")
    dtype = getattr(torch, args.dtype)
    default_fill, default_programs = triton_rows.FILL_PER_SM, triton_rows.programs_to_fill
    for layer_name, layer in LAYERS.items():
        for N in args.sizes:
            sdpa = sdpa_time(layer, N, dtype)
            attn, grams, row_scale = attention_inputs(layer, N, dtype, M=1)
            weights = torch.full((1, 1, N), 1.0 / N, device="cuda")
            for mode, fn in (("M1 contract", lambda: triton.attention_maps(attn, grams, row_scale, weights=weights,
                                                                            normalize_rows=True)),
                             ("M1 map", lambda: triton.attention_maps(attn, grams, row_scale))):
                seconds, peak = timed(fn)
                print(json.dumps(dict(layer=layer_name, N=N, mode=mode, seconds=seconds, sdpa_seconds=sdpa,
                                      vs_sdpa=seconds / sdpa, peak_bytes=peak)), flush=True)
            attn, grams, row_scale = attention_inputs(layer, N, dtype)
            for R in args.rows:
                selected = torch.arange(N - R, N, device="cuda")
                for fill in args.fill:
                    triton_rows.FILL_PER_SM = max(fill, 1)
                    triton_rows.programs_to_fill = (lambda device: 1) if fill == 0 else default_programs
                    try:
                        seconds, _ = timed(lambda: triton.attention_maps(attn, grams, row_scale, rows=selected))
                    finally:
                        triton_rows.FILL_PER_SM, triton_rows.programs_to_fill = default_fill, default_programs
                    print(json.dumps(dict(layer=layer_name, N=N, rows=R, fill_per_sm=fill, seconds=seconds,
                                          vs_sdpa=seconds / sdpa)), flush=True)
            del attn, grams, row_scale
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
