"""The on-device tuner: for each workload, the fastest implementation that is correct on this device, measured once.

A workload is a primitive (attention_maps, ff_maps, row_stats) on a device (its name and compute capability; on
a CPU its instruction set and thread count), for a model shape (heads, KV heads, head size, the attention
features; ff_maps adds d_model, d_ff, gating and the FF product's dtype), a dtype, the output modes asked for
(full maps, rows=, contractions, alpha) and a length bucket (N rounded up to a power of two, at least 64). The first time dispatch (``kobattr.backends.select``, backend="auto" only)
meets a workload with ``KOBATTR_TUNE=1``, ``tune`` takes every candidate of ``candidates`` (an implementation and
its settings) that takes the input and:

1. gates it: its maps of a small random layer of the workload's shape (N = 48, padding, the attention features,
   on this device, in this dtype, in the workload's output mode: full maps, a few rows, a contraction) are
   compared with the float64 reference (kobattr/reference.py) as ``kobattr selftest`` does; a candidate over
   the tolerance is rejected, however fast;
2. times the survivors on random inputs in the workload's output mode: full attention maps whole at the
   bucket's length (at most FULL_N), rows, contractions and FF maps on the last TIME_ROWS query rows at the
   bucket's length, row_stats whole: one warm-up call, then the fastest of up to 3 (one for a candidate already 3x slower than
   the best so far); a later candidate must beat an earlier one by 5% to displace it;
3. stores the fastest in a small JSON file (``cache_path``), written atomically under a lock.

An entry is used only if it was tuned with the same torch, triton and kobattr versions and names one of today's
candidates with its exact settings; a corrupt file or a stale or unknown entry is ignored with a warning. The
environment variable KOBATTR_TUNE: "0" (the default: no tuning and no cache, dispatch's static rule alone, so that
tests and CI never tune), "1" (cached winners, tuning on a miss), "force" (tune every workload again, once per
process). ``kobattr tune`` tunes the workloads of a model at given lengths ahead of time.

Every implementation named in kobattr.backends is a candidate for the primitives it implements (a new one needs
no change here); ``register_candidates(fn)`` adds more, ``fn(primitive, device)`` returning Candidates (an
implementation with other settings, or one built by a factory).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .backends import BACKEND_NAMES, auto_order, implementation
from .backends.base import Attention, Backend, FFParts, required_features
from .backends.torch_backend import DEFAULT_BUDGET
from .backends.triton_backend import TritonStagedBackend

ENV = "KOBATTR_TUNE"
CACHE_ENV = "KOBATTR_CACHE_DIR"
MODES = ("0", "1", "force")
FORMAT = 1
MIN_BUCKET = 64
GATE_N, GATE_PAD = 48, 5
# query rows timed at the bucket's length (the last ones: causal rows there see every key); None: all
TIME_ROWS = {("attention_maps", "cpu"): 128, ("attention_maps", "cuda"): 2048,
             ("ff_maps", "cpu"): 8, ("ff_maps", "cuda"): 8}
FULL_N = {"cpu": 1024, "cuda": 16384}  # the longest full attention maps timed
TIE = 1.05  # a candidate must beat an earlier one by this factor to displace it
SLOW = 3.0
# TorchBackend.budget values tried beside the implementation's own (listed first: ties go to the earlier candidate)
BUDGETS = {"cpu": (DEFAULT_BUDGET // 4, DEFAULT_BUDGET * 4), "cuda": (DEFAULT_BUDGET * 4, DEFAULT_BUDGET * 16)}


class TuneCacheWarning(UserWarning):
    """A tuning cache file or entry that cannot be trusted and is ignored."""


@dataclass(frozen=True)
class Candidate:
    """An implementation with its settings: attributes set on the instance (TorchBackend.budget,
    TritonBackend.key_block_size, ...). ``factory`` builds implementations that have no name in
    kobattr.backends (a variant under test); ``backend`` then only labels it."""

    backend: str
    settings: tuple = ()  # ((attribute, value), ...), JSON scalars
    factory: Optional[Callable[[], Backend]] = field(default=None, compare=False)

    @property
    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.settings)
        return f"{self.backend}({inner})" if inner else self.backend

    def build(self):
        """The configured implementation, or a sentence saying why it cannot be had here."""
        impl = self.factory() if self.factory is not None else implementation(self.backend)
        if isinstance(impl, str):
            return impl
        for name, value in self.settings:
            if not hasattr(impl, name):
                raise ValueError(f"{self.label}: the {impl.name} implementation has no setting {name!r}.")
            setattr(impl, name, value)
        return impl


_SOURCES: list = []


def register_candidates(fn: Callable[[str, str], list]) -> Callable:
    """Add ``fn(primitive, device) -> [Candidate, ...]`` to what ``candidates`` returns (usable as a decorator)."""
    _SOURCES.append(fn)
    return fn


def _builtin(primitive: str, device: str) -> list:
    """Every implementation of kobattr.backends that implements ``primitive`` on tensors of ``device``, dispatch's
    static order first (ties keep its choice), the torch backend also with other budgets and the staged Triton
    kernel with both scratch dtypes; none of Triton's on a CPU, where only its interpreter runs, whose timings
    mean nothing."""
    names = auto_order(primitive, device) + BACKEND_NAMES
    out = []
    for name in dict.fromkeys(names):
        impl = implementation(name)
        if (device == "cpu" and "triton" in name) or isinstance(impl, str) or primitive not in impl.primitives \
                or device not in impl.devices:
            continue
        out.append(Candidate(name))
        if name == "torch" and primitive in ("attention_maps", "ff_maps"):
            out += [Candidate("torch", (("budget", b),)) for b in BUDGETS[device]]
        if name == "triton_staged":  # alpha's scratch in either precision (the gate rejects one too coarse)
            out += [Candidate(name, (("scratch", s),)) for s in TritonStagedBackend.SCRATCH]
    return out


def candidates(primitive: str, device: str) -> list:
    """Every candidate for ``primitive`` on ``device`` ("cpu" or "cuda"): the built-in implementations with their
    tile settings, then those of ``register_candidates``."""
    out = _builtin(primitive, device)
    for source in _SOURCES:
        out.extend(source(primitive, device))
    return out


# ----------------------------------------------------------------------------- keys and the cache file
def tune_mode() -> str:
    mode = os.environ.get(ENV, "0").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV} must be 0, 1 or force, got {mode!r}.")
    return mode


def cache_path() -> Path:
    """$KOBATTR_CACHE_DIR/tuning.json, else $XDG_CACHE_HOME/kobattr/tuning.json, else ~/.cache/kobattr/tuning.json."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kobattr"
    return Path(root) / "tuning.json"


