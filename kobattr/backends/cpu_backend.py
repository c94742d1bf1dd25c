"""The C++ CPU backend: attention_maps through the fused OpenMP kernel of kobattr._cpu.

The kernel (csrc/cpu/attention_pairs.cpp) recomputes alpha tile by tile from q and k after a first
pass for the softmax log-sum-exp, and reduces each (query tile x key tile) block to the requested
output right away, so it stores nothing N x N beyond that output. It computes in float32:
float16/bfloat16 q and k are converted first, and float64 inputs go through the torch implementation
so that they keep their precision. ff_maps is the torch backend's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Attention
from .kernel_args import prepare_kernel_args
from .torch_backend import TorchBackend

try:
    from kobattr import _cpu
    _IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # not built, or built for another Python
    _cpu = None
    _IMPORT_ERROR = str(error)


def attention_maps_cpu(attn: Attention, grams: Tensor, row_scale: Tensor, rows: Optional[Tensor] = None,
                       weights: Optional[Tensor] = None, normalize_rows: bool = False,
                       want_alpha: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """The attention_maps primitive of base.py in float32 through kobattr._cpu (CPU tensors only)."""
    if attn.q.device.type != "cpu":
        raise ValueError(f"attention_maps: the cpu kernel needs CPU tensors, but q is on {attn.q.device}.")
    args = prepare_kernel_args(attn, grams, row_scale, rows, weights, normalize_rows, want_alpha)
    if args.n_rows:
        _cpu.attention_maps(**args.pointers(), num_threads=torch.get_num_threads())
    return args.out, args.alpha


class CPUBackend(TorchBackend):
    name = "cpu"

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        if _cpu is None:
            return (f"the C++ extension kobattr._cpu could not be imported ({_IMPORT_ERROR}); reinstall kobattr "
                    "with a C++ compiler available (`kobattr info` shows what the build recorded).")
        return None

    def cannot_run(self, attn: Attention, need_ff: bool) -> Optional[str]:
        tensors = {"q": attn.q, "k": attn.k, "valid": attn.valid}
        for name, tensor in tensors.items():
            if tensor.device.type != "cpu":
                return f"the cpu backend needs CPU tensors, but {name} is on {tensor.device}."
        return super().cannot_run(attn, need_ff)

    def attention_maps(self, attn, grams, row_scale, rows=None, weights=None, normalize_rows=False, want_alpha=False):
        if attn.q.dtype == torch.float64:
            return super().attention_maps(attn, grams, row_scale, rows, weights, normalize_rows, want_alpha)
        return attention_maps_cpu(attn, grams, row_scale, rows, weights, normalize_rows, want_alpha)
