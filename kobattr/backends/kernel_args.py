"""The Python side of the compiled kernels (kobattr._cpu, kobattr._cuda): one function per primitive.

compiled_attention_maps and compiled_row_lse convert the inputs to what the kernels read (float32, bool
and int64, all contiguous), allocate the outputs and call the extension with tensors. The extension
checks every tensor (dtype, device, contiguity, shape, row range; csrc/tensor_args.h) and raises
ValueError with a sentence saying what is wrong, so nothing is checked twice here.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from .base import Attention


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _size(t: Tensor, axis: int) -> int:
    return t.shape[axis] if t.dim() > axis else 0


def _device_args(module: ModuleType, q: Tensor) -> dict:
    """The launch argument of the module's device: the current stream of q's GPU, or the CPU thread count."""
    if module.device_type == "cuda":  # a q off the GPU is rejected by the extension before any launch
        return dict(stream=torch.cuda.current_stream(q.device).cuda_stream if q.is_cuda else 0)
    return dict(num_threads=torch.get_num_threads())


def _row_statistics(module: ModuleType, attn: Attention, rows: Optional[Tensor]) -> dict:
    """The CPU kernel's row statistics: the ones the caller already has (the kernel then skips its first
    pass), or, for all rows, an output that keeps them in attn.row_lse for the caller. The CUDA kernel
    computes and keeps its own."""
    if module.device_type != "cpu":
        return {}
    if attn.row_lse is not None:
        return dict(row_lse=_f32(attn.row_lse))
    if rows is None:
        B, H, N = attn.q.shape[:3]
        return dict(row_lse_out=torch.empty(B, H, N, dtype=torch.float32, device=attn.q.device))
    return {}


def compiled_attention_maps(module: ModuleType, attn: Attention, grams: Tensor, row_scale: Tensor,
                            rows: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                            normalize_rows: bool = False, want_alpha: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """The attention_maps primitive of base.py in float32 through ``module`` (kobattr._cpu or kobattr._cuda),
    on the device of q, which must be the module's device type and hold every other tensor.

    Returns (out, alpha): out (B, M, R, N), or (B, M, K, N) with weights, where the contraction runs over
    the selected rows; alpha (B, H, R, N) or None. ``normalize_rows`` only applies to the contraction.
    """
    q = _f32(attn.q)
    B, H, N = _size(q, 0), _size(q, 1), _size(q, 2)
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    R = N if rows is None else rows.numel()
    # a tensor of the wrong rank gets sizes 0 here and the extension's error message
    out_shape = (B, _size(grams, 2), R if weights is None else _size(weights, 1), N)
    out = torch.empty(out_shape, dtype=torch.float32, device=q.device)
    alpha = torch.empty((B, H, R, N), dtype=torch.float32, device=q.device) if want_alpha else None
    statistics = _row_statistics(module, attn, rows)
    module.attention_maps(
        q=q, k=_f32(attn.k), valid=attn.valid.to(torch.bool).contiguous(), grams=_f32(grams),
        row_scale=_f32(row_scale), rows=rows, weights=None if weights is None else _f32(weights), out=out, alpha=alpha,
        causal=bool(attn.causal), window=int(attn.window), radius=int(attn.radius), scale=float(attn.scale),
        softcap=float(attn.softcap), normalize_rows=bool(normalize_rows) and weights is not None,
        **_device_args(module, q), **statistics)
    if "row_lse_out" in statistics:
        attn.row_lse = statistics["row_lse_out"]
    return out, alpha


def compiled_row_lse(module: ModuleType, attn: Attention) -> Tensor:
    """The row_stats primitive of base.py in float32 through ``module`` (kobattr._cpu or kobattr._cuda), on the
    device of q: (B, H, N) float32, lse[b, h, i] = log sum_j exp(cap(scale q^h_i . k_j)) over the keys visible
    from i (natural log), +inf on rows that see no key (padding rows)."""
    q = _f32(attn.q)
    # a q of the wrong rank gets sizes 0 here and the extension's error message
    lse = torch.empty((_size(q, 0), _size(q, 1), _size(q, 2)), dtype=torch.float32, device=q.device)
    module.row_lse(q=q, k=_f32(attn.k), valid=attn.valid.to(torch.bool).contiguous(), lse=lse,
                   causal=bool(attn.causal), window=int(attn.window), radius=int(attn.radius),
                   scale=float(attn.scale), softcap=float(attn.softcap), **_device_args(module, q))
    return lse
