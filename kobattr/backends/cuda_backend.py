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
from .kernel_args import prepare_kernel_args
from .torch_backend import TorchBackend

try:
    from kobattr import _cuda
    _IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # not built (no nvcc at install time), or built for another Python
    _cuda = None
    _IMPORT_ERROR = str(error)


def attention_maps_cuda(attn: Attention, grams: Tensor, row_scale: Tensor, rows: Optional[Tensor] = None,
                        weights: Optional[Tensor] = None, normalize_rows: bool = False,
                        want_alpha: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """The attention_maps primitive of base.py in float32 through kobattr._cuda (tensors on one GPU)."""
    args = prepare_kernel_args(attn, grams, row_scale, rows, weights, normalize_rows, want_alpha)
    if not args.n_rows:
        return args.out, args.alpha
    device = attn.q.device
    B, H = args.q.shape[:2]
    lse = torch.empty((B, H, args.n_rows), dtype=torch.float32, device=device)
    row_sums = (torch.empty((B, args.grams.shape[2], args.n_rows), dtype=torch.float32, device=device)
                if args.normalize_rows else None)
    with torch.cuda.device(device):
        _cuda.attention_maps(**args.pointers(), lse=lse.data_ptr(), row_sums=0 if row_sums is None else row_sums.data_ptr(),
                             stream=torch.cuda.current_stream(device).cuda_stream)
    return args.out, args.alpha


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
