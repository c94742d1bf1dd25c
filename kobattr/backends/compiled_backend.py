"""The compiled C++ implementations of attention_maps and row_stats: kobattr._cpu (OpenMP) and kobattr._cuda.

Both kernels (csrc/cpu/attention_pairs.cpp, csrc/cuda/attention_pairs.cu) recompute alpha tile by
tile from q and k after a first pass for the softmax log-sum-exp, and reduce each (query tile x key
tile) block to the requested output right away, storing nothing N x N beyond that output; row_stats
(``row_lse``) is that first pass alone. They compute in float32, so they take float32, float16 and
bfloat16 layers (converted first) and refuse float64 ones, which would lose their precision. ff_maps is
not implemented here.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .base import Attention, Backend
from .kernel_args import compiled_attention_maps, compiled_row_lse

_MODULES = {"cpu": "kobattr._cpu", "cuda": "kobattr._cuda"}
_BUILD_HINT = {
    "cpu": "reinstall kobattr with a C++ compiler available",
    "cuda": "it is built only where nvcc is found at install time (KOBATTR_BUILD_CUDA=1 makes that an error)",
}


class CompiledBackend(Backend):
    """One class for both compiled extensions; ``device`` ("cpu" or "cuda") picks the module. ``primitives``
    is per instance: row_stats only where the imported module has ``row_lse`` (a module built before it
    existed still runs attention_maps)."""

    primitives = ("attention_maps", "row_stats")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, device: str):
        self.name = device
        self.devices = (device,)
        try:
            self.module = importlib.import_module(_MODULES[device])
            self._import_error: Optional[str] = None
        except ImportError as error:  # not built, or built for another Python
            self.module, self._import_error = None, str(error)
        if self.module is not None and not hasattr(self.module, "row_lse"):
            self.primitives = ("attention_maps",)

    def unavailable_reason(self) -> Optional[str]:
        if self.module is None:
            return (f"the extension {_MODULES[self.name]} could not be imported ({self._import_error}); "
                    f"{_BUILD_HINT[self.name]} (`kobattr info` shows what the build recorded).")
        if self.name == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is visible to torch (torch.cuda.is_available() is False)."
        return None

    def attention_maps(self, attn: Attention, grams, row_scale, rows=None, weights=None, normalize_rows=False,
                       want_alpha=False):
        return compiled_attention_maps(self.module, attn, grams, row_scale, rows, weights, normalize_rows, want_alpha)

    def row_lse(self, attn: Attention):
        return compiled_row_lse(self.module, attn)