def environment() -> dict:
    """The software an entry was measured with: an entry from other versions is stale."""
    from .bench import versions

    v = versions()
    return {name: v[name] for name in ("kobattr", "torch", "triton")}


def bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << math.ceil(math.log2(max(n, 1))))


def workload(primitive: str, attn: Attention, ff_gemm_dtype=None, ff_shape=None, outputs=frozenset()) -> dict:
    """The key of a workload (module docstring), JSON-ready; ``outputs``: the output modes beyond the full map
    the call asks for ("rows", "contract", "alpha"; the fastest implementation differs between them)."""
    from .bench import device_info

    info = device_info(attn.q.device)
    _, H, N, Dh = attn.q.shape
    key = dict(primitive=primitive, device_type=info["type"], device=info["name"], capability=info["capability"],
               dtype=str(attn.q.dtype).replace("torch.", ""), heads=H, kv_heads=attn.k.shape[1], head_size=Dh,
               features=sorted(required_features(attn)), length_bucket=bucket(N), outputs=sorted(outputs))
    if info["type"] == "cpu":
        key["threads"] = info["threads"]
    if primitive == "ff_maps":
        d_model, d_ff, gated = ff_shape
        key.update(d_model=int(d_model), d_ff=int(d_ff), gated=bool(gated),
                   ff_gemm=None if ff_gemm_dtype is None else str(ff_gemm_dtype).replace("torch.", ""))
    return key


