"""What the compiled attention pair kernel costs per pair, read from its machine code: no GPU needed.

    python benchmarks/kernel_static.py [--arch 90] [--dtype bf16] [--tile BM BN BD WARPS STAGES ...]
                                       [--measured llama-7b=76.5 bert-base=21.2 --n 16384]

Compiles ``_attention_pairs_kernel`` for gpu_bench.py's Llama-7B and BERT-base layers (M = 1 Gram, full
map: ATTNRESLN-N alone) the way a launch on aligned tensors does (tests/test_triton_compile.py's
signature, 16-byte divisibility of every pointer and of N, R), then reads the cubin with the cuobjdump that
ships with triton:
- registers, spilled bytes (STACK), shared memory, and the CTAs an SM holds by each of those limits;
- the SASS of the key loop (the outermost backward branch), inner loops (the Dh chunks) counted ceil(Dh /
  BLOCK_D) times, the diagonal tile's extra block counted as if every tile ran it (an upper estimate);
- issue cycles per pair: warp instructions per tile x warps / 4 schedulers / (BM x BN) pairs, the floor a
  kernel that never stalls would reach on an SM, beside the bytes per pair the tile re-reads from L2
  (q of every head per key tile, k as the tile loads it, the Gram per query block).
With ``--measured LAYER=MS`` (a GPU time at ``--n`` from gpu_tiles.py / gpu_bench.py) it also prints the
cycles per pair that time means on ``--sms`` SMs at ``--clock-ghz``, and their ratio to the issue floor:
how much of the time is spent waiting (memory latency, barriers, bank conflicts) rather than issuing.
Results: benchmarks/results/kernel_static_sm<arch>_triton<version>.json (an earlier run's rows stay unless this run redoes them).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiling: the interpreter's tl functions cannot be compiled

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from gpu_bench import LAYERS  # noqa: E402
from test_triton_compile import SHARED_LIMIT, ast_source, signature  # noqa: E402

REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM, SCHEDULERS = 65536, 64, 32, 4
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # per SM; each CTA also reserves 1 KB
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*?(?:\s0x([0-9a-f]+))?\s*;")


def torch_dtype(dtype):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def constants(layer, dtype, tile):
    """The constexpr arguments attention_maps passes for the full map of ``layer`` with M = 1 and ``tile``."""
    from kobattr.kernels import rows as kr
    qk_fp32, precision = kr.dot_settings(torch_dtype(dtype))
    return dict(H=layer["H"], KV_GROUP=layer["H"] // layer["KV"], M=1, MP=kr.pow2(1, 1), DH=layer["Dh"],
                HP=kr.pow2(layer["H"]), BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"], BLOCK_D=tile["BLOCK_D"],
                HAS_ROWS=False, CAUSAL=layer["causal"], WINDOWED=False, SYMMETRIC=False, SOFTCAP=False,
                STORE_MAP=True, SUM_ROWS=False, CONTRACT=False, WRITE_ALPHA=False, BLOCK_K=16,
                QK_FP32=qk_fp32, DOT_PRECISION=precision)


def compile_kernel(kernel, consts, dtype, arch, tile, overrides=None):
    """(cubin path, shared bytes) of ``kernel`` compiled as an aligned launch would compile it."""
    import triton
    from triton.backends.compiler import GPUTarget

    sig = dict(signature(kernel, dtype, consts), **(overrides or {}))
    src = ast_source(kernel, sig, consts)
    # what the launcher specializes on for 16-byte-aligned tensors and N, R divisible by 16
    src.attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in sig.items()
                 if kind.startswith("*") or name in ("N", "R")}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=tile["num_warps"], num_stages=tile["num_stages"]))
    path = Path(tempfile.mkdtemp(prefix="kobattr_static_")) / f"pairs_{consts['H']}h_{consts['DH']}d_{'_'.join(str(v) for v in tile.values())}_sm{arch}_{dtype}.cubin"
    path.write_bytes(compiled.asm["cubin"])
    return path, compiled.metadata.shared


def cuobjdump(*args):
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *args], capture_output=True, text=True, check=True).stdout


def key_loop_counts(sass, inner_trips, nested=False):
    """{opcode: warp instructions per key tile} over the outermost backward branch's body (with ``nested``, the
    largest loop inside it: a persistent kernel's key loop), instructions of a nested loop counted inner_trips
    times."""
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(SASS_LINE.match, sass.splitlines()) if m]
    loops = [(int(target, 16), address) for address, op, target in code
             if op == "BRA" and target is not None and int(target, 16) < address]
    if not loops:
        raise RuntimeError("no backward branch: the key loop was not found in the SASS")

    def inside(outer):
        return [loop for loop in loops if loop != outer and outer[0] <= loop[0] and loop[1] <= outer[1]]

    def span(loop):
        return loop[1] - loop[0]

    outer = max(loops, key=span)
    if nested:
        outer = max(inside(outer), key=span)
    inner = inside(outer)
    counts = {}
    for address, op, _ in code:
        if outer[0] <= address <= outer[1]:
            weight = inner_trips ** sum(lo <= address <= hi for lo, hi in inner)
            counts[op] = counts.get(op, 0) + weight
    return counts


def analyse(name, layer, dtype, arch, tile, kind="pairs"):
    """The numbers of the module docstring for the production pair kernel (kind "pairs") or an alternative one
    of kobattr.kernels: "streamed" (its inner loop runs over the H heads), "staged" and "staged-bf16" (the
    key loop inside the persistent loop, the head loop inside it; alpha's scratch in fp32 or bf16)."""
    from kobattr.kernels import attention_pairs_staged as staged, attention_pairs_streamed as streamed

    H, KV, Dh, e = layer["H"], layer["KV"], layer["Dh"], ELEMENT_BYTES[dtype]
    nested, overrides = False, {}
    per_key = (H + 1) ** 2 * 4  # L2 bytes a key tile reads per key for the quadratic form: the fp32 Gram
    if kind == "streamed":
        kernel, inner_trips = streamed._streamed_pairs_kernel, H
        consts = streamed.streamed_constants(H, KV, Dh, 1, torch_dtype(dtype), tile, causal=layer["causal"])
        per_key = (H + 1) * consts["CP"] * 4  # the factor rows
    elif kind.startswith("staged"):
        kernel, inner_trips, nested = staged._staged_pairs_kernel, H, True
        consts = staged.staged_constants(H, KV, Dh, 1, torch_dtype(dtype), tile, causal=layer["causal"])
        scratch = "bf16" if kind == "staged-bf16" else "fp32"
        overrides = dict(scratch_ptr="*" + scratch, gram_ptr="*" + scratch)
        per_key = consts["HP"] ** 2 * ELEMENT_BYTES[scratch]  # the padded Gram
    else:
        from kobattr.kernels.attention_pairs import _attention_pairs_kernel as kernel
        consts, inner_trips = constants(layer, dtype, tile), math.ceil(layer["Dh"] / tile["BLOCK_D"])
    path, shared = compile_kernel(kernel, consts, dtype, arch, tile, overrides)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", cuobjdump("--dump-resource-usage", str(path)))
    regs, stack = int(usage.group(1)), int(usage.group(2))
    counts = key_loop_counts(cuobjdump("-sass", str(path)), inner_trips, nested)
    warps, pairs = tile["num_warps"], tile["BLOCK_M"] * tile["BLOCK_N"]
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    ctas = dict(registers=REGISTERS_PER_SM // (regs_per_warp * warps), shared=SHARED_PER_SM[arch] // (shared + 1024),
                warps=MAX_WARPS_PER_SM // warps)
    l2 = dict(q=H * Dh * e / tile["BLOCK_N"], k=H * Dh * e / tile["BLOCK_M"],  # k as loaded: h // KV_GROUP repeats
              gram=per_key / tile["BLOCK_M"])
    if kind.startswith("staged"):  # alpha written to the scratch and read back
        l2["scratch"] = 2 * H * ELEMENT_BYTES[scratch]
    per_tile = sum(counts.values())
    return dict(layer=name, arch=arch, dtype=dtype, tile=tile, registers=regs, spilled_bytes=stack,
                shared_bytes=shared, shared_limit=SHARED_LIMIT[arch],
                ctas_per_sm=min(MAX_CTAS_PER_SM, *ctas.values()), cta_limits=ctas,
                warps_per_sm=min(MAX_CTAS_PER_SM, *ctas.values()) * warps,
                warp_instructions_per_tile=per_tile, tensor_core_instructions_per_tile=counts.get("HMMA", 0),
                top_opcodes=dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12]),
                issue_cycles_per_pair=per_tile * warps / SCHEDULERS / pairs,
                l2_bytes_per_pair=dict(l2, total=sum(l2.values())), kernel=kind)


