"""Where the Triton attention pair kernel's time goes on this GPU, from the kernel's own modes.

    python benchmarks/gpu_profile.py [--n 4096] [--dtype bfloat16]       (the table)
    python benchmarks/gpu_profile.py --once llama-7b [--n 4096]           (one warm call, for a profiler:
        ncu --kernel-name regex:_attention_pairs_kernel --launch-skip 1 --launch-count 1 ... python ... --once)

For gpu_bench.py's Llama-7B and BERT-base layers, with the row statistics computed once beforehand and
passed in (``lse2``), so that the pair pass is timed alone:
- ``lse``: the row-statistics pass (kernels/rows.row_lse), one head per program as in flash attention;
- ``map M=1``, ``map M=3``: the pair pass writing the full map for one Gram (ATTNRESLN-N alone) and three;
- ``gram``: (map M=3 - map M=1) / 2, what one Gram's quadratic form and map store add to a tile;
- ``alpha``: map M=1 - gram, what the tile costs before any Gram: q.k of every head, exp, the transpose;
- SDPA forward on the same q/k/v, the speed-of-light anchor, and each time over it.
And the alternative pair kernels (kernels/attention_pairs_streamed.py per tile; kernels/attention_pairs_staged.py
with alpha's scratch in float32 and bfloat16) on the same inputs, each one's time and its largest difference from
the production kernel's map. Also the registers and spill stores of the pair kernel as this GPU's triton compiled it. bf16 q/k, M = 1
Gram unless said otherwise, the median of gpu_bench.timed. Exits 0 with a message when there is no GPU.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_bench import LAYERS, attention_inputs, sdpa_time, timed  # noqa: E402


def pair_pass(layer, N, dtype, M):
    """(callable running the pair pass alone with the map output, the call computing its row statistics,
    the inputs (attn, grams, row_scale, lse2))."""
    from kobattr.kernels import attention_pairs, rows

    attn, grams, row_scale = attention_inputs(layer, N, dtype, M=M)
    valid8 = attn.valid.to(torch.int8)
    dots = rows.dot_settings(attn.q.dtype)

    def lse():
        return rows.row_lse(attn.q, attn.k, valid8, attn.causal, attn.window, attn.scale, None, dots)

    lse2 = lse()
    return (lambda: attention_pairs.attention_maps(attn.q, attn.k, attn.valid, attn.causal, attn.window, attn.scale,
                                                   grams, row_scale, lse2=lse2)[0]), lse, (attn, grams, row_scale, lse2)


# tiles of the streamed kernel (kobattr.kernels.attention_pairs_streamed) besides its own: the fastest-looking ones
# without spills in a triton 3.6 sm_90 compile (benchmarks/kernel_static.py)
STREAMED_TILES = {"llama-7b": [dict(BLOCK_M=16, BLOCK_N=32, num_warps=8)],
                  "bert-base": [dict(BLOCK_M=32, BLOCK_N=16, num_warps=8)]}


def try_experiment(call, production):
    """(median seconds, max |call() - production map| / max |production|) of an experiment's call, or why it
    failed: an experiment that fails is reported, not fatal."""
    try:
        diff = ((call() - production[:, 0]).abs().max() / production.abs().max()).item()
        result = (timed(call, max_seconds=2.0)[0], diff)
    except Exception as err:  # noqa: BLE001
        result = f"{type(err).__name__}: {err}"[:200]
    torch.cuda.empty_cache()
    return result


def streamed(name, inputs, production):
    """{tile: (median seconds, max |streamed - production| / max |production|)} of the heads-streamed kernel
    (kobattr.kernels.attention_pairs_streamed, the triton_streamed implementation) on the pair pass's inputs (its
    Gram factors made beforehand, untimed)."""
    from kobattr.kernels.attention_pairs_streamed import attention_maps, gram_factors, streamed_settings

    attn, grams, row_scale, lse2 = inputs
    factors = gram_factors(grams[:, :, :1])
    scale = row_scale[:, :, :1].contiguous()
    out = {}
    for tile in [streamed_settings(LAYERS[name]["H"])] + STREAMED_TILES[name]:
        out[str(tuple(tile.values()))] = try_experiment(
            lambda: attention_maps(attn.q, attn.k, attn.valid, attn.causal, attn.window, attn.scale, grams[:, :, :1],
                                   scale, lse2=lse2, tile=tile, factors=factors)[:, 0], production)
    return out


# bfloat16-scratch tiles of the staged kernel besides its own (BM, BN, SUB_N, warps, programs per SM): the
# fewest issue cycles per pair of the 4-warp candidates in a triton 3.6 sm_90 compile (kernel_static.py
# --staged-tile), with as many programs per SM as an SM holds (2 for Llama-7B, 3 for BERT-base) and one more
STAGED_TILES = {"llama-7b": [dict(BLOCK_M=32, BLOCK_N=64, SUB_N=4, num_warps=4, per_sm=per_sm) for per_sm in (2, 3)],
                "bert-base": [dict(BLOCK_M=32, BLOCK_N=64, SUB_N=4, num_warps=4, per_sm=per_sm) for per_sm in (3, 4)]}


def staged(name, inputs, production):
    """{variant: (median seconds, max |staged - production| / max |production|)} of the alpha-staged kernel
    (kobattr.kernels.attention_pairs_staged, the triton_staged implementation: its own tile with alpha's scratch
    in float32 and in bfloat16, then STAGED_TILES) on the pair pass's inputs."""
    from kobattr.kernels.attention_pairs_staged import attention_maps

    attn, grams, row_scale, lse2 = inputs
    gram, scale = grams[:, :, :1].contiguous(), row_scale[:, :, :1].contiguous()
    out = {}
    variants = [(torch.float32, None), (torch.bfloat16, None)] + [(torch.bfloat16, t) for t in STAGED_TILES[name]]
    for scratch, tile in variants:
        label = f"scratch {str(scratch).replace('torch.', '')}" + (f", tile {tuple(tile.values())}" if tile else "")
        out[label] = try_experiment(lambda: attention_maps(attn.q, attn.k, attn.valid, attn.causal, attn.window,
                                                           attn.scale, gram, scale, lse2=lse2, tile=tile,
                                                           scratch_dtype=scratch)[:, 0], production)
    return out


