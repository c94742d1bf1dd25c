"""attention_maps on CPU: the C++ kernel (kobattr._cpu) vs the torch backend vs a materialising computation.

Usage:
    python benchmarks/cpu_bench.py            # N in {512, 2048, 8192}, BERT-base and Llama-7B shaped layers, M=3
    python benchmarks/cpu_bench.py --long     # also the ATTNRESLN map (M=1) of a Llama-7B layer at N=16384

Layers: BERT-base (H=12, KV=12, Dh=64, d=768, bidirectional) and Llama-7B shaped (H=32, KV=8 as in
GQA models, Dh=128, d=4096, causal), batch 1, random q, k and PSD Gram matrices, M=3 Gram sets (the
ATTN-N / ATTNRES-N / ATTNRESLN-N set), full (M, N, N) maps. The Gram values do not change the
kernels' work, so where the materialising reference does not run they come from random factors of
rank min(d, 256) instead of d to keep the setup short.

Each measurement runs in its own process so that its peak resident memory (getrusage ru_maxrss)
is its own; "extra" is that peak minus the resident size once the inputs exist. Times are wall
clock and process CPU time (the machine may be shared: CPU time / threads is the steadier number).
The materialising reference builds every (i, j) vector sum_h alpha^h_ij U_j[h] (+ the residual) in
d dimensions, one Gram set at a time, and runs only where that (N, N, d) tensor fits the budget.
A measurement running past --timeout seconds (300) is reported as timed out.
Results go to benchmarks/results/cpu_<host>.json (host "dev2core" on a 2-CPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "bert-base": dict(H=12, KV=12, Dh=64, d=768, causal=False),
    "llama-7b": dict(H=32, KV=8, Dh=128, d=4096, causal=True),
}
MATERIALISE_BUDGET = 6 << 30  # bytes for the (N, N, d) float32 tensor and its square


def rss_bytes() -> int:
    from kobattr.bench import host_bytes

    return host_bytes("VmRSS")


def peak_rss_bytes() -> int:
    from kobattr.bench import host_bytes

    return host_bytes("VmHWM")


def materialise_bytes(N: int, d: int) -> int:
    return 2 * N * N * d * 4


def make_inputs(shape: dict, N: int, M: int, with_vectors: bool, seed: int = 0):
    import torch

    from kobattr.backends.base import Attention

    g = torch.Generator().manual_seed(seed)
    H, KV, Dh, d = shape["H"], shape["KV"], shape["Dh"], shape["d"]
    q = torch.randn(1, H, N, Dh, generator=g)
    k = torch.randn(1, KV, N, Dh, generator=g)
    attn = Attention(q=q, k=k, valid=torch.ones(1, N, dtype=torch.bool), causal=shape["causal"], window=0,
                     scale=Dh ** -0.5)
    rank = d if with_vectors else min(d, 256)
    vectors = torch.randn(1, N, M, H + 1, rank, generator=g) / rank ** 0.5 if with_vectors else None
    grams = torch.empty(1, N, M, H + 1, H + 1)
    chunk = 128  # keys per step: keeps the setup's transient memory out of the measured peaks
    for start in range(0, N, chunk):
        block = vectors[:, start:start + chunk] if with_vectors else \
            torch.randn(1, min(chunk, N - start), M, H + 1, rank, generator=g) / rank ** 0.5
        grams[:, start:start + chunk] = block @ block.transpose(-1, -2)
    row_scale = torch.rand(1, N, M, generator=g) + 0.5
    return attn, grams, row_scale, vectors


def materialised_maps(attn, vectors, row_scale):
    """map[m, i, j] = row_scale[i, m] * || sum_h alpha^h_ij U_j,m[h] + [i == j] U_j,m[H] || with the (N, N, d) tensor."""
    import torch

    from kobattr.backends.base import visible_block

    q, k = attn.q[0], attn.k[0]
    H, N, _ = q.shape
    k = k.repeat_interleave(H // k.shape[0], 0)
    idx = torch.arange(N)
    vis = visible_block(attn, idx, idx)[0]
    scores = (q @ k.transpose(-1, -2) * attn.scale).masked_fill(~vis, float("-inf"))
    alpha = torch.softmax(scores, -1).nan_to_num(0.0)  # (H, N, N)
    maps = []
    for m in range(vectors.shape[2]):
        U = vectors[0, :, m]  # (N, H+1, d)
        pair_vectors = torch.einsum("hij,jhd->ijd", alpha, U[:, :H])  # (N, N, d): what the kernels avoid
        pair_vectors[idx, idx] += U[:, H]
        maps.append(pair_vectors.norm(dim=-1) * row_scale[0, :, m, None] * vis)
        del pair_vectors
    return torch.stack(maps)[None]


def worker(case: dict) -> dict:
    import torch

    from kobattr.backends.compiled_backend import CompiledBackend
    from kobattr.backends.torch_backend import TorchBackend

    shape = SHAPES[case["shape"]]
    method, N, M = case["method"], case["N"], case["M"]
    attn, grams, row_scale, vectors = make_inputs(shape, N, M, with_vectors=method == "materialise")
    run = {
        "cpu": lambda: CompiledBackend("cpu").attention_maps(attn, grams, row_scale)[0],
        "torch": lambda: TorchBackend().attention_maps(attn, grams, row_scale)[0],
        "materialise": lambda: materialised_maps(attn, vectors, row_scale),
    }[method]
    rss_inputs = rss_bytes()
    best = None
    for _ in range(case["repeats"]):
        wall, cpu = time.perf_counter(), time.process_time()
        out = run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = (wall, cpu) if best is None or wall < best[0] else best
    result = {**case, "wall_s": round(best[0], 3), "cpu_s": round(best[1], 3), "threads": torch.get_num_threads(),
              "peak_rss_mib": round(peak_rss_bytes() / 2**20), "extra_peak_mib": round((peak_rss_bytes() - rss_inputs) / 2**20),
              "output_mib": round(out.numel() * 4 / 2**20)}
    if method == "materialise":
        # The same map from the C++ kernel, as a check that the three methods compute one thing.
        fused = CompiledBackend("cpu").attention_maps(attn, grams, row_scale)[0]
        result["max_rel_diff_vs_cpu"] = float((fused - out).abs().max() / out.abs().max())
    return result


def measure(case: dict, timeout: float) -> dict:
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {**case, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="add the Llama-7B ATTNRESLN map (M=1) at N=16384")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per measurement before giving up")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    host = socket.gethostname() or "dev2core"
    if os.cpu_count() == 2:
        host = "dev2core"
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"cpu_{host}.json"
    cases, notes = [], []
    for shape in args.shapes:
        for N in args.sizes:
            repeats = 2 if N <= 2048 else 1
            for method in ("cpu", "torch", "materialise"):
                if method == "materialise" and materialise_bytes(N, SHAPES[shape]["d"]) > MATERIALISE_BUDGET:
                    notes.append(f"materialise skipped for {shape} N={N}: the (N, N, d) tensor needs "
                                 f"{materialise_bytes(N, SHAPES[shape]['d']) / 2**30:.1f} GiB > "
                                 f"{MATERIALISE_BUDGET / 2**30:.0f} GiB budget")
                    continue
                cases.append(dict(shape=shape, N=N, M=3, method=method, repeats=repeats))
    if args.long:
        cases.append(dict(shape="llama-7b", N=16384, M=1, method="cpu", repeats=1, label="ATTNRESLN map, --long"))

    results = []
    print(f"{'shape':10} {'N':>6} {'M':>2} {'method':12} {'wall s':>9} {'cpu s':>9} {'extra peak MiB':>15} {'out MiB':>8}")
    for note in notes:
        print(f"# {note}")
    for case in cases:
        r = measure(case, args.timeout)
        results.append(r)
        if "error" in r:
            print(f"{r['shape']:10} {r['N']:>6} {r['M']:>2} {r['method']:12} error: {r['error']}")
        else:
            print(f"{r['shape']:10} {r['N']:>6} {r['M']:>2} {r['method']:12} {r['wall_s']:>9.3f} {r['cpu_s']:>9.3f} "
                  f"{r['extra_peak_mib']:>15} {r['output_mib']:>8}", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"host": host, "cpus": os.cpu_count(), "notes": notes, "results": results},
                                       indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
