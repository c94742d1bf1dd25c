"""Peak memory of the FF scopes on a Llama-7B-shaped layer, measured against a formula.

    python benchmarks/ff_memory.py [--sizes 2048 4096] [--rows last|first] [--block 128] [--predict 16384 65536]

Layer: H = KV = 32, Dh = 128, d = 4096, d_ff = 11008, SwiGLU, RMSNorm pre-LN, causal, batch 1, float32,
carrying the model's attention output (what capture provides). Each size runs ``attribute(methods=
["atblnffres"], rows=one query block, backend="torch", verify=0)`` in a fresh subprocess and records the
peak RSS above the process's baseline after the layer was built (the layer itself is the caller's).
``--rows last`` takes the last query block, which sees every key, so every key block's parts are made;
``first`` the first block, which under causality sees only the first keys (the run is then quicker, but every
O(N) buffer is still allocated). Peak RSS is reset (/proc/self/clear_refs) after the layer is built, so the
build's own transients do not hide the run's.

The formula (bytes, float32, B = 1), from what kobattr holds at once:
    per-row buffers   N * (16 d + 3 d_ff) * 4: the hidden states and the per-method sums, diagonals and
                      biases (N x d each, about 25 of them, not all alive at once: 16 is fitted to the
                      measured peaks with a margin), the two IG coefficient tensors (N x d_ff; the FFN
                      forward and the IG temporaries run in row blocks)
    one key block     C * (H+1) * (2 d_ff + 2 d) * 4 for its parts and raw rows (C = the torch backend's block)
    one tile          6 * budget * 4 (the (R, C, max(d_ff, d)) tile and its temporaries)
    row blocks        12 * 2^22 * 8 (the float64 IG temporaries of one row block)
    fixed             512 MiB (allocator slack, libraries loaded by the first call)
The check: measured <= formula at every measured size. Printed beside it: the formula at --predict sizes
against 16 GiB (this CPU goal, N = 16k) and 80 GB (an H100, N = 64k).
Results: benchmarks/results/ff_memory_<host>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

LLAMA_7B = dict(H=32, Dh=128, D=4096, F=11008)
BUDGET = 1 << 23  # the torch backend's default budget (elements per intermediate)


def build_layer(N: int, seed: int = 0, device: str = "cpu"):
    import torch

    from kobattr.layer import FeedForward, Layer, Norm

    H, Dh, D, F = LLAMA_7B.values()
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device=device) * scale  # noqa: E731
    norm = lambda: Norm("rmsnorm", 1 + r(D, scale=0.1), None, 1e-6)  # noqa: E731
    ffn = FeedForward("swiglu", r(D, F, scale=D ** -0.5), r(F, D, scale=F ** -0.5), w_gate=r(D, F, scale=D ** -0.5))
    layer = Layer.from_weights(x=r(1, N, D), w_q=r(D, D, scale=D ** -0.5), w_k=r(D, D, scale=D ** -0.5),
                               w_v=r(D, D, scale=D ** -0.5), w_o=r(D, D, scale=D ** -0.5), n_heads=H,
                               placement="pre", ln1=norm(), ln2=norm(), ffn=ffn, causal=True)
    layer.head_outputs = torch.nn.functional.scaled_dot_product_attention(layer.q, layer.k, layer.v, is_causal=True)
    return layer


def key_block(N: int) -> int:
    """The torch backend's key block size for this layer (TorchBackend.ff_maps)."""
    F, D = LLAMA_7B["F"], LLAMA_7B["D"]
    pair_budget = max(1, BUDGET // max(F, D))
    row_size = max(1, min(128, int(pair_budget ** 0.5), max(N // 8, 32)))
    return max(1, min(pair_budget // row_size, max(N // 8, 32)))


def formula(N: int) -> float:
    H, _, D, F = LLAMA_7B.values()
    per_row = N * (16 * D + 3 * F) * 4
    block = key_block(N) * (H + 1) * (2 * F + 2 * D) * 4
    return per_row + block + 6 * BUDGET * 4 + 12 * 2 ** 22 * 8 + 2 ** 29


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_one_cuda(N: int, rows: str, block: int) -> dict:
    """run_one on the GPU, with the implementations chosen automatically; the peak is what the call allocates
    beyond the layer (torch.cuda.max_memory_allocated)."""
    import torch

    from kobattr.core import attribute

    layer = build_layer(N, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    picked = list(range(N - block, N)) if rows == "last" else list(range(block))
    start = time.perf_counter()
    # the formula's tile: without budget= the FF tiles would take a share of the free GPU memory (by design)
    res = attribute(layer, methods=["atblnffres"], rows=picked, verify=0, budget=BUDGET)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert torch.isfinite(res.maps["atblnffres"]).all()
    return dict(N=N, rows=rows, block=block, device=torch.cuda.get_device_name(), seconds=seconds,
                backends=res.backends, peak_bytes=torch.cuda.max_memory_allocated() - base,
                layer_bytes=base, formula_bytes=formula(N))


def run_one(N: int, rows: str, block: int) -> dict:
    import torch

    from kobattr.core import attribute

    layer = build_layer(N)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
    base = _status_bytes("VmRSS")
    picked = list(range(N - block, N)) if rows == "last" else list(range(block))
    start = time.perf_counter()
    res = attribute(layer, methods=["atblnffres"], rows=picked, backend="torch", verify=0)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM") - base
    assert torch.isfinite(res.maps["atblnffres"]).all()
    return dict(N=N, rows=rows, block=block, seconds=seconds, peak_bytes=max(peak, 0), formula_bytes=formula(N))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--rows", choices=("last", "first"), default="last")
    parser.add_argument("--block", type=int, default=128, help="query rows attributed (one query block)")
    parser.add_argument("--predict", nargs="+", type=int, default=[16384, 65536])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-cuda", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cuda", type=int, nargs="+", metavar="N",
                        help="instead: run these sizes on the GPU (one process each) and print one JSON line per size")
    args = parser.parse_args(argv)
    if args.cuda:
        for N in args.cuda:
            out = subprocess.run([sys.executable, __file__, "--one-cuda", str(N), "--rows", args.rows,
                                  "--block", str(args.block)], capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else
                  json.dumps(dict(N=N, error=out.stderr.strip()[-600:])), flush=True)
        return 0
    if args.one:
        print(json.dumps(run_one(args.one, args.rows, args.block)))
        return 0
    if args.one_cuda:
        print(json.dumps(run_one_cuda(args.one_cuda, args.rows, args.block), default=str))
        return 0
    results, ok = [], True
    print(f"{'N':>7} {'rows':>5} {'seconds':>8} {'peak GiB':>9} {'formula GiB':>12}  check")
    for N in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(N), "--rows", args.rows, "--block", str(args.block)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["within_formula"] = row["peak_bytes"] <= row["formula_bytes"]
        ok &= row["within_formula"]
        results.append(row)
        print(f"{N:>7} {args.rows:>5} {row['seconds']:>8.1f} {row['peak_bytes'] / 2**30:>9.2f} "
              f"{row['formula_bytes'] / 2**30:>12.2f}  {'ok' if row['within_formula'] else 'ABOVE'}")
    predictions = {N: formula(N) for N in args.predict}
    for N, b in predictions.items():
        layer = N * 5 * LLAMA_7B["D"] * 4 + 3 * LLAMA_7B["D"] * LLAMA_7B["F"] * 4  # q, k, v, x, head outputs; FFN
        total = b + layer
        print(f"formula at N={N}: {b / 2**30:.1f} GiB, with the layer's own tensors {total / 2**30:.1f} GiB "
              f"(16 GiB CPU goal: {'fits' if total <= 16 * 2**30 else 'too big'}; "
              f"80 GB GPU: {'fits' if total <= 80e9 else 'too big'})")
    path = Path(__file__).parent / "results" / f"ff_memory_{platform.node() or 'host'}.json"
    path.parent.mkdir(exist_ok=True)
    if path.exists():  # keep the other runs' rows; a rerun of the same (N, rows, block) replaces its row
        fresh = {(r["N"], r["rows"], r["block"]) for r in results}
        kept = [r for r in json.loads(path.read_text())["results"] if (r["N"], r["rows"], r["block"]) not in fresh]
        results = sorted(kept + results, key=lambda r: (r["rows"], r["block"], r["N"]))
    path.write_text(json.dumps({"layer": LLAMA_7B, "results": results,
                                "predictions": {str(k): v for k, v in predictions.items()}}, indent=1))
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