def key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def _warn(message: str) -> None:
    warnings.warn(message, TuneCacheWarning, stacklevel=3)


def read_cache(path: Optional[Path] = None) -> dict:
    """{key text: entry} of the cache file; {} (with a warning) for a file that is not a tuning cache."""
    path = path or cache_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not a kobattr tuning cache of format {FORMAT}")
        return data["entries"]
    except (OSError, UnicodeDecodeError, ValueError) as err:
        _warn(f"ignoring the tuning cache {path}: {err}; dispatch uses its static rule (KOBATTR_TUNE=1 rewrites it).")
        return {}


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path`` (POSIX; where fcntl is missing, none) for a read-modify-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def store(key: dict, entry: dict, path: Optional[Path] = None) -> Path:
    """Write ``entry`` under ``key`` into the cache file, atomically, keeping the other entries."""
    from .result import atomic_write

    path = path or cache_path()
    with _locked(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TuneCacheWarning)  # a corrupt file is replaced, its reader warned
            entries = read_cache(path)
        entries[key_text(key)] = entry
        text = json.dumps(dict(format=FORMAT, entries=entries), indent=1, sort_keys=True) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def cached_winner(key: dict, path: Optional[Path] = None) -> tuple:
    """(whether the cache answers for ``key``, the winner's implementation or None for the static rule): (False,
    None) without an entry or for one ignored with a warning; (True, None) where the tuning found no candidate."""
    entry = read_cache(path).get(key_text(key))
    if entry is None:
        return False, None
    where = f"tuning cache entry for {key['primitive']} (N <= {key['length_bucket']})"
    try:
        env, winner = entry["env"], entry["winner"]
        if winner is not None:
            wanted = (str(winner["backend"]), tuple((str(k), v) for k, v in winner["settings"]))
    except (KeyError, TypeError, ValueError):
        _warn(f"ignoring a malformed {where}.")
        return False, None
    if env != environment():
        _warn(f"ignoring a stale {where}: tuned with {env}, running {environment()}.")
        return False, None
    if winner is None:
        return True, None
    for candidate in candidates(key["primitive"], key["device_type"]):
        if (candidate.backend, candidate.settings) == wanted and candidate.factory is None:
            impl = candidate.build()
            return (False, None) if isinstance(impl, str) else (True, impl)
    _warn(f"ignoring the {where}: {wanted[0]} with settings {dict(wanted[1])} is not among today's candidates.")
    return False, None


# ----------------------------------------------------------------------------- measuring
_ACTIVE: ContextVar[bool] = ContextVar("kobattr_tuning", default=False)  # no tuning inside a tuning run
_MEMO: dict = {}  # key text -> implementation or None, for this process


