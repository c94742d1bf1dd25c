"""Every Triton kernel and constexpr variant compiles to PTX and cubin for sm_80 and sm_90.

No GPU needed: ``triton.compile`` with an explicit GPUTarget runs the whole real pipeline (TTIR,
TTGIR, LLVM, ptxas), which catches what the interpreter forgives (layouts of 3D dots, shapes a
real tl.dot rejects, shared memory beyond what the architecture has).

The compiling happens in worker processes started with TRITON_INTERPRET=0 (this file run as a
script): once triton was imported with TRITON_INTERPRET=1, as tests/conftest.py does, its own
standard library (tl.sum, tl.max, ...) consists of interpreted functions that cannot be compiled.
One worker per CPU core; each test then checks the result of its variant.
"""

import inspect
import itertools
import json
import os
import subprocess
import sys

import pytest

# shared memory per block on the architectures (opt-in maximum)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
CAPABILITIES = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
TARGETS = list(itertools.product(CAPABILITIES, DTYPES))

INT_ARGS = {"N", "B", "C", "key_start", "key_stop", "R", "K", "F", "D", "window", "radius", "weights_b_stride",
            "weights_m_stride", "weights_s_stride"}
MODEL_DTYPE_PTRS = {"q_ptr", "k_ptr", "ff_ptr", "gate_ptr", "res_ptr", "coef_in_ptr", "coef_gate_ptr", "w_out_ptr"}

# Compiling takes 5-60 s a kernel on a small CPU, so each list below is a covering set rather than
# the full product: every kernel on every (capability, dtype), every value of every flag, every
# launcher mode combination, the head sizes 32/64/80/128, H padded to HP = 16/32/64 and GQA.
# Tiles and warps are the launchers' (pair_settings, lse_settings): the HAS_ROWS variants take those of
# a few selected rows (ROWS_SELECTED; a 16-row query block), the others those of a long input (N_LONG).
ROWS_SELECTED, N_LONG = 8, 4096

# (H, KV_GROUP, DH, HAS_ROWS, CAUSAL, WINDOWED, SYMMETRIC, SOFTCAP)
LSE_VARIANTS = [(12, 1, 64, False, False, False, False, False), (32, 4, 128, True, True, False, False, True),
                (4, 2, 80, False, True, True, True, False), (64, 8, 32, True, False, True, False, False),
                (40, 8, 128, False, False, True, True, True), (12, 3, 80, True, True, True, False, False)]

# (H, KV_GROUP, DH, M, HAS_ROWS, CAUSAL, WINDOWED, SYMMETRIC, SOFTCAP, (STORE_MAP, SUM_ROWS, CONTRACT, WRITE_ALPHA)):
# the mode tuples are the ones attention_maps launches, each with and without rows; the last is the
# benchmark's Llama layer
ATTENTION_VARIANTS = [
    (12, 1, 64, 3, False, False, False, False, False, (True, False, False, False)),
    (32, 4, 32, 1, True, True, False, False, True, (True, False, False, True)),
    (4, 2, 80, 2, True, True, True, True, True, (False, True, False, False)),
    (64, 8, 32, 1, False, False, True, True, False, (False, True, False, True)),
    (8, 1, 32, 3, False, True, False, False, False, (False, False, True, False)),
    (40, 8, 32, 2, False, False, True, False, True, (False, False, True, True)),
    (16, 2, 32, 1, True, True, True, True, False, (False, False, True, True)),
    (32, 4, 128, 3, False, True, False, False, False, (True, False, False, False)),
]
ATTENTION_TARGETS = TARGETS + [(80, "fp16"), (80, "bf16")]

# (H, KV_GROUP, DH, GATED, N_SCOPES, CENTER, HAS_ROWS, CAUSAL, WINDOWED, SYMMETRIC, SOFTCAP,
#  (STORE_MAP, SUM_ROWS, CONTRACT))
FF_VARIANTS = [
    (12, 1, 64, False, 2, False, False, False, False, False, False, (True, False, False)),
    (32, 4, 32, True, 3, True, True, True, False, False, True, (True, False, False)),
    (4, 2, 80, False, 3, True, True, True, True, True, True, (False, True, False)),
    (64, 8, 32, True, 2, False, False, False, True, True, False, (False, True, False)),
    (8, 1, 32, True, 3, False, False, True, False, False, False, (False, False, True)),
    (40, 8, 32, False, 3, False, True, False, True, False, True, (False, False, True)),
]

