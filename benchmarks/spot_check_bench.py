"""What the spot checks cost: attribute() with verify=0 vs verify=2 (and analyze-like FF runs), side by side.

    python benchmarks/spot_check_bench.py [--sizes 2048 4096] [--methods attnresln_n] [--repeats 3]

On the BERT-base-shaped layer of benchmarks/run.py (H=12, d=768, d_ff=3072, batch 1, fp32), in one
process, each configuration timed ``--repeats`` times and the best kept. The spot check recomputes k
sampled query rows per text with the float64 reference (k x N x d materialised), so its cost grows like
N while the maps grow like N^2: the goal is under 5% of the run at N >= 2048. Prints a table and writes
JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from run import build_layer

from kobattr.core import attribute


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--methods", nargs="+", default=["attnresln_n"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "spot_check.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'methods':<24} {'N':>6} {'verify=0 s':>11} {f'verify={args.k} s':>11} {'overhead':>9}  backends")
    for N in args.sizes:
        layer = build_layer(N, "cpu")
        for methods in args.methods:
            names = methods.split(",")
            plain = best_time(lambda: attribute(layer, methods=names, backend=args.backend, verify=0), args.repeats)
            checked_result = attribute(layer, methods=names, backend=args.backend, verify=args.k)
            checked = best_time(lambda: attribute(layer, methods=names, backend=args.backend, verify=args.k), args.repeats)
            overhead = checked / plain - 1
            row = dict(methods=names, N=N, k=args.k, seconds_plain=plain, seconds_checked=checked, overhead=overhead,
                       backends=checked_result.backends,
                       max_error={m: float(e.max()) for m, e in checked_result.spot_check.items()})
            rows.append(row)
            print(f"{methods:<24} {N:>6} {plain:>11.3f} {checked:>11.3f} {100 * overhead:>8.1f}%  {checked_result.backends}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(machine=platform.machine(), processor=platform.processor(),
                                              threads=torch.get_num_threads(), torch=torch.__version__, rows=rows),
                                         indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
