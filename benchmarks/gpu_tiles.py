"""Tile settings of the Triton pair kernels on this GPU: each candidate timed beside the launcher's own.

    python benchmarks/gpu_tiles.py --compile I/K     (warm Triton's cache: candidates I, I+K, ... at small N)
    python benchmarks/gpu_tiles.py                   (time every candidate, one process, nothing else running)

Attention side: attention_maps of the Triton backend with M = 1 Gram (ATTNRESLN-N alone), the full map at
--attention-n (default 4096), bf16 q/k, for gpu_bench.py's Llama-7B and BERT-base shapes, with
kernels.attention_pairs.pair_settings replaced by each candidate (BLOCK_M, BLOCK_N, BLOCK_D, num_warps,
num_stages).
FF side: ff_maps at --ff-n (default 512) for the Llama-7B shape with kernels.ff_pairs.ff_settings replaced.
Each line: the candidate, its median time, the ratio to the launcher's own settings (timed first) and
the largest difference from that one's output relative to its largest entry. Compile or resource failures
are printed and skipped. Compiles are on-disk cached, so running --compile in parallel first keeps the
timing process from compiling.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_bench import LAYERS, attention_inputs, ff_inputs, timed  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) by HP = padded head count (the first of each: the tiles
# before the 2026-11-26 sweep)
ATTENTION = {
    16: [(32, 16, 16, 4, 1), (32, 32, 16, 4, 1), (32, 32, 16, 8, 1), (64, 16, 16, 4, 1), (64, 16, 16, 8, 1),
         (64, 32, 16, 8, 1), (16, 32, 16, 4, 1), (16, 16, 16, 2, 1), (32, 16, 16, 4, 2), (32, 32, 16, 4, 2),
         (32, 32, 16, 8, 2), (32, 16, 32, 4, 2), (32, 16, 64, 4, 2)],
    32: [(32, 8, 16, 4, 1), (16, 16, 16, 4, 1), (32, 16, 16, 4, 1), (32, 16, 16, 8, 1), (64, 8, 16, 4, 1),
         (64, 8, 16, 8, 1), (64, 16, 16, 8, 1), (32, 8, 16, 8, 1), (16, 8, 16, 2, 1), (32, 8, 16, 4, 2),
         (32, 16, 16, 8, 2), (16, 32, 16, 8, 1), (32, 16, 32, 8, 1), (32, 16, 64, 8, 1)],
}
# (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_F, BLOCK_DO, num_warps, num_stages) (the first: the tile before that sweep)
FF = [(16, 4, 16, 32, 64, 4, 1), (16, 8, 16, 32, 64, 4, 1), (16, 8, 16, 64, 128, 8, 1), (32, 4, 16, 32, 128, 8, 1),
      (16, 16, 16, 32, 128, 8, 1), (32, 8, 16, 64, 64, 8, 1), (16, 4, 16, 32, 64, 4, 2), (16, 8, 32, 32, 64, 4, 1)]


def jobs(attention_n, ff_n):
    """(kind, layer name, N, candidate) of every measurement, in timing order: the launcher's own settings
    first for each (kind, layer), then the other candidates."""
    from kobattr.kernels import attention_pairs, ff_pairs

    def first_own(own, candidates):
        return [own] + [c for c in candidates if c != own]

    out = []
    for name, layer in LAYERS.items():
        hp = max(16, 1 << (layer["H"] - 1).bit_length())
        own = tuple(attention_pairs.pair_settings(layer["H"], attention_n).values())
        out += [("attention", name, attention_n, c) for c in first_own(own, ATTENTION[hp])]
    own = tuple(ff_pairs.ff_settings(LAYERS["llama-7b"]["H"]).values())
    out += [("ff", "llama-7b", ff_n, c) for c in first_own(own, FF)]
    return out


def run_job(kind, name, N, candidate, dtype):
    """A callable running one measurement with the candidate's settings in place while it runs."""
    from kobattr.backends import implementation
    from kobattr.kernels import attention_pairs, ff_pairs

    triton = implementation("triton")
    layer = LAYERS[name]
    if kind == "attention":
        bm, bn, bd, warps, stages = candidate
        attn, grams, row_scale = attention_inputs(layer, N, dtype, M=1)
        settings = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps, num_stages=stages)
        module, attr = attention_pairs, "pair_settings"
        call = lambda: triton.attention_maps(attn, grams, row_scale)[0]  # noqa: E731
    else:
        bm, bn, bd, bf, bdo, warps, stages = candidate
        attn, _, _ = attention_inputs(layer, N, dtype, M=1)
        parts = ff_inputs(layer, N, dtype)
        settings = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_F=bf, BLOCK_DO=bdo, num_warps=warps, num_stages=stages)
        module, attr = ff_pairs, "ff_settings"
        call = lambda: triton.ff_maps(attn, parts)  # noqa: E731
    own = getattr(module, attr)

    def with_candidate():
        setattr(module, attr, lambda *args: dict(settings))
        try:
            return call()
        finally:
            setattr(module, attr, own)
    return with_candidate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", help="I/K: only run candidates I, I+K, ... once at small N (fills the cache)")
    parser.add_argument("--attention-n", type=int, default=4096)
    parser.add_argument("--ff-n", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: tile sweep skipped.")
        return 0
    dtype = getattr(torch, args.dtype)
    if args.compile:
        index, count = map(int, args.compile.split("/"))
        for kind, name, _, candidate in jobs(args.attention_n, args.ff_n)[index::count]:
            try:
                run_job(kind, name, 64, candidate, dtype)()
                torch.cuda.synchronize()
            except Exception as err:  # noqa: BLE001 - reported by the timing run
                print(json.dumps(dict(kind=kind, layer=name, candidate=candidate, compile_error=str(err)[:200])))
        return 0
    baseline = {}
    for kind, name, N, candidate in jobs(args.attention_n, args.ff_n):
        row = dict(kind=kind, layer=name, N=N, candidate=candidate)
        try:
            fn = run_job(kind, name, N, candidate, dtype)
            out = fn()
            seconds, _ = timed(fn, max_seconds=2.0 if kind == "attention" else 1.0, repeats=5)
        except Exception as err:  # noqa: BLE001 - a candidate the GPU cannot run is reported, not fatal
            row["error"] = f"{type(err).__name__}: {err}"[:200]
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
            continue
        key = (kind, name)
        if key not in baseline:
            baseline[key] = (seconds, out)
        base_seconds, base_out = baseline[key]
        row.update(seconds=seconds, vs_own=seconds / base_seconds,
                   max_rel_diff=((out - base_out).abs().max() / base_out.abs().max()).item())
        print(json.dumps(row), flush=True)
        del out
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