def pairs_of(layer, n):
    return n * (n + 1) / 2 if layer["causal"] else n * n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_PER_SM))
    parser.add_argument("--dtype", default="bf16", choices=sorted(ELEMENT_BYTES))
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--tile", nargs=5, type=int, action="append", metavar=("BM", "BN", "BD", "WARPS", "STAGES"),
                        help="a tile to analyse besides the launcher's own (repeatable)")
    parser.add_argument("--staged", action="store_true",
                        help="also the staged kernel (kernels/attention_pairs_staged.py), alpha's scratch in fp32 and bf16")
    parser.add_argument("--staged-tile", nargs=4, type=int, action="append", metavar=("BM", "BN", "SUB_N", "WARPS"),
                        help="a tile of the staged kernel to analyse (both scratch dtypes); repeatable")
    parser.add_argument("--streamed", action="store_true",
                        help="also analyse kernels/attention_pairs_streamed.py with its own tile")
    parser.add_argument("--measured", nargs="+", default=[], metavar="LAYER=MS",
                        help="measured milliseconds of the launcher's tile at --n, e.g. llama-7b=76.5")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--clock-ghz", type=float, default=1.98)
    args = parser.parse_args()
    import triton

    from kobattr.kernels.attention_pairs import pair_settings
    from kobattr.kernels.attention_pairs_staged import staged_settings
    from kobattr.kernels.attention_pairs_streamed import streamed_settings
    measured = {k: float(v) for k, v in (item.split("=") for item in args.measured)}
    results = []
    for name in args.layers:
        layer = LAYERS[name]
        own = pair_settings(layer["H"], args.n)
        tiles = [("own", own)] + [("candidate", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=w, num_stages=s))
                                  for bm, bn, bd, w, s in args.tile or []]
        if args.streamed:
            tiles.append(("streamed", dict(streamed_settings(layer["H"]), BLOCK_D=layer["Dh"], num_stages=1)))
        staged = [{k: v for k, v in staged_settings(layer["H"]).items() if k != "per_sm"}] if args.staged else []
        staged += [dict(BLOCK_M=bm, BLOCK_N=bn, SUB_N=sub, num_warps=w) for bm, bn, sub, w in args.staged_tile or []]
        tiles += [(kind, dict(tile, BLOCK_D=layer["Dh"], num_stages=1)) for tile in staged
                  for kind in ("staged", "staged-bf16")]
        for label, tile in tiles:
            try:
                row = analyse(name, layer, args.dtype, args.arch, tile,
                              kind=label if label in ("streamed", "staged", "staged-bf16") else "pairs")
            except Exception as err:  # noqa: BLE001 - a tile that does not compile is reported, not fatal
                print(f"{name} {tile}: {type(err).__name__}: {str(err)[:300]}")
                continue
            row["tile_label"] = label
            if label == "own" and name in measured:
                cycles = measured[name] * 1e-3 * args.clock_ghz * 1e9 * args.sms / pairs_of(layer, args.n)
                row["measured"] = dict(ms=measured[name], n=args.n, sms=args.sms, clock_ghz=args.clock_ghz,
                                       cycles_per_pair=cycles, over_issue_floor=cycles / row["issue_cycles_per_pair"])
            results.append(row)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, attention pairs with M = 1 (full map)")
    print(f"{'layer':10s} {'tile (BM BN BD warps stages)':28s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s} "
          f"{'warps/SM':>8s} {'instr/tile':>10s} {'issue cyc/pair':>14s} {'L2 B/pair':>9s} {'measured cyc/pair':>17s}")
    for r in results:
        t = r["tile"]
        shape = (f"{t['BLOCK_M']} {t['BLOCK_N']} sub {t['SUB_N']} {t['num_warps']}" if "SUB_N" in t else
                 f"{t['BLOCK_M']} {t['BLOCK_N']} {t['BLOCK_D']} {t['num_warps']} {t['num_stages']}") + f" ({r['tile_label']})"
        seen = (f"{r['measured']['cycles_per_pair']:.0f} ({r['measured']['over_issue_floor']:.0f}x)"
                if "measured" in r else "")
        print(f"{r['layer']:10s} {shape:28s} {r['registers']:4d} {r['spilled_bytes']:5d} {r['shared_bytes'] / 1024:7.0f} "
              f"{r['warps_per_sm']:8d} {r['warp_instructions_per_tile']:10d} {r['issue_cycles_per_pair']:14.1f} "
              f"{r['l2_bytes_per_pair']['total']:9.0f} {seen:>17s}")
    out = HERE / "results" / f"kernel_static_sm{args.arch}_triton{triton.__version__}.json"
    # merged into what earlier runs wrote there: a run of one layer or kernel replaces only its own rows
    def key(row):
        return row["layer"], row["dtype"], row["kernel"], json.dumps(row["tile"], sort_keys=True)
    new = {key(row) for row in results}
    kept = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([row for row in kept if key(row) not in new] + results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