# the FF GEMM's prologue (triton_gemm): (H, KV_GROUP, DH, GATED, CAUSAL, WINDOWED, SYMMETRIC, SOFTCAP, GEMM dtype);
# its parts and coefficients come in float32 (the compute dtype), q and k in the model's
PROLOGUE_JOBS = [
    (80, "fp32", (12, 1, 64, False, False, False, False, False, "fp32")),
    (90, "bf16", (32, 4, 128, True, True, False, False, False, "bf16")),
    (80, "fp16", (8, 2, 80, True, True, True, True, True, "fp16")),
    (90, "fp32", (40, 8, 128, False, False, True, False, True, "bf16")),
]

# its epilogue (every pointer float32 but slot's): (H, N_SCOPES, CENTER, WEIGHTED)
EPILOGUE_JOBS = [(80, "fp32", (12, 3, True, True)), (90, "fp32", (32, 2, False, False)),
                 (80, "fp32", (32, 3, False, True)), (80, "fp32", (40, 3, True, False)),
                 (90, "fp32", (64, 3, True, True))]

# the alternative attention pair kernels (triton_streamed, triton_staged): (module, kernel, capability, dtype,
# (H, KV, DH, M, HAS_ROWS, CAUSAL, WINDOWED, SYMMETRIC, SOFTCAP, scratch dtype of the staged kernel)); the first of
# each is the benchmark's Llama layer with the launcher's tile, then every flag on and off
VARIANT_JOBS = [
    ("attention_pairs_streamed", "_streamed_pairs_kernel", 90, "bf16", (32, 4, 128, 1, False, True, False, False, False, None)),
    ("attention_pairs_streamed", "_streamed_pairs_kernel", 80, "fp32", (12, 3, 64, 3, True, True, True, True, True, None)),
    ("attention_pairs_staged", "_staged_pairs_kernel", 90, "bf16", (32, 4, 128, 1, False, True, False, False, False, "bf16")),
    ("attention_pairs_staged", "_staged_pairs_kernel", 80, "fp16", (12, 12, 64, 2, True, False, True, True, True, "fp32")),
    ("attention_pairs_staged", "_staged_pairs_kernel", 90, "fp32", (4, 2, 80, 1, True, True, False, True, False, "fp32")),
]


# ALTI's L1 kernel (kernels/alti_pairs.py): fp32 inputs whatever the model dtype; the widths give BLOCK_D 32 and 64
ALTI_WIDTHS = (32, 384)


def jobs():
    """id -> (module, kernel, dtype, capability, variant) of every compile."""
    out = {}
    for i, (target, variant) in enumerate(zip(TARGETS, LSE_VARIANTS)):
        out[f"lse-{i}"] = ("rows", "_row_lse_kernel", *target, variant)
    for i, (target, variant) in enumerate(zip(ATTENTION_TARGETS, ATTENTION_VARIANTS)):
        out[f"attention-{i}"] = ("attention_pairs", "_attention_pairs_kernel", *target, variant)
    for i, (target, variant) in enumerate(zip(TARGETS, FF_VARIANTS)):
        out[f"ff-{i}"] = ("ff_pairs", "_ff_pairs_kernel", *target, variant)
    for i, (capability, dtype, variant) in enumerate(PROLOGUE_JOBS):
        out[f"prologue-{i}"] = ("ff_pairs", "_ff_prologue_kernel", capability, dtype, variant)
    for i, (capability, dtype, variant) in enumerate(EPILOGUE_JOBS):
        out[f"epilogue-{i}"] = ("ff_pairs", "_ff_epilogue_kernel", capability, dtype, variant)
    for i, (capability, d) in enumerate(itertools.product(CAPABILITIES, ALTI_WIDTHS)):
        out[f"alti-{i}"] = ("alti_pairs", "_alti_l1_kernel", capability, "fp32", (13, d))
    for i, job in enumerate(VARIANT_JOBS):
        out[f"variant-{i}"] = job
    return out


