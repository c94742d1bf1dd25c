"""GPU benchmark of the Triton pair kernels against the torch backend and SDPA forward.

    python benchmarks/gpu_bench.py [--sizes 1024 4096 16384 65536] [--dtype bfloat16]

For a Llama-7B-shaped layer (H = 32, KV = 8, Dh = 128, d = 4096, d_ff = 11008, causal) and a
BERT-base one (H = 12, Dh = 64, d = 768, d_ff = 3072, bidirectional), times attention_maps with
M = 3 Grams (ATTN-N, ATTNRES-N and ATTNRESLN-N of one layer at once) in two output modes: the full
(B, 3, N, N) map (only where it fits in memory) and the contraction with one weight row over
normalised rows (what rollout-style aggregation asks for, O(N) output). The speed-of-light anchor
is torch SDPA forward on the same q/k/v shapes: ``vs_sdpa`` = kernel time / SDPA time. Peak
memory is what the call allocates beyond its inputs. FF maps are O(N^2 d_ff d): the full map at small N only,
and the last FF_ROWS rows at N = 4096 and 8192 (which of torch and triton ff_maps should lead on a GPU).
Exits 0 with a message when there is no GPU. Results: benchmarks/results/gpu_<device>.json.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from kobattr.backends.base import Attention, FFParts

LAYERS = {
    "llama-7b": dict(H=32, KV=8, Dh=128, d=4096, d_ff=11008, causal=True, gated=True),
    "bert-base": dict(H=12, KV=12, Dh=64, d=768, d_ff=3072, causal=False, gated=False),
}
MAP_MAX_BYTES = 24 * 2 ** 30  # the full (1, 3, N, N) fp32 map is only timed below this size
FEW_ROWS = 8  # rows= with a few query rows: the case the Triton kernels split the key range for
FF_SIZES = (128, 512, 1024)
# rows= of one query block (the last FF_ROWS rows) at long N: whether ff_maps should prefer torch or triton on
# a GPU (the full FF map is out of reach there); the parts are stored whole, 4 (H+1) N (2 d_ff + d) bytes
FF_ROWS, FF_ROWS_SIZES = 16, (4096, 8192)


def backends():
    """Every implementation of attention_maps that runs here: triton, the compiled cuda kernel, torch."""
    from kobattr.backends import implementation

    out = {}
    for name in ("triton", "cuda", "torch"):
        impl = implementation(name)
        reason = impl if isinstance(impl, str) else impl.unavailable_reason()
        if reason is None:
            out[name] = impl
        else:
            print(f"{name}: not benchmarked ({reason})")
    return out


MAX_SECONDS = 20.0  # timed repeats per case stop after about this long (--max-seconds)


def timed(fn, max_seconds=None, repeats=5):
    """(median seconds, peak extra bytes) of fn(); one warm-up call (compiles), fewer repeats if slow."""
    from kobattr.bench import timed as bench_timed

    out = bench_timed(fn, "cuda", repeats=repeats, max_seconds=MAX_SECONDS if max_seconds is None else max_seconds)
    return out["seconds"], out["peak_bytes"]


def attention_inputs(layer, N, dtype, M=3):
    g = torch.Generator(device="cuda").manual_seed(0)
    H, KV, Dh = layer["H"], layer["KV"], layer["Dh"]
    q = torch.randn(1, H, N, Dh, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, KV, N, Dh, device="cuda", dtype=dtype, generator=g)
    attn = Attention(q=q, k=k, valid=torch.ones(1, N, dtype=torch.bool, device="cuda"), causal=layer["causal"],
                     window=0, scale=Dh ** -0.5)
    grams = torch.empty(1, N, M, H + 1, H + 1, device="cuda")
    for start in range(0, N, 8192):  # PSD Grams, built in chunks to keep the temporary small
        u = torch.randn(1, min(8192, N - start), M, H + 1, 8, device="cuda", generator=g)
        grams[:, start:start + u.shape[1]] = u @ u.transpose(-1, -2)
    row_scale = torch.rand(1, N, M, device="cuda", generator=g) + 0.5
    return attn, grams, row_scale


def sdpa_time(layer, N, dtype):
    attn, _, _ = attention_inputs(layer, N, dtype, M=1)
    v = torch.randn_like(attn.k)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        attn.q, attn.k, v, is_causal=attn.causal, enable_gqa=layer["KV"] != layer["H"])
    return timed(fn)[0]


def run_case(impls, fn):
    row = {}
    for impl, backend in impls.items():
        try:
            seconds, peak = timed(lambda: fn(backend))
            row[impl] = dict(seconds=seconds, peak_bytes=peak)
        except torch.cuda.OutOfMemoryError:
            row[impl] = dict(error="out of memory")
        except Exception as err:  # record and go on: one failing backend must not hide the others
            row[impl] = dict(error=f"{type(err).__name__}: {err}"[:300])
        torch.cuda.empty_cache()
    return row


def check_agreement(impls, layer, dtype):
    """{implementation: max |impl - torch| / max |torch|} of the full map at N = 512 and of 8 selected rows
    (key splits on a GPU): the GPU-side correctness check."""
    if "torch" not in impls:
        return None
    attn, grams, row_scale = attention_inputs(layer, 512, dtype)
    rows = torch.arange(512 - FEW_ROWS, 512, device="cuda")
    out = {}
    for name in (n for n in impls if n != "torch"):
        for label, selected in (("map", None), ("rows", rows)):
            ours, _ = impls[name].attention_maps(attn, grams, row_scale, rows=selected)
            ref, _ = impls["torch"].attention_maps(attn, grams, row_scale, rows=selected)
            out[f"{name} {label}"] = ((ours - ref).abs().max() / ref.abs().max()).item()
    return out


def one_split(triton_backend, fn):
    """run_case of the Triton backend with the grid it had before key splits (one program per query block):
    the measurement that says what the splits gain."""
    from kobattr.kernels import rows as triton_rows

    fill = triton_rows.programs_to_fill
    triton_rows.programs_to_fill = lambda device: 1
    try:
        return run_case({"triton": triton_backend}, fn)["triton"]
    finally:
        triton_rows.programs_to_fill = fill


def ff_inputs(layer, N, dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    H, D, F = layer["H"], layer["d"], layer["d_ff"]
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    pos = lambda *s: torch.rand(*s, device="cuda", generator=g) + 0.5  # noqa: E731
    gated = layer["gated"]
    return FFParts(ff_parts=r(1, N, H + 1, F), gate_parts=r(1, N, H + 1, F) if gated else None,
                   res_parts=r(1, N, H + 1, D), in_scale=pos(1, N), res_scale=pos(1, N), out_scale=pos(1, N),
                   coef_in=r(1, N, F), coef_gate=r(1, N, F) if gated else None, w_out=r(F, D) / math.sqrt(F),
                   out_weight=r(D), out_center=not gated, n_scopes=3)


def main():
    global MAX_SECONDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="time spent on the repeats of one case")
    parser.add_argument("--torch-max", type=int, default=None,
                        help="largest N the torch backend is timed at (it materialises blocks: slow at 64k)")
    parser.add_argument("--no-ff", action="store_true", help="skip the FF maps")
    args = parser.parse_args()
    MAX_SECONDS = args.max_seconds
    if not torch.cuda.is_available():
        print("no GPU (torch.cuda.is_available() is False): GPU benchmark skipped.")
        return 0
    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    impls = backends()
    results = dict(device=device, dtype=args.dtype, torch=torch.__version__, attention=[], ff=[], agreement={})
    for layer_name in args.layers:
        layer = LAYERS[layer_name]
        results["agreement"][layer_name] = check_agreement(impls, layer, dtype)
        print(json.dumps({"agreement": {layer_name: results["agreement"][layer_name]}}, default=str), flush=True)
        for N in args.sizes:
            sdpa = sdpa_time(layer, N, dtype)
            attn, grams, row_scale = attention_inputs(layer, N, dtype)
            weights = torch.full((1, 1, N), 1.0 / N, device="cuda")
            modes = {"contract": lambda b: b.attention_maps(attn, grams, row_scale, weights=weights,
                                                            normalize_rows=True)}
            if 3 * N * N * 4 <= MAP_MAX_BYTES:
                modes["map"] = lambda b: b.attention_maps(attn, grams, row_scale)
            rows = torch.arange(N - FEW_ROWS, N, device="cuda")  # the last rows: causal ones see every key
            modes[f"rows{FEW_ROWS}"] = lambda b: b.attention_maps(attn, grams, row_scale, rows=rows)
            timed_here = {n: b for n, b in impls.items() if n != "torch" or args.torch_max is None or N <= args.torch_max}
            for mode, fn in modes.items():
                row = run_case(timed_here, fn)
                if mode.startswith("rows") and "triton" in impls:
                    row["triton 1 split"] = one_split(impls["triton"], fn)
                for entry in row.values():
                    if "seconds" in entry:
                        entry["vs_sdpa"] = entry["seconds"] / sdpa
                results["attention"].append(dict(layer=layer_name, N=N, mode=mode, sdpa_seconds=sdpa, **row))
                print(json.dumps(results["attention"][-1]), flush=True)  # a run cut short still shows its rows
            del attn, grams, row_scale
            torch.cuda.empty_cache()
        ff_cases = [(N, None) for N in FF_SIZES] + [(N, FF_ROWS) for N in FF_ROWS_SIZES]
        for N, few in () if args.no_ff else ff_cases:
            attn, _, _ = attention_inputs(layer, N, dtype, M=1)
            try:
                parts = ff_inputs(layer, N, dtype)
            except torch.cuda.OutOfMemoryError:
                print(json.dumps(dict(layer=layer_name, N=N, ff="parts do not fit")), flush=True)
                continue
            rows = None if few is None else torch.arange(N - few, N, device="cuda")
            row = run_case({n: b for n, b in impls.items() if "ff_maps" in b.primitives},
                           lambda b: b.ff_maps(attn, parts, rows=rows))
            results["ff"].append(dict(layer=layer_name, N=N, mode="map" if few is None else f"rows{few}", **row))
            print(json.dumps(results["ff"][-1]), flush=True)
            del parts
            torch.cuda.empty_cache()

    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}.json"
    path.write_text(json.dumps(results, indent=2))
    print_table(results, impls)
    print(f"\nwritten {path}")
    return 0


def print_table(results, impls):
    def cell(entry):
        if entry is None:
            return "-"
        if "error" in entry:
            return entry["error"][:24]
        text = f"{entry['seconds'] * 1e3:9.2f} ms {entry['peak_bytes'] / 2 ** 30:6.2f} GiB"
        return text + (f" x{entry['vs_sdpa']:.2f}" if "vs_sdpa" in entry else "")

    print(f"device: {results['device']}  dtype: {results['dtype']}")
    print("agreement with the torch backend (max rel diff, N=512; rows: 8 selected rows):", results["agreement"])
    columns = [*impls] + (["triton 1 split"] if "triton" in impls else [])
    header = f"{'layer':10} {'mode':8} {'N':>6} {'sdpa ms':>9} " + " ".join(f"{impl:>34}" for impl in columns)
    print(header)
    for row in results["attention"]:
        print(f"{row['layer']:10} {row['mode']:8} {row['N']:6d} {row['sdpa_seconds'] * 1e3:9.2f} "
              + " ".join(f"{cell(row.get(impl)):>34}" for impl in columns))
    for row in results["ff"]:
        print(f"{row['layer']:10} {'ff ' + row['mode']:8} {row['N']:6d} {'':>9} "
              + " ".join(f"{cell(row.get(impl)):>34}" for impl in impls))


if __name__ == "__main__":
    sys.exit(main())
