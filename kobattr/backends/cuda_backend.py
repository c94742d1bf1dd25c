"""The CUDA C++ backend: attention_maps through the kernels of kobattr._cuda.

The kernels (csrc/cuda/attention_pairs.cu) take raw device pointers and run on the current torch
stream: a first kernel computes the softmax log-sum-exp of every (b, h, query row), a second one
recomputes alpha per 16 x 16 tile of pairs and reduces kappa^T G_j kappa to the requested output.
They compute in float32 (float16/bfloat16 q and k are converted first; float64 inputs go through the
torch implementation). ff_maps is the torch backend's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Attention
from .torch_backend import TorchBackend

try:
    from kobattr import _cuda
    _IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # not built (no nvcc at install time), or built for another Python
    _cuda = None
    _IMPORT_ERROR = str(error)


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def attention_maps_cuda(attn: Attention, grams: Tensor, row_scale: Tensor, rows: Optional[Tensor] = None,
                        weights: Optional[Tensor] = None, normalize_rows: bool = False,
                        want_alpha: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """The attention_maps primitive of base.py in float32 through kobattr._cuda (tensors on one GPU).

    As in the torch backend, ``rows`` is ignored when ``weights`` is given and ``normalize_rows`` only
    applies to the contraction.
    """
    device = attn.q.device
    named = {"q": attn.q, "k": attn.k, "valid": attn.valid, "grams": grams, "row_scale": row_scale}
    if weights is not None:
        named["weights"] = weights
    elif rows is not None:
        named["rows"] = rows
    for name, tensor in named.items():
        if tensor.device != device:
            raise ValueError(f"attention_maps: every tensor must be on {device} like q, but {name} is on {tensor.device}.")
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
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= N):
            raise ValueError(f"attention_maps: rows must lie in [0, N={N}), got values from {int(rows.min())} "
                             f"to {int(rows.max())}.")
    R = N if rows is None else rows.numel()
    K = 0 if weights is None else weights.shape[1]
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
    out = torch.empty((B, M, K if weights is not None else R, N), dtype=torch.float32, device=device)
    alpha = torch.empty((B, H, R, N), dtype=torch.float32, device=device) if want_alpha else None
    if R == 0:
        return out, alpha
    lse = torch.empty((B, H, R), dtype=torch.float32, device=device)
    row_sums = torch.empty((B, M, R), dtype=torch.float32, device=device) if normalize_rows else None
    address = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    with torch.cuda.device(device):
        _cuda.attention_maps(
            q=q.data_ptr(), k=k.data_ptr(), valid=valid.data_ptr(), grams=grams.data_ptr(),
            row_scale=row_scale.data_ptr(), rows=address(rows), weights=address(weights), out=out.data_ptr(),
            alpha=address(alpha), lse=lse.data_ptr(), row_sums=address(row_sums), batch=B, heads=H,
            kv_heads=k.shape[1], seq_len=N, head_dim=Dh, n_grams=M, n_rows=R, n_weight_rows=K,
            causal=bool(attn.causal), window=int(attn.window), scale=float(attn.scale),
            normalize_rows=bool(normalize_rows), stream=torch.cuda.current_stream(device).cuda_stream,
        )
    return out, alpha


class CUDABackend(TorchBackend):
    name = "cuda"

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        if _cuda is None:
            return (f"the CUDA extension kobattr._cuda could not be imported ({_IMPORT_ERROR}); it is built only "
                    "where nvcc is found at install time (KOBATTR_BUILD_CUDA=1 makes that an error; `kobattr info` "
                    "shows what the build recorded).")
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch (torch.cuda.is_available() is False)."
        return None

    def cannot_run(self, attn: Attention, need_ff: bool) -> Optional[str]:
        for name, tensor in {"q": attn.q, "k": attn.k, "valid": attn.valid}.items():
            if tensor.device.type != "cuda":
                return f"the cuda backend needs CUDA tensors, but {name} is on {tensor.device}."
        return super().cannot_run(attn, need_ff)

    def attention_maps(self, attn, grams, row_scale, rows=None, weights=None, normalize_rows=False, want_alpha=False):
        if attn.q.dtype == torch.float64:
            return super().attention_maps(attn, grams, row_scale, rows, weights, normalize_rows, want_alpha)
        return attention_maps_cuda(attn, grams, row_scale, rows, weights, normalize_rows, want_alpha)
