"""Implementation selection, per primitive, in one place.

Each implementation (kobattr/backends/*.py) declares the primitives it implements and what it takes
(``Backend.refusals``). For every primitive a layer needs (attention_maps, ff_maps), ``select`` picks
the first implementation in the preference order that takes the input; when none does, the error lists
every implementation's reasons. ``backend=`` is "auto", an implementation name or instance (used for
every primitive it implements; the others are chosen automatically) or a dict {primitive: name or instance}.
For a primitive left to "auto", the on-device tuner (kobattr/tuner.py, ``KOBATTR_TUNE``) is asked first;
without a cached winner the static rule ``auto_order`` decides.
"""

from __future__ import annotations

import importlib
from typing import Optional, Union

from .base import Attention, Backend, BackendUnavailable

# triton_streamed and triton_staged: alternative attention pair kernels that only the tuner chooses (AUTO_ORDER
# leaves them out)
BACKEND_NAMES = ("torch", "triton", "cpu", "cuda", "triton_gemm", "triton_streamed", "triton_staged")
PRIMITIVES = ("attention_maps", "ff_maps", "row_stats")
_FACTORIES = {
    "torch": ("kobattr.backends.torch_backend", "TorchBackend", {}),
    "triton": ("kobattr.backends.triton_backend", "TritonBackend", {}),
    "cpu": ("kobattr.backends.compiled_backend", "CompiledBackend", {"device": "cpu"}),
    "cuda": ("kobattr.backends.compiled_backend", "CompiledBackend", {"device": "cuda"}),
    "triton_gemm": ("kobattr.backends.triton_backend", "TritonGemmBackend", {}),
    "triton_streamed": ("kobattr.backends.triton_backend", "TritonStreamedBackend", {}),
    "triton_staged": ("kobattr.backends.triton_backend", "TritonStagedBackend", {}),
}
# preference order of backend="auto" by tensor device
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
# where a primitive departs from it: on CUDA ff_maps goes to triton_gemm first (its FF pairs are the rows of cuBLAS
# GEMMs, in the model's 16-bit dtype by default; the fused triton kernel takes float32 products only), then torch:
# on an H200 (benchmarks/results/gpu_h200_2026-11-26/gpu_bench.txt) the torch ff_maps took half the time of the
# triton one at every N measured (Llama-7B, N = 128 to 1024)
PRIMITIVE_ORDER = {("ff_maps", "cuda"): ("triton_gemm", "torch", "triton")}


def auto_order(primitive: str, device: str) -> tuple[str, ...]:
    """The static rule: names to try in order for ``primitive`` on tensors of ``device``."""
    return PRIMITIVE_ORDER.get((primitive, device), AUTO_ORDER.get(device, ("torch",)))


def implementation(name: str, budget: Optional[int] = None) -> Union[Backend, str]:
    """The implementation ``name``, or a sentence saying why it cannot even be imported; ``budget`` (elements per
    intermediate, attribute(budget=...); None: each implementation's own sizing) goes to every implementation."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {', '.join(BACKEND_NAMES)}.")
    module, cls, kwargs = _FACTORIES[name]
    try:
        impl = getattr(importlib.import_module(module), cls)(**kwargs)
    except ImportError as err:
        return f"the {name} backend could not be imported ({err})."
    impl.budget = budget
    return impl


def availability() -> dict[str, Optional[str]]:
    """name -> None if the implementation can run on this machine, else the reason it cannot."""
    out = {}
    for name in BACKEND_NAMES:
        impl = implementation(name)
        out[name] = impl if isinstance(impl, str) else impl.unavailable_reason()
    return out


def _preferences(backend, primitive: str, device: str) -> tuple[tuple, bool]:
    """(names or instances to try in order, whether the user named them explicitly) for one primitive."""
    if isinstance(backend, dict):
        unknown = set(backend) - set(PRIMITIVES)
        if unknown:
            raise ValueError(f"backend keys must be primitives ({', '.join(PRIMITIVES)}), got {sorted(unknown)}.")
        backend = backend.get(primitive, "auto")
    if isinstance(backend, Backend):  # an implementation object (the tuner's candidates with their settings)
        return ((backend,), True) if primitive in backend.primitives else (auto_order(primitive, device), False)
    if not isinstance(backend, str):
        raise ValueError(f"backend must be 'auto', a name ({', '.join(BACKEND_NAMES)}) or a dict per primitive, "
                         f"got {backend!r}.")
    if backend == "auto":
        return auto_order(primitive, device), False
    impl = implementation(backend)
    if isinstance(impl, Backend) and primitive not in impl.primitives:
        return auto_order(primitive, device), False  # a name applies to the primitives it implements
    return (backend,), True


def select(backend, primitive: str, attn: Attention, ff_gemm_dtype=None, ff_shape=None,
           outputs: frozenset = frozenset(), budget: Optional[int] = None) -> Backend:
    """The implementation that runs ``primitive`` on this input (ff_maps with FFParts.gemm_dtype = ff_gemm_dtype),
    built with ``budget``, or BackendUnavailable with every reason. ``ff_shape``: (d_model, d_ff, gated) of the
    layer; ``outputs``: the output modes asked for beyond the full map ("rows", "contract", "alpha"); both part of
    the tuner's key. An explicit ``budget`` is the user's sizing: the tuner (whose candidates carry their own) is
    then not asked."""
    names, explicit = _preferences(backend, primitive, attn.q.device.type)
    if not explicit and budget is None:
        from ..tuner import tuned  # the on-device tuner's cached (or, with KOBATTR_TUNE=1, measured) winner

        winner = tuned(primitive, attn, ff_gemm_dtype, ff_shape, outputs)
        if winner is not None and not winner.refusals(primitive, attn, ff_gemm_dtype, outputs):
            return winner
    reasons = []
    for name in names:
        impl = name if isinstance(name, Backend) else implementation(name, budget)
        refused = [impl] if isinstance(impl, str) else impl.refusals(primitive, attn, ff_gemm_dtype, outputs)
        if not refused:
            return impl
        reasons.append(f"{getattr(name, 'name', name)}: {' '.join(refused)}")
    first = getattr(names[0], "name", names[0])
    what = f"backend {first!r} cannot run" if explicit else "no implementation can run"
    raise BackendUnavailable(f"{what} {primitive} on this input; " + "; ".join(reasons))


def get_backend(name, attn: Attention, need_ff: bool, need_row_stats: bool = False,
                ff_gemm_dtype=None, ff_shape=None, outputs: frozenset = frozenset(),
                budget: Optional[int] = None) -> dict[str, Backend]:
    """{primitive: implementation} for the primitives a layer needs (ff_maps only if need_ff, with FFParts.gemm_dtype
    = ff_gemm_dtype; row_stats only if need_row_stats), each built with ``budget``; ``ff_shape`` and ``outputs`` as
    for ``select`` (row_stats has one output)."""
    wanted = ("attention_maps",) + (("ff_maps",) if need_ff else ()) + (("row_stats",) if need_row_stats else ())
    return {p: select(name, p, attn, ff_gemm_dtype, ff_shape, outputs if p != "row_stats" else frozenset(), budget)
            for p in wanted}