def launch_settings(kernel, dtype, variant):
    """(constexpr arguments, {num_warps, num_stages}, signature entries that differ from ``signature``'s) the
    launchers pass for this variant."""
    import torch

    from kobattr.kernels import attention_pairs as ap
    from kobattr.kernels import ff_pairs as fp
    from kobattr.kernels import rows as kr
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    qk_fp32, precision = kr.dot_settings(dtypes[dtype])
    dots = dict(QK_FP32=qk_fp32, DOT_PRECISION=precision)
    if kernel in ("_streamed_pairs_kernel", "_staged_pairs_kernel"):
        from kobattr.kernels import attention_pairs_staged as staged, attention_pairs_streamed as streamed
        H, KV, dh, M, *flags, scratch = variant
        if kernel == "_streamed_pairs_kernel":
            tile = streamed.streamed_settings(H)
            return (streamed.streamed_constants(H, KV, dh, M, dtypes[dtype], tile, *flags),
                    dict(num_warps=tile["num_warps"]), {})
        tile = staged.staged_settings(H, dtypes[scratch])
        consts = staged.staged_constants(H, KV, dh, M, dtypes[dtype], tile, *flags)
        return consts, dict(num_warps=tile["num_warps"]), dict(scratch_ptr="*" + scratch, gram_ptr="*" + scratch)
    if kernel == "_ff_prologue_kernel":
        H, group, dh, gated, causal, windowed, symmetric, softcap, gemm = variant
        tile = fp.prologue_settings(H)
        options = dict(num_warps=tile.pop("num_warps"), num_stages=tile.pop("num_stages"))
        fp32_parts = {name: "*fp32" for name in ("ff_ptr", "gate_ptr", "coef_in_ptr", "coef_gate_ptr")}
        return (dict(H=H, KV_GROUP=group, DH=dh, HP=kr.pow2(H), GATED=gated, CAUSAL=causal, WINDOWED=windowed,
                     SYMMETRIC=symmetric, SOFTCAP=softcap, **tile, **dots), options,
                dict(fp32_parts, hidden_ptr="*" + gemm))
    if kernel == "_ff_epilogue_kernel":
        H, n_scopes, center, weighted = variant
        tile = fp.epilogue_settings(H)
        options = dict(num_warps=tile.pop("num_warps"), num_stages=tile.pop("num_stages"))
        return (dict(H=H, HP1=kr.pow2(H + 1), N_SCOPES=n_scopes, CENTER=center, WEIGHTED=weighted,
                     DOT_PRECISION=precision, **tile), options, dict(ff_ptr="*fp32", res_ptr="*fp32", slot_ptr="*i32"))
    if kernel == "_alti_l1_kernel":
        from kobattr.kernels import alti_pairs as al
        K, d = variant
        tile = al.alti_settings(d)
        options = dict(num_warps=tile.pop("num_warps"))
        return dict(K=K, **tile), options, dict(norm_ptr="*fp64", out_ptr="*fp64", vis_ptr="*i8")
    if kernel == "_row_lse_kernel":
        H, group, dh, has_rows, causal, windowed, symmetric, softcap = variant
        tile = kr.lse_settings(dh, ROWS_SELECTED if has_rows else N_LONG)
        options = dict(num_warps=tile.pop("num_warps"), num_stages=tile.pop("num_stages"))
        return dict(H=H, KV_GROUP=group, DH=dh, HAS_ROWS=has_rows, CAUSAL=causal, WINDOWED=windowed,
                    SYMMETRIC=symmetric, SOFTCAP=softcap, **tile, **dots), options, {}
    if kernel == "_attention_pairs_kernel":
        H, group, dh, M, has_rows, causal, windowed, symmetric, softcap, (store, sums, contract, alpha) = variant
        tile = ap.pair_settings(H, ROWS_SELECTED if has_rows else N_LONG)
        options = dict(num_warps=tile.pop("num_warps"), num_stages=tile.pop("num_stages"))
        return dict(H=H, KV_GROUP=group, M=M, MP=kr.pow2(M, 1), DH=dh, HP=kr.pow2(H),
                    HAS_ROWS=has_rows, CAUSAL=causal, WINDOWED=windowed, SYMMETRIC=symmetric, SOFTCAP=softcap,
                    STORE_MAP=store, SUM_ROWS=sums, CONTRACT=contract, WRITE_ALPHA=alpha, BLOCK_K=16, **tile,
                    **dots), options, {}
    (H, group, dh, gated, n_scopes, center, has_rows, causal, windowed, symmetric, softcap,
     (store, sums, contract)) = variant
    tile = fp.ff_settings(H)
    options = dict(num_warps=tile.pop("num_warps"), num_stages=tile.pop("num_stages"))
    return dict(H=H, KV_GROUP=group, DH=dh, HP=kr.pow2(H), GATED=gated, N_SCOPES=n_scopes, CENTER=center,
                HAS_ROWS=has_rows, CAUSAL=causal, WINDOWED=windowed, SYMMETRIC=symmetric, SOFTCAP=softcap,
                STORE_MAP=store, SUM_ROWS=sums, CONTRACT=contract, BLOCK_K=16, **tile, **dots), options, {}


