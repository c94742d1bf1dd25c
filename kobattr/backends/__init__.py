"""Backend selection, in one place.

Each backend declares whether it can run on this machine (``unavailable_reason``) and whether it
takes a given input (``cannot_run``); ``backend="auto"`` picks the first that can, and an explicit
name that cannot run raises BackendUnavailable with the backend's own reason.
"""

from __future__ import annotations

import importlib
from typing import Optional

from .base import Attention, Backend, BackendUnavailable

BACKEND_NAMES = ("torch", "triton", "cpu", "cuda")
_MODULES = {
    "torch": ("kobattr.backends.torch_backend", "TorchBackend"),
    "triton": ("kobattr.backends.triton_backend", "TritonBackend"),
    "cpu": ("kobattr.backends.cpu_backend", "CPUBackend"),
    "cuda": ("kobattr.backends.cuda_backend", "CUDABackend"),
}
# preference order of backend="auto" by tensor device
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


def backend_class(name: str):
    """The backend class, or a string saying why it cannot even be imported."""
    module, cls = _MODULES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as err:
        return f"the {name} backend could not be imported ({err})."


def availability() -> dict[str, Optional[str]]:
    """name -> None if the backend can run on this machine, else the reason it cannot."""
    out = {}
    for name in BACKEND_NAMES:
        cls = backend_class(name)
        out[name] = cls if isinstance(cls, str) else cls.unavailable_reason()
    return out


def get_backend(name: str, attn: Attention, need_ff: bool) -> Backend:
    """The backend ``name`` ("auto" or one of BACKEND_NAMES) for this input."""
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER.get(attn.q.device.type, ("torch",)):
            try:
                return get_backend(candidate, attn, need_ff)
            except BackendUnavailable as err:
                reasons.append(str(err))
        raise BackendUnavailable("no backend can run this input: " + " ".join(reasons))
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {', '.join(BACKEND_NAMES)}.")
    cls = backend_class(name)
    if isinstance(cls, str):
        raise BackendUnavailable(cls)
    reason = cls.unavailable_reason()
    if reason is None:
        backend = cls()
        reason = backend.cannot_run(attn, need_ff)
        if reason is None:
            return backend
    raise BackendUnavailable(f"backend {name!r} cannot run: {reason}")
