"""The peers' measures (ALTI, GlobEnc, Value Zeroing, flow_attn) beside attnresln_n and the FF maps on a MiniLM-shaped layer (CPU).

    python benchmarks/peers_bench.py [--sizes 512 4096] [--methods alti,globenc,...] [--timeout 600]

Layer: MiniLM-L12 shaped (H = 12, Dh = 32, d = 384, d_ff = 1536, post-LN LayerNorm, GELU, every bias), random
weights (kobattr.testing.random_layer, seed 0), batch 1, float32, full maps, ``attribute(verify=0)``. Each
measurement runs in its own process, so that its peak resident memory (ru_maxrss) is its own; "extra" is that
peak minus the resident size once the layer exists; with --repeat k the run with the least CPU time is reported. Wall and process CPU time: on a shared machine the
CPU time (summed over the threads) is the steadier number. "reference" is the materialising kobattr.reference (an
(N, N, d) tensor), run where it fits --reference-limit elements.
Goals (issue 26): alti within 3x attnresln_n at N = 4096; value_zeroing within 2x of the FF maps (atbffresln).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPE = dict(H=12, Dh=32, D=384, F=1536)
DEFAULT = ("attnresln_n", "atbffresln", "alti", "alti_l2", "globenc", "value_zeroing", "flow_attn")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(method: str, N: int, reference: bool) -> dict:
    import torch

    from kobattr.core import attribute
    from kobattr.reference import reference as materialise
    from kobattr.testing import random_layer

    torch.manual_seed(0)
    layer = random_layer("bert", N=N, B=1, D=SHAPE["D"], Dh=SHAPE["Dh"], F=SHAPE["F"], dtype=torch.float32)
    layer = _heads(layer, SHAPE["H"])
    base = _rss()
    start, cpu = time.perf_counter(), time.process_time()
    if reference:
        materialise(layer, methods=[method], dtype=torch.float32)
    else:
        attribute(layer, methods=[method], backend="torch", verify=0)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(method=method, N=N, reference=reference, seconds=seconds, cpu_seconds=cpu,
                extra_mib=(peak - base) / 2**20)


def _heads(layer, H):
    """random_layer's 'bert' kind has 4 heads: rebuild q, k, v and W_O with H heads of the same Dh."""
    import dataclasses

    import torch

    g = torch.Generator().manual_seed(1)
    B, _, N, Dh = layer.q.shape
    D = layer.d_model

    def r(*shape):
        return torch.randn(*shape, generator=g) * D ** -0.5

    return dataclasses.replace(layer, q=r(B, H, N, Dh) * 4, k=r(B, H, N, Dh) * 4, v=r(B, H, N, Dh) * 4,
                               w_o=r(H, Dh, D), head_outputs=None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--methods", default=",".join(DEFAULT))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement: the fastest is reported "
                                                                   "(the machine is shared)")
    parser.add_argument("--reference-limit", type=float, default=2e8, help="N * N * d elements the reference may build")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # method N reference: run one measurement here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.one[2] == "1")))
        return
    rows = []
    print(f"{'method':<14}{'N':>6}  {'kind':<10}{'wall s':>10}{'CPU s':>10}{'extra MiB':>11}")
    for N in args.sizes:
        for method in args.methods.split(","):
            for ref in (False, True):
                if ref and N * N * SHAPE["D"] > args.reference_limit:
                    continue
                try:
                    runs = []
                    for _ in range(args.repeat):
                        done = subprocess.run([sys.executable, __file__, "--one", method, str(N), "1" if ref else "0"],
                                              capture_output=True, text=True, timeout=args.timeout, check=True)
                        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    row = min(runs, key=lambda r: r["cpu_seconds"])
                    line = f"{row['seconds']:>10.2f}{row['cpu_seconds']:>10.2f}{row['extra_mib']:>11.0f}"
                except subprocess.TimeoutExpired:
                    row, line = dict(method=method, N=N, reference=ref, timed_out=args.timeout), "  timed out"
                rows.append(row)
                print(f"{method:<14}{N:>6}  {'reference' if ref else 'kobattr':<10}{line}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