def _gate_layer(key: dict, attn: Attention, ff_shape):
    """The small random layer of the workload's shape that the correctness gate runs on."""
    d_model, d_ff, gated = ff_shape if ff_shape is not None else (64, 96, False)
    return _random_gate_layer(key["heads"], key["kv_heads"], key["head_size"], int(d_model), int(d_ff), bool(gated),
                              bool(attn.causal), min(attn.window, GATE_N // 3) if attn.window else 0,
                              min(attn.radius, GATE_N // 4) if attn.radius else 0, float(attn.softcap),
                              str(attn.q.device))


@functools.lru_cache(maxsize=1)  # the lengths of one model share it (Llama-7B's weights take seconds to draw)
def _random_gate_layer(H, KV, Dh, D, F, gated, causal, window, radius, softcap, device):
    from .testing import random_layer

    return random_layer("llama" if gated else "bert", N=GATE_N, B=1, pad=GATE_PAD, D=D, F=F, Dh=Dh, H=H, KV=KV,
                        causal=causal, window=window, radius=radius, softcap=softcap, dtype=torch.float64,
                        device=device)


def _gate(primitive: str, impls: dict, exact, dtype, ff_gemm_dtype=None, outputs=frozenset()) -> dict:
    """{label: None if it passed, else why not} of each implementation against the float64 reference, in the output
    mode of ``outputs`` (rows=: a few rows; contract=: two random weight rows)."""
    from .methods import STRUCTURES, form, methods_for
    from .reference import reference
    from .selftest import Outcome, _try

    structure = exact.structure
    ref = reference(exact, methods="all")
    layer = exact.to(dtype=dtype)
    low = None if dtype in (torch.float32, torch.float64) else reference(layer, methods="all")
    methods = [m for m in methods_for(structure) if form(m, structure).primitive == primitive]
    if primitive == "ff_maps":
        methods = [m for m in methods if m in STRUCTURES[structure].scopes]
    N = exact.seq_len
    rows = torch.tensor([0, 1, N // 2, N - GATE_PAD - 1], device=exact.q.device) if "rows" in outputs else None
    g = torch.Generator().manual_seed(0)
    contract = torch.rand(2, N, generator=g, dtype=torch.float64).to(exact.q.device) if "contract" in outputs else None
    verdicts = {}
    for label, impl in impls.items():
        outcome = Outcome(impl.name, primitive, "gate", str(dtype))
        try:
            _try(outcome, impl, primitive, layer, methods, ref, dtype, low, ff_gemm_dtype, rows, contract)
        except Exception as err:  # a candidate that breaks is rejected, never the tuning run
            verdicts[label] = f"{type(err).__name__}: {err}"[:200]
            continue
        if outcome.skipped is not None:
            verdicts[label] = f"declined the gate layer: {outcome.skipped}"
        elif not outcome.passed:
            verdicts[label] = f"error {outcome.error:.2e} over the tolerance {outcome.tolerance:.0e} against the reference"
        else:
            verdicts[label] = None
    return verdicts


def _timing_inputs(primitive: str, attn: Attention, ff_shape, n: int, ff_gemm_dtype=None, outputs=frozenset()):
    """fn(impl) running ``primitive`` on random inputs of the workload's shape at length ``n``, in its output mode:
    full attention maps whole at length min(n, FULL_N), the rest on the last TIME_ROWS rows at length n."""
    dev, dtype = attn.q.device, attn.q.dtype
    full = primitive == "attention_maps" and not {"rows", "contract"} & set(outputs)
    if full:
        n = min(n, FULL_N[dev.type])
    g = torch.Generator(device=dev).manual_seed(0)
    H, Dh, KV = attn.q.shape[1], attn.q.shape[3], attn.k.shape[1]
    big = Attention(q=torch.randn(1, H, n, Dh, device=dev, generator=g).to(dtype),
                    k=torch.randn(1, KV, n, Dh, device=dev, generator=g).to(dtype),
                    valid=torch.ones(1, n, dtype=torch.bool, device=dev), causal=attn.causal, window=attn.window,
                    scale=attn.scale, radius=attn.radius, softcap=attn.softcap)
    cap = None if full else TIME_ROWS.get((primitive, dev.type))
    rows = None if cap is None else torch.arange(max(0, n - cap), n, device=dev)
    weights = torch.full((1, 1, n), 1.0 / n, device=dev) if "contract" in outputs else None
    if primitive == "row_stats":
        return lambda impl: impl.row_lse(big)
    if primitive == "attention_maps":
        u = torch.randn(1, n, 1, H + 1, 8, device=dev, generator=g)
        grams, row_scale = u @ u.transpose(-1, -2), torch.rand(1, n, 1, device=dev, generator=g) + 0.5
        return lambda impl: impl.attention_maps(big, grams, row_scale, rows=rows, weights=weights,
                                                want_alpha="alpha" in outputs)
    d_model, d_ff, gated = ff_shape

    def key_block(keys: slice) -> tuple:  # random parts made per key block, as core makes them: no (N, H+1, F) held
        c = keys.stop - keys.start
        parts = lambda width: torch.randn(1, c, H + 1, width, device=dev) / math.sqrt(width)  # noqa: E731
        return parts(d_ff), parts(d_ff) if gated else None, parts(d_model)

    def positive(*shape):
        return torch.rand(*shape, device=dev, generator=g) + 0.5

    parts = FFParts(in_scale=positive(1, n), res_scale=positive(1, n), out_scale=positive(1, n),
                    coef_in=torch.randn(1, n, d_ff, device=dev, generator=g),
                    coef_gate=torch.randn(1, n, d_ff, device=dev, generator=g) if gated else None,
                    w_out=torch.randn(d_ff, d_model, device=dev, generator=g) / math.sqrt(d_ff),
                    out_weight=positive(d_model), out_center=not gated, n_scopes=3, key_block=key_block,
                    gemm_dtype=ff_gemm_dtype)
    return lambda impl: impl.ff_maps(big, parts, rows=rows, weights=weights)


def tune(primitive: str, attn: Attention, ff_gemm_dtype=None, ff_shape=None, pool: Optional[list] = None,
         path: Optional[Path] = None, save: bool = True, log: Optional[Callable[[str], None]] = None,
         outputs=frozenset()) -> dict:
    """Gate, time and store (module docstring) the candidates ``pool`` (default: ``candidates``) for the workload of
    ``attn``; returns the entry: winner (backend and settings, or None), seconds and rejected by label."""
    from .bench import timed

    key = workload(primitive, attn, ff_gemm_dtype, ff_shape, outputs)
    device = attn.q.device.type
    pool = candidates(primitive, device) if pool is None else pool
    impls, rejected = {}, {}
    for candidate in pool:
        impl = candidate.build()
        reasons = [impl] if isinstance(impl, str) else impl.refusals(primitive, attn, ff_gemm_dtype, outputs)
        if reasons:
            rejected[candidate.label] = " ".join(reasons)
        else:
            impls[candidate.label] = (candidate, impl)
    token = _ACTIVE.set(True)
    try:
        verdicts = _gate(primitive, {label: impl for label, (_, impl) in impls.items()},
                         _gate_layer(key, attn, ff_shape), attn.q.dtype, ff_gemm_dtype, outputs) if impls else {}
        run = _timing_inputs(primitive, attn, ff_shape, key["length_bucket"], ff_gemm_dtype, outputs) if impls else None
        seconds = {}
        for label, (candidate, impl) in impls.items():
            if verdicts[label] is not None:
                rejected[label] = verdicts[label]
                continue
            # a candidate already far slower than the best so far gets one timed call after its warm-up
            budget = min(5.0, 3 * SLOW * min(seconds.values())) if seconds else 5.0
            try:
                # the fastest call: another job slowing one call down must not decide the ranking
                seconds[label] = timed(lambda: run(impl), attn.q.device, repeats=3, max_seconds=budget)["fastest"]
            except Exception as err:  # e.g. out of memory at the bucket's length
                rejected[label] = f"{type(err).__name__}: {err}"[:200]
            if log is not None and label in seconds:
                log(f"  {label:<28} {seconds[label] * 1e3:10.2f} ms")
    finally:
        _ACTIVE.reset(token)
    # the fastest; within TIE of it, the earlier in the pool (the static preference): noise decides nothing
    best = next((label for label in impls if label in seconds and seconds[label] <= TIE * min(seconds.values())),
                None)
    winner = None if best is None else impls[best][0]
    entry = dict(env=environment(), tuned_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 winner=None if winner is None else dict(backend=winner.backend, settings=[list(s) for s in winner.settings],
                                                         label=winner.label),
                 seconds=seconds, rejected=rejected)
    # a winner with no name in kobattr.backends (a factory-built variant under test) cannot be rebuilt from the file
    if save and (winner is None or winner.factory is None):
        store(key, entry, path)
    _MEMO[key_text(key)] = None if winner is None else impls[best][1]
    return entry


def tuned(primitive: str, attn: Attention, ff_gemm_dtype=None, ff_shape=None, outputs=frozenset()) -> Optional[Backend]:
    """What dispatch runs for a primitive left to "auto": the tuned winner for this workload (KOBATTR_TUNE), or
    None for the static rule."""
    mode = tune_mode()
    if mode == "0" or _ACTIVE.get() or attn.q.device.type not in ("cpu", "cuda"):
        return None
    if primitive == "ff_maps" and ff_shape is None:
        return None  # no key without the FFN's shape
    key = workload(primitive, attn, ff_gemm_dtype, ff_shape, outputs)
    text = key_text(key)
    if text in _MEMO:
        return _MEMO[text]
    hit, impl = cached_winner(key) if mode == "1" else (False, None)
    if not hit:
        tune(primitive, attn, ff_gemm_dtype, ff_shape, outputs=outputs)  # leaves its winner in _MEMO
        impl = _MEMO[text]
    _MEMO[text] = impl
    return impl


# ----------------------------------------------------------------------------- `kobattr tune`
def add_arguments(parser) -> None:
    from .bench import add_common_arguments
    from .core import FF_GEMM_DTYPES

    add_common_arguments(parser)
    parser.add_argument("--primitives", default="attention_maps,ff_maps,row_stats",
                        help="comma-separated primitives to tune (default: all three)")
    parser.add_argument("--ff-gemm", choices=tuple(FF_GEMM_DTYPES), default="auto",
                        help="the FF products' dtype the ff_maps entry is for (as for analyze)")
    parser.add_argument("--force", action="store_true", help="tune again where the cache already has an entry")


def run(args) -> int:
    from .backends import PRIMITIVES
    from .bench import BenchError, capture_layer, default_device, load_model, model_dtype, parse_list
    from .core import attention_of, ff_shape, resolve_ff_gemm

    device = args.device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False).")
    primitives = parse_list(args.primitives, "primitives")
    unknown = [p for p in primitives if p not in PRIMITIVES]
    if unknown:
        raise BenchError(f"unknown primitive(s) {', '.join(unknown)}; choose among {', '.join(PRIMITIVES)}.")
    lengths = parse_list(args.lengths, "lengths", int)
    dtype = model_dtype(args.dtype, device)
    model = load_model(args.model, device, dtype, max(lengths))
    print(f"tuning cache: {cache_path()} (dispatch reads it with {ENV}=1)")
    for N in lengths:
        layer = capture_layer(model, N)
        attn = attention_of(layer)
        gemm_dtype = resolve_ff_gemm(args.ff_gemm, layer)
        for primitive in primitives:
            key = workload(primitive, attn, gemm_dtype, ff_shape(layer))
            title = f"{primitive} N <= {key['length_bucket']} ({key['dtype']}, {key['device']})"
            if not args.force:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", TuneCacheWarning)
                    hit, impl = cached_winner(key)
                for w in caught:
                    print(f"  {w.message}")
                if hit:
                    print(f"{title}: cached winner {'none (the static rule)' if impl is None else impl.name} "
                          "(--force to tune again)")
                    continue
            print(f"{title}:")
            entry = tune(primitive, attn, gemm_dtype, ff_shape(layer), log=print)
            for label, why in entry["rejected"].items():
                print(f"  {label:<28} rejected: {why}")
            winner = entry["winner"]
            print(f"  winner: {winner['label'] if winner else 'none (the static rule stays)'}")
    return 0

