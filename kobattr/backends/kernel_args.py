"""The argument preparation the compiled attention_maps kernels (kobattr._cpu, kobattr._cuda) share.

Both take raw pointers to float32 contiguous tensors; this module checks the tensors (device,
shapes, row range) with sentence-long errors, converts them and allocates the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .base import Attention


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32).contiguous()


def _address(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


@dataclass
class KernelArgs:
    attn: Attention
    q: Tensor  # (B, H, N, Dh) float32
    k: Tensor  # (B, KV, N, Dh) float32
    valid: Tensor  # (B, N) bool
    grams: Tensor  # (B, N, M, H+1, H+1) float32
    row_scale: Tensor  # (B, N, M) float32
    rows: Optional[Tensor]  # (R,) int64, None = all rows (always None with weights)
    weights: Optional[Tensor]  # (B, K, N) float32
    normalize_rows: bool
    out: Tensor  # (B, M, R or K, N) float32
    alpha: Optional[Tensor]  # (B, H, R, N) float32

    @property
    def n_rows(self) -> int:
        return self.q.shape[2] if self.rows is None else self.rows.numel()

    def pointers(self) -> dict:
        """The keyword arguments both kernels take."""
        B, H, N, Dh = self.q.shape
        return dict(
            q=self.q.data_ptr(), k=self.k.data_ptr(), valid=self.valid.data_ptr(), grams=self.grams.data_ptr(),
            row_scale=self.row_scale.data_ptr(), rows=_address(self.rows), weights=_address(self.weights),
            out=self.out.data_ptr(), alpha=_address(self.alpha), batch=B, heads=H, kv_heads=self.k.shape[1],
            seq_len=N, head_dim=Dh, n_grams=self.grams.shape[2], n_rows=self.n_rows,
            n_weight_rows=0 if self.weights is None else self.weights.shape[1], causal=bool(self.attn.causal),
            window=int(self.attn.window), scale=float(self.attn.scale), normalize_rows=self.normalize_rows,
        )


def prepare_kernel_args(attn: Attention, grams: Tensor, row_scale: Tensor, rows: Optional[Tensor],
                        weights: Optional[Tensor], normalize_rows: bool, want_alpha: bool) -> KernelArgs:
    """Checked float32 inputs and allocated outputs on q's device. As in the torch backend, ``rows``
    is ignored when ``weights`` is given and ``normalize_rows`` only applies to the contraction."""
    device = attn.q.device
    named = {"q": attn.q, "k": attn.k, "valid": attn.valid, "grams": grams, "row_scale": row_scale}
    if weights is not None:
        named["weights"] = weights
        rows = None
    else:
        normalize_rows = False
        if rows is not None:
            named["rows"] = rows
    for name, tensor in named.items():
        if tensor.device != device:
            raise ValueError(f"attention_maps: every tensor must be on {device} like q, but {name} is on {tensor.device}.")
    q, k = _f32(attn.q), _f32(attn.k)
    B, H, N, Dh = q.shape
    M = grams.shape[2]
    grams, row_scale = _f32(grams), _f32(row_scale)
    valid = attn.valid.to(torch.bool).contiguous()
    weights = None if weights is None else _f32(weights)
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= N):
            raise ValueError(f"attention_maps: rows must lie in [0, N={N}), got values from {int(rows.min())} "
                             f"to {int(rows.max())}.")
    if tuple(grams.shape) != (B, N, M, H + 1, H + 1):
        raise ValueError(f"attention_maps: grams must have shape (B, N, M, H+1, H+1) = {(B, N, M, H + 1, H + 1)}, "
                         f"got {tuple(grams.shape)}.")
    expected = {"k": (k, (B, k.shape[1], N, Dh)), "valid": (valid, (B, N)), "row_scale": (row_scale, (B, N, M))}
    if weights is not None:
        expected["weights"] = (weights, (B, weights.shape[1], N))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"attention_maps: {name} must have shape {shape} to match q {tuple(q.shape)} and "
                             f"grams {tuple(grams.shape)}, got {tuple(tensor.shape)}.")
    R = N if rows is None else rows.numel()
    out = torch.empty((B, M, R if weights is None else weights.shape[1], N), dtype=torch.float32, device=device)
    alpha = torch.empty((B, H, R, N), dtype=torch.float32, device=device) if want_alpha else None
    return KernelArgs(attn=attn, q=q, k=k, valid=valid, grams=grams, row_scale=row_scale, rows=rows, weights=weights,
                      normalize_rows=bool(normalize_rows), out=out, alpha=alpha)
