"""Implementation selection, per primitive, in one place.

Each implementation (kobattr/backends/*.py) declares the primitives it implements and what it takes
(``Backend.refusals``). For every primitive a layer needs (attention_maps, ff_maps), ``select`` picks
the first implementation in the preference order that takes the input; when none does, the error lists
every implementation's reasons. ``backend=`` is "auto", an implementation name (used for every
primitive it implements; the others are chosen automatically) or a dict {primitive: name}.
"""

from __future__ import annotations

import importlib
from typing import Optional, Union

from .base import Attention, Backend, BackendUnavailable

BACKEND_NAMES = ("torch", "triton", "cpu", "cuda", "triton_gemm")
PRIMITIVES = ("attention_maps", "ff_maps", "row_stats")
_FACTORIES = {
    "torch": ("kobattr.backends.torch_backend", "TorchBackend", {}),
    "triton": ("kobattr.backends.triton_backend", "TritonBackend", {}),
    "cpu": ("kobattr.backends.compiled_backend", "CompiledBackend", {"device": "cpu"}),
    "cuda": ("kobattr.backends.compiled_backend", "CompiledBackend", {"device": "cuda"}),
    "triton_gemm": ("kobattr.backends.triton_backend", "TritonGemmBackend", {}),
}
# preference order of backend="auto" by tensor device; on CUDA ff_maps goes to triton_gemm first (its FF pairs are
# the rows of cuBLAS GEMMs, in the model's 16-bit dtype by default; the fused triton kernel takes float32 products
# only)
AUTO_ORDER = {"cuda": ("triton_gemm", "triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


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


def _preferences(backend, primitive: str, device: str) -> tuple[tuple[str, ...], bool]:
    """(names to try in order, whether the user named them explicitly) for one primitive."""
    if isinstance(backend, dict):
        unknown = set(backend) - set(PRIMITIVES)
        if unknown:
            raise ValueError(f"backend keys must be primitives ({', '.join(PRIMITIVES)}), got {sorted(unknown)}.")
        backend = backend.get(primitive, "auto")
    if not isinstance(backend, str):
        raise ValueError(f"backend must be 'auto', a name ({', '.join(BACKEND_NAMES)}) or a dict per primitive, "
                         f"got {backend!r}.")
    if backend == "auto":
        return AUTO_ORDER.get(device, ("torch",)), False
    impl = implementation(backend)
    if isinstance(impl, Backend) and primitive not in impl.primitives:
        return AUTO_ORDER.get(device, ("torch",)), False  # a name applies to the primitives it implements
    return (backend,), True


def select(backend, primitive: str, attn: Attention, ff_gemm_dtype=None, budget: Optional[int] = None) -> Backend:
    """The implementation that runs ``primitive`` on this input (ff_maps with FFParts.gemm_dtype = ff_gemm_dtype),
    built with ``budget``, or BackendUnavailable with every reason."""
    names, explicit = _preferences(backend, primitive, attn.q.device.type)
    reasons = []
    for name in names:
        impl = implementation(name, budget)
        refused = [impl] if isinstance(impl, str) else impl.refusals(primitive, attn, ff_gemm_dtype)
        if not refused:
            return impl
        reasons.append(f"{name}: {' '.join(refused)}")
    what = f"backend {names[0]!r} cannot run" if explicit else "no implementation can run"
    raise BackendUnavailable(f"{what} {primitive} on this input; " + "; ".join(reasons))


def get_backend(name, attn: Attention, need_ff: bool, need_row_stats: bool = False,
                ff_gemm_dtype=None, budget: Optional[int] = None) -> dict[str, Backend]:
    """{primitive: implementation} for the primitives a layer needs (ff_maps only if need_ff, with FFParts.gemm_dtype
    = ff_gemm_dtype; row_stats only if need_row_stats), each built with ``budget``."""
    wanted = ("attention_maps",) + (("ff_maps",) if need_ff else ()) + (("row_stats",) if need_row_stats else ())
    return {p: select(name, p, attn, ff_gemm_dtype, budget) for p in wanted}
