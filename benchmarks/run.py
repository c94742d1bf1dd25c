"""Every available backend vs the materialising reference: time and peak memory by N and method,
on a BERT-base-shaped layer (random weights, H=12, d=768, d_ff=3072).

    python benchmarks/run.py [--sizes 128 512 1024 2048 4096] [--methods attnresln_n atbffresln]
                             [--backends torch cpu ...] [--backend-max N]

Every measurement runs in a fresh subprocess, so peak memory is that run's own peak (RSS on CPU,
torch.cuda.max_memory_allocated on GPU) above the process's baseline after building the inputs.
The materialising reference runs only up to --reference-max N (and is skipped where its estimated
memory exceeds --memory-limit GiB); a backend beyond --backend-max METHOD=N is skipped (the FF
scopes cost N^2 * d * d_ff). Prints a table with ratios to the reference, writes JSON to
benchmarks/results/ and a log-log scaling plot (time and memory vs N) next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

BERT_BASE = dict(H=12, Dh=64, D=768, F=3072)


def build_layer(N: int, device: str, seed: int = 0):
    import torch

    from kobattr.layer import FeedForward, Layer, Norm

    H, Dh, D, F = BERT_BASE.values()
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    norm = lambda: Norm("layernorm", 1 + r(D, scale=0.1), r(D, scale=0.1), 1e-12)  # noqa: E731
    ffn = FeedForward("gelu", r(D, F, scale=D ** -0.5), r(F, D, scale=F ** -0.5), r(F, scale=0.1), r(D, scale=0.1))
    layer = Layer.from_weights(x=r(1, N, D), w_q=r(D, D, scale=D ** -0.5), w_k=r(D, D, scale=D ** -0.5),
                               w_v=r(D, D, scale=D ** -0.5), w_o=r(D, D, scale=D ** -0.5), n_heads=H,
                               b_v=r(D, scale=0.1), b_o=r(D, scale=0.1), placement="post", ln1=norm(), ln2=norm(),
                               ffn=ffn)
    # what capture provides: the model's own attention output per head, computed outside the timed region
    layer.head_outputs = torch.nn.functional.scaled_dot_product_attention(layer.q, layer.k, layer.v)
    return layer


def reference_bytes(N: int, method: str) -> float:
    """Rough peak of the reference: (N, N, D) fp32 tensors alive at once, plus alpha."""
    H, _, D, F = BERT_BASE.values()
    tensors = 4 if method not in ("atbff", "atbffres", "atbffresln") else 8
    return 4.0 * N * N * (tensors * D + 2 * H)


def run_one(impl: str, method: str, N: int, device: str, ff_gemm: str = "float32") -> dict:
    """One measurement, in this process; ff_gemm as attribute() takes it."""
    import torch

    from kobattr.core import attribute
    from kobattr.reference import reference

    layer = build_layer(N, device)
    if impl != "reference":  # one-time costs (thread pools, kernel compilation, first allocations) outside the timing
        attribute(build_layer(64, device, seed=1), methods=[method], backend=impl, verify=0, ff_gemm=ff_gemm)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if impl == "reference":
        reference(layer, methods=[method], dtype=torch.float32)
    else:
        # spot checks: benchmarks/spot_check_bench.py
        attribute(layer, methods=[method], backend=impl, verify=0, ff_gemm=ff_gemm)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = time.perf_counter() - start
    row = dict(impl=impl, method=method, N=N, device=device, seconds=seconds, peak_bytes=max(peak, 0))
    if ff_gemm != "float32":
        row["ff_gemm"] = ff_gemm
    # the anchors, measured in this same process after the timed run: SDPA forward of the same q, k, v (the
    # speed of light of the attention side) and this machine's sgemm rate (that of the FF side)
    row["sdpa_seconds"] = _fastest_time(lambda: torch.nn.functional.scaled_dot_product_attention(layer.q, layer.k, layer.v),
                                       device)
    row["vs_sdpa"] = seconds / row["sdpa_seconds"]
    if method in FF_METHODS:
        a = torch.randn(2048, 2048, device=device)
        row["sgemm_gflops"] = 2 * 2048 ** 3 / _fastest_time(lambda: a @ a, device) / 1e9
        H, _, D, F = BERT_BASE.values()
        row["useful_gflops"] = N * N * (2 * F * D + 2 * (H + 1) * F) / seconds / 1e9
        row["sgemm_fraction"] = row["useful_gflops"] / row["sgemm_gflops"]
    return row


FF_METHODS = ("atbff", "atbffres", "atbffresln")


def _fastest_time(fn, device: str, repeats: int = 5) -> float:
    """The fastest of ``repeats`` runs after a warm-up: the anchors are speeds of light, so a run slowed by
    another job on the machine must not flatter the ratios."""
    from kobattr.bench import timed

    return timed(fn, device, repeats=repeats, max_seconds=float("inf"))["fastest"]


def measure(impl: str, method: str, N: int, device: str, timeout: float, ff_gemm: str = "float32") -> dict:
    cmd = [sys.executable, __file__, "--one", impl, method, str(N), device, "--ff-gemm", ff_gemm]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(impl=impl, method=method, N=N, device=device, error=f"timeout after {timeout:.0f} s")
    if out.returncode != 0:
        return dict(impl=impl, method=method, N=N, device=device, error=(out.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096])
    parser.add_argument("--methods", nargs="+", default=["attnresln_n", "atbffresln"])
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend available here")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--reference-max", type=int, default=1024)
    parser.add_argument("--backend-max", nargs="*", default=["atbffresln=2048"], metavar="METHOD=N",
                        help="largest N per method for the backends (default atbffresln=2048)")
    parser.add_argument("--memory-limit", type=float, default=14.0, help="GiB the reference may use")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", default=None)
    parser.add_argument("--ff-gemm", choices=("float32", "bfloat16"), default="float32",
                        help="the FF methods' W_2 products (attribute(ff_gemm=...)); the sgemm anchor stays float32")
    parser.add_argument("--one", nargs=4, metavar=("IMPL", "METHOD", "N", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        impl, method, N, device = args.one
        print(json.dumps(run_one(impl, method, int(N), device, args.ff_gemm)))
        return

    backends = args.backends or _available_backends(args.device)
    backend_max = {k: int(v) for k, v in (item.split("=") for item in args.backend_max)}
    rows = []
    print(f"{'method':<12} {'N':>6} {'impl':<10} {'time':>10} {'peak':>10}  vs SDPA forward (FF: fraction of sgemm)  vs reference")
    for method in args.methods:
        for N in args.sizes:
            ref = None
            if N <= args.reference_max:
                need = reference_bytes(N, method) / 2**30
                if need > args.memory_limit:
                    ref = dict(impl="reference", method=method, N=N, error=f"skipped: needs ~{need:.0f} GiB")
                else:
                    ref = measure("reference", method, N, args.device, args.timeout)
                rows.append(ref)
                print(_format_row(ref, None), flush=True)
            for backend in backends:
                if N > backend_max.get(method, N):
                    continue
                rows.append(measure(backend, method, N, args.device, args.timeout, args.ff_gemm))
                print(_format_row(rows[-1], ref), flush=True)

    machine = dict(device=args.device, platform=platform.platform(), processor=platform.processor(),
                   cpus=os.cpu_count(), python=platform.python_version())
    if args.device == "cuda":
        import torch

        machine["gpu"] = torch.cuda.get_device_name()
    out = Path(args.out or Path(__file__).parent / "results" / f"run_{args.device}_{platform.node() or 'host'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=machine, layer=BERT_BASE, rows=rows), indent=1))
    plot_scaling(rows, out.with_suffix(".png"), title=f"{machine['device']} ({machine.get('gpu', machine['processor'] or platform.machine())}, {machine['cpus']} cores)")
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _available_backends(device: str) -> list[str]:
    from kobattr.backends import AUTO_ORDER, availability

    usable = availability()
    return [b for b in AUTO_ORDER.get(device, ("torch",)) if usable[b] is None]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def plot_scaling(rows: list[dict], path: Path, title: str) -> None:
    """Log-log time and peak memory vs N, one line per (implementation, method)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax_time, ax_mem = fig.subplots(1, 2)
    series: dict = {}
    for r in rows:
        if "error" not in r:
            series.setdefault((r["impl"], r["method"]), []).append(r)
    for (impl, method), points in sorted(series.items()):
        points.sort(key=lambda r: r["N"])
        n = [p["N"] for p in points]
        style = "--" if impl == "reference" else "-"
        ax_time.plot(n, [p["seconds"] for p in points], style, marker="o", label=f"{impl} {method}")
        ax_mem.plot(n, [max(p["peak_bytes"], 1) / 2**20 for p in points], style, marker="o", label=f"{impl} {method}")
    for ax, label in ((ax_time, "seconds"), (ax_mem, "peak MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _fmt(r) -> str:
    if "error" in r:
        return f"{r['error'][:32]:>32}"
    return f"{r['seconds']:9.2f}s {r['peak_bytes'] / 2**20:8.0f}MiB"


def _format_row(r: dict, ref) -> str:
    ratio = ""
    if ref and "error" not in ref and "error" not in r:
        ratio = (f"  {ref['seconds'] / r['seconds']:6.2f}x faster, "
                 f"{ref['peak_bytes'] / max(r['peak_bytes'], 1):6.1f}x less memory")
    anchors = ""
    if "vs_sdpa" in r:
        anchors = f"  {r['vs_sdpa']:7.1f}x SDPA fwd"
        if "sgemm_fraction" in r:
            anchors += f", {r['sgemm_fraction']:.2f} of sgemm ({r['useful_gflops']:.0f}/{r['sgemm_gflops']:.0f} GFLOP/s)"
    return f"{r['method']:<12} {r['N']:>6} {r['impl']:<10} {_fmt(r)}{anchors}{ratio}"


if __name__ == "__main__":
    main()