def compiled_facts():
    """{'registers': ..., 'spilled_bytes': ...} of each compiled variant of the pair kernel so far (triton's
    per-device kernel cache; its layout varies across versions, so anything unexpected gives an empty list)."""
    from kobattr.kernels.attention_pairs import _attention_pairs_kernel as kernel

    facts = []
    try:
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                compiled._init_handles()
                facts.append(dict(registers=compiled.n_regs, spilled_bytes=compiled.n_spills,
                                  shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps))
    except Exception as err:  # noqa: BLE001 - informational only
        facts.append(dict(unavailable=f"{type(err).__name__}: {err}"[:200]))
    return facts


def profile(name, N, dtype):
    layer = LAYERS[name]
    one, lse, inputs = pair_pass(layer, N, dtype, M=1)
    three, _, _ = pair_pass(layer, N, dtype, M=3)
    row = dict(layer=name, N=N, dtype=str(dtype).replace("torch.", ""), sdpa=sdpa_time(layer, N, dtype),
               lse=timed(lse, max_seconds=2.0)[0], map_m1=timed(one, max_seconds=2.0)[0],
               map_m3=timed(three, max_seconds=2.0)[0])
    row["gram"] = (row["map_m3"] - row["map_m1"]) / 2
    row["alpha"] = row["map_m1"] - row["gram"]
    production = one()
    row["streamed"] = streamed(name, inputs, production)
    row["staged"] = staged(name, inputs, production)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--once", choices=list(LAYERS), help="only a warm-up and one call of map M=1 (for ncu)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no GPU: pair-kernel profile skipped.")
        return 0
    dtype = getattr(torch, args.dtype)
    if args.once:
        call, _, _ = pair_pass(LAYERS[args.once], args.n, dtype, M=1)
        call()  # the warm-up compiles: --launch-skip 1 steps over it
        call()
        torch.cuda.synchronize()
        return 0
    print(f"{torch.cuda.get_device_name()}, N = {args.n}, {args.dtype}; ms, and x SDPA forward in brackets")
    print(f"{'layer':10s} {'SDPA':>7s} {'lse':>14s} {'map M=1':>14s} {'alpha':>14s} {'gram':>14s} {'map M=3':>14s}")
    rows = []
    for name in args.layers:  # each layer printed as it finishes: a run cut short keeps what it measured
        r = profile(name, args.n, dtype)
        rows.append(r)
        cells = [f"{r[key] * 1e3:6.2f} ({r[key] / r['sdpa']:4.1f}x)" for key in ("lse", "map_m1", "alpha", "gram", "map_m3")]
        print(f"{r['layer']:10s} {r['sdpa'] * 1e3:7.3f} " + " ".join(f"{c:>14s}" for c in cells))
        experiments = [(f"streamed kernel (BM, BN, warps) = {tile}", result) for tile, result in r["streamed"].items()]
        experiments += [(f"staged kernel, {variant}", result) for variant, result in r["staged"].items()]
        for label, result in experiments:
            shown = (f"{result[0] * 1e3:.2f} ms ({result[0] / r['sdpa']:.1f}x SDPA, {result[0] / r['map_m1']:.2f}x map M=1), "
                     f"differs by {result[1]:.1e}" if isinstance(result, tuple) else result)
            print(f"{'':10s} {label}: {shown}", flush=True)
    compiled = compiled_facts()
    print("pair kernel variants compiled here:", json.dumps(compiled))
    out = Path(__file__).parent / "results" / f"gpu_profile_{torch.cuda.get_device_name().replace(' ', '_')}.json"
    out.write_text(json.dumps(dict(rows=rows, compiled=compiled), indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