def signature(kernel, dtype, consts):
    """The ASTSource signature: model-dtype pointers for q, k and the FF parts, fp32 elsewhere."""
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in MODEL_DTYPE_PTRS:
            sig[name] = "*" + dtype
        elif name == "valid_ptr":
            sig[name] = "*i8"
        elif name == "rows_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in INT_ARGS:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def ast_source(kernel, sig, consts):
    """triton.compiler.ASTSource across the triton versions setup.py allows: 3.3 and later take
    ``constexprs=`` and a signature naming every argument, constexprs as "constexpr"; 3.0-3.2 take
    ``constants=`` (the same name -> value dict) and a signature of the other arguments only."""
    from triton.compiler import ASTSource

    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        return ASTSource(fn=kernel, signature=sig, constexprs=consts)
    return ASTSource(fn=kernel, signature={k: v for k, v in sig.items() if k not in consts}, constants=consts)


def compile_job(module, kernel_name, capability, dtype, variant):
    """'ok', or why the compile failed or produced nothing usable."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    kernel = getattr(importlib.import_module(f"kobattr.kernels.{module}"), kernel_name)
    consts, options, entries = launch_settings(kernel_name, dtype, variant)
    try:
        src = ast_source(kernel, dict(signature(kernel, dtype, consts), **entries), consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                  options=options)
    except Exception as err:  # the message is the test failure
        return f"compile error: {type(err).__name__}: {err}"[:4000]
    if not compiled.asm.get("ptx") or not compiled.asm.get("cubin"):
        return f"no PTX/cubin, asm keys {sorted(compiled.asm)}"
    if compiled.metadata.shared > SHARED_LIMIT[capability]:
        return f"{compiled.metadata.shared} bytes of shared memory > {SHARED_LIMIT[capability]} on sm_{capability}"
    return "ok"


def worker(index, count):
    """Compile every count-th job starting at index; print {id: result} as JSON."""
    results = {}
    for job_id in sorted(jobs())[index::count]:
        results[job_id] = compile_job(*jobs()[job_id])
    print(json.dumps(results))


@pytest.fixture(scope="module")
def compile_results():
    pytest.importorskip("triton")
    count = max(1, min(os.cpu_count() or 1, 8))
    env = dict(os.environ, TRITON_INTERPRET="0")
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(count)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(count)]
    results = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1800)
        assert proc.returncode == 0, stderr[-4000:]
        results.update(json.loads(stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("job_id", sorted(jobs()))
def test_kernel_variant_compiles(compile_results, job_id):
    module, kernel, capability, dtype, variant = jobs()[job_id]
    result = compile_results[job_id]
    assert result == "ok", f"{kernel} sm_{capability} {dtype} {variant}: {result}"


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]))
