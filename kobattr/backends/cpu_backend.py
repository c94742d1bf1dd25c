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
from .torch_backend import TorchBackend

try:
    from kobattr import _cpu
    _IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # not built, or built for another Python
    _cpu = None
    _IMPORT_ERROR = str(error)


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def attention_maps_cpu(attn: Attention, grams: Tensor, row_scale: Tensor, rows: Optional[Tensor] = None,
                       weights: Optional[Tensor] = None, normalize_rows: bool = False,
                       want_alpha: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """The attention_maps primitive of base.py in float32 through kobattr._cpu (CPU tensors only).

    As in the torch backend, ``rows`` is ignored when ``weights`` is given (the contraction runs over
    every row) and ``normalize_rows`` only applies to the contraction.
    """
    named = {"q": attn.q, "k": attn.k, "valid": attn.valid, "grams": grams, "row_scale": row_scale,
             "rows": rows, "weights": weights}
    for name, tensor in named.items():
        if tensor is not None and tensor.device.type != "cpu":
            raise ValueError(f"attention_maps: the cpu kernel needs CPU tensors, but {name} is on {tensor.device}.")
    q, k = _f32(attn.q), _f32(attn.k)
    B, H, N, Dh = q.shape
    M = grams.shape[2]
    grams, row_scale = _f32(grams), _f32(row_scale)
    valid = attn.valid.to(torch.bool).contiguous()
    if weights is not None:
        rows = None
        weights = _f32(weights)
    else:
        normalize_rows = False
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    R = N if rows is None else rows.numel()
    K = 0 if weights is None else weights.shape[1]
    out = torch.empty((B, M, K if weights is not None else R, N), dtype=torch.float32)
    alpha = torch.empty((B, H, R, N), dtype=torch.float32) if want_alpha else None
    if R == 0:
        return out, alpha
    if tuple(grams.shape) != (B, N, M, H + 1, H + 1):
        raise ValueError(f"attention_maps: grams must have shape (B, N, M, H+1, H+1) = {(B, N, M, H + 1, H + 1)}, "
                         f"got {tuple(grams.shape)}.")
    expected = {"k": (k, (B, k.shape[1], N, Dh)), "valid": (valid, (B, N)), "row_scale": (row_scale, (B, N, M))}
    if weights is not None:
        expected["weights"] = (weights, (B, K, N))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"attention_maps: {name} must have shape {shape} to match q {tuple(q.shape)} and "
                             f"grams {tuple(grams.shape)}, got {tuple(tensor.shape)}.")
    address = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    _cpu.attention_maps(
        q=q.data_ptr(), k=k.data_ptr(), valid=valid.data_ptr(), grams=grams.data_ptr(),
        row_scale=row_scale.data_ptr(), rows=address(rows), weights=address(weights), out=out.data_ptr(),
        alpha=address(alpha), batch=B, heads=H, kv_heads=k.shape[1], seq_len=N, head_dim=Dh, n_grams=M,
        n_rows=R, n_weight_rows=K, causal=bool(attn.causal), window=int(attn.window), scale=float(attn.scale),
        normalize_rows=bool(normalize_rows), num_threads=torch.get_num_threads(),
    )
    return out, alpha


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
