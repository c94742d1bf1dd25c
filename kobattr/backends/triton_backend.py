"""The Triton backends. triton: the two pair primitives of base.py as fused GPU kernels (kobattr/kernels/),
and row_stats through the kernel their first pass runs (kernels/rows.py ``row_lse``). triton_gemm: ff_maps
as the torch backend's work list of visible tiles, each tile's per-pair hidden rows written in the GEMM
dtype by a Triton prologue (kernels/ff_pairs.py ``ff_prologue``), then one cuBLAS GEMM with W_out and a
Triton epilogue (``ff_epilogue``: the residual part and the scopes' norms).

Nothing N x N x d (nor N x N x H) is materialised: alpha is recomputed tile by tile from q and k,
see kernels/attention_pairs.py and kernels/ff_pairs.py for the kernel designs. Triton is imported
lazily so that this module imports (and says why it cannot run) on machines without it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import torch
from torch import Tensor

from .base import Attention, Backend, BackendUnavailable, FFParts
from .torch_backend import TorchBackend

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEADS = 64
MAX_HEAD_SIZE = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _parts(t: Optional[Tensor]) -> Optional[Tensor]:
    """A per-key/per-row input as the kernels read it: contiguous, fp32 unless already a model dtype."""
    if t is None:
        return None
    return (t if t.dtype in MODEL_DTYPES else t.float()).contiguous()


class _TritonMachine:
    """What both Triton implementations take: CUDA tensors (CPU ones under the interpreter), float32 or 16-bit
    layers (the kernels compute in float32; a float64 layer would lose its precision), up to MAX_HEADS heads."""

    dtypes = MODEL_DTYPES
    max_heads = MAX_HEADS
    max_head_size = MAX_HEAD_SIZE

    @property
    def devices(self) -> tuple:
        return ("cuda", "cpu") if _interpreting() else ("cuda",)

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "the triton backend needs the triton package, which is not installed."
        if not _interpreting() and not torch.cuda.is_available():
            return "the triton backend needs a CUDA device (or TRITON_INTERPRET=1 to run its kernels on the CPU)."
        return None


class TritonBackend(_TritonMachine, Backend):
    name = "triton"
    primitives = ("attention_maps", "ff_maps", "row_stats")
    # keys per ff_maps launch (None: kernels/ff_pairs.py choose_key_block, a few hundred MB of parts, or budget=
    # elements of float32); tests set it small so that several blocks run
    key_block_size: Optional[int] = None

    def _check(self, primitive: str, attn: Attention, ff_gemm_dtype=None) -> None:
        reasons = self.refusals(primitive, attn, ff_gemm_dtype)
        if reasons:
            raise BackendUnavailable(" ".join(reasons))

    @staticmethod
    def _common(attn: Attention, rows: Optional[Tensor], weights: Optional[Tensor]):
        dev = attn.q.device
        return dict(
            q=attn.q.contiguous(), k=attn.k.contiguous(), valid=attn.valid.to(dev).contiguous(),
            causal=bool(attn.causal), window=int(attn.window), scale=float(attn.scale), radius=int(attn.radius),
            softcap=float(attn.softcap),
            rows=None if rows is None else rows.to(device=dev, dtype=torch.int64).contiguous(),
            weights=None if weights is None else weights.to(device=dev, dtype=torch.float32).contiguous(),
        )

    @staticmethod
    def _given_lse2(attn: Attention, rows: Optional[Tensor]) -> Optional[Tensor]:
        """The row statistics the caller already has (Attention.row_lse, natural log), as the kernels read them:
        base 2, the selected rows, 0 where no key is seen."""
        if attn.row_lse is None:
            return None
        lse = attn.row_lse if rows is None else attn.row_lse[:, :, rows.to(attn.row_lse.device)]
        lse2 = lse.float() / math.log(2.0)
        return torch.where(torch.isfinite(lse2), lse2, 0.0).contiguous()

    def row_lse(self, attn: Attention) -> Tensor:
        """(B, H, N) float32 natural-log row log-sum-exp; 0 on rows that see no key (padding rows)."""
        self._check("row_stats", attn)
        from kobattr.kernels.rows import dot_settings, row_lse

        common = self._common(attn, None, None)
        # the kernel's lse2 = log2 sum_j exp2(log2(e) cap(scale q.k)) = lse / ln 2 (0 where no key is seen)
        lse2 = row_lse(common["q"], common["k"], common["valid"].to(torch.int8), common["causal"], common["window"],
                       common["scale"], None, dot_settings(attn.q.dtype), radius=common["radius"],
                       softcap=common["softcap"])
        return lse2 * math.log(2.0)

    def attention_maps(self, attn: Attention, grams: Tensor, row_scale: Tensor, rows: Optional[Tensor] = None,
                       weights: Optional[Tensor] = None, normalize_rows: bool = False,
                       want_alpha: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        self._check("attention_maps", attn)
        from kobattr.kernels.attention_pairs import attention_maps

        if attn.row_lse is None and rows is None:  # every row's statistics, once, kept for the caller too
            attn.row_lse = self.row_lse(attn)

        return attention_maps(grams=grams.float().contiguous(), row_scale=row_scale.float().contiguous(),
                              normalize_rows=normalize_rows, want_alpha=want_alpha, lse2=self._given_lse2(attn, rows),
                              **self._common(attn, rows, weights))

    def ff_maps(self, attn: Attention, parts: FFParts, rows: Optional[Tensor] = None,
                weights: Optional[Tensor] = None, normalize_rows: bool = False) -> Tensor:
        self._check("ff_maps", attn, parts.gemm_dtype)
        from kobattr.kernels.ff_pairs import ff_maps

        def key_block(keys: slice) -> tuple:  # the parts of one block of keys, made (or sliced) when launched
            return tuple(_parts(t) for t in parts.block(keys))

        # the kernel runs once per block of keys: no (B, N, H+1, F) is held unless the parts were stored
        return ff_maps(
            ff_parts=None, gate_parts=None, res_parts=None, key_block=key_block, key_block_size=self.key_block_size,
            key_block_bytes=None if self.budget is None else 4 * self.budget,
            in_scale=parts.in_scale.float().contiguous(), res_scale=parts.res_scale.float().contiguous(),
            out_scale=parts.out_scale.float().contiguous(), coef_in=_parts(parts.coef_in),
            coef_gate=_parts(parts.coef_gate), w_out=_parts(parts.w_out),
            out_weight=None if parts.out_weight is None else parts.out_weight.float().contiguous(),
            out_center=bool(parts.out_center), n_scopes=int(parts.n_scopes), normalize_rows=normalize_rows,
            lse2=self._given_lse2(attn, rows), **self._common(attn, rows, weights),
        )


class TritonGemmBackend(_TritonMachine, TorchBackend):
    """ff_maps of the torch backend (work list, one GEMM per tile) with the per-pair hidden rows and kappa from
    the Triton prologue (no float32 (B, C, R, F) product before the GEMM dtype's copy) and the scopes' norms
    from the Triton epilogue (the residual part and the D-wide vectors stay in registers).

    Per visible pair, beyond the GEMM's 2 F D flops and its own traffic (F inputs in the GEMM dtype, D float32
    outputs): the prologue writes F values in the GEMM dtype and reads (H+1) F float32 parts per key for its 16
    rows, the epilogue reads the D float32 outputs again and (H+1) D residual parts per key for its 16 rows.
    Llama-7B in bfloat16 (F = 11008, D = 4096, H = 32, gated): about 38 KB of DRAM traffic a pair (22 KB written,
    16 KB read back) and about 215 KB of parts read, mostly from L2 (shared by 16 rows), next to the GEMM's
    90 MFLOP, so the GEMM should set the pace (an estimate from the code, not yet measured on a GPU:
    benchmarks/gpu_bench.py, vs_gemm)."""

    name = "triton_gemm"
    primitives = ("ff_maps",)

    def ff_prologue(self, attn, p, rows, cols, lse, vis, ff_p, gate_p, gemm_dtype):
        from kobattr.kernels.ff_pairs import ff_prologue

        lse2 = lse.float() / math.log(2.0)
        kappa, hidden = ff_prologue(
            attn.q.contiguous(), attn.k.contiguous(), attn.valid.to(torch.int8).contiguous(), bool(attn.causal),
            int(attn.window), float(attn.scale), rows.to(torch.int64).contiguous(),
            torch.where(torch.isfinite(lse2), lse2, 0.0).contiguous(), _parts(ff_p), _parts(gate_p),
            _parts(p["in_scale"]), _parts(p["coef_in"]), _parts(p["coef_gate"]), int(cols[0]), gemm_dtype,
            radius=int(attn.radius), softcap=float(attn.softcap))
        return kappa, hidden

    def ff_epilogue(self, p, parts, rows, kappa, res_p, ff, idx):
        from kobattr.kernels.ff_pairs import ff_epilogue

        B, C, R = kappa.shape[:3]
        slot = torch.arange(B * C * R, device=ff.device, dtype=torch.int32)
        if idx is not None:
            slot = torch.full_like(slot, -1).index_copy_(0, idx, torch.arange(len(idx), device=ff.device,
                                                                              dtype=torch.int32))
        return ff_epilogue(ff.float().contiguous(), slot.view(B, C, R), kappa.contiguous(), _parts(res_p.float()),
                           rows.to(torch.int64).contiguous(), _parts(p["res_scale"]), _parts(p["out_scale"]),
                           _parts(p["out_weight"]), parts.out_center, parts.n_scopes)


class _TritonPairVariant(TritonBackend):
    """An alternative attention pair kernel (kernels/attention_pairs_*.py): attention_maps only, full maps or
    rows=, every attention feature; no contraction and no alpha output. Dispatch's static rule never picks it
    (kobattr.backends.AUTO_ORDER); the on-device tuner times it beside the production kernel, behind its
    correctness gate."""

    primitives = ("attention_maps",)
    outputs = frozenset({"rows"})
    kernel_module = ""

    def launch_settings(self, attn: Attention) -> dict:
        """Keyword arguments of the kernel module's attention_maps beyond the inputs."""
        return {}

    def attention_maps(self, attn: Attention, grams: Tensor, row_scale: Tensor, rows: Optional[Tensor] = None,
                       weights: Optional[Tensor] = None, normalize_rows: bool = False,
                       want_alpha: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        outputs = frozenset(mode for mode, asked in (("rows", rows is not None), ("contract", weights is not None),
                                                     ("alpha", want_alpha)) if asked)
        reasons = self.refusals("attention_maps", attn, outputs=outputs)
        if reasons:
            raise BackendUnavailable(" ".join(reasons))
        kernels = importlib.import_module(f"kobattr.kernels.{self.kernel_module}")
        if attn.row_lse is None and rows is None:  # every row's statistics, once, kept for the caller too
            attn.row_lse = TritonBackend().row_lse(attn)
        common = self._common(attn, rows, None)
        del common["weights"]
        maps = kernels.attention_maps(grams=grams.float().contiguous(), row_scale=row_scale.float().contiguous(),
                                      lse2=self._given_lse2(attn, rows), **common, **self.launch_settings(attn))
        return maps, None


class TritonStreamedBackend(_TritonPairVariant):
    """attention_maps by kernels/attention_pairs_streamed.py: the heads streamed through a 2D dot each, the
    quadratic form as the squared norm of sum_h alpha_h L_j[h] (G_j = L_j L_j^T) on CUDA cores."""

    name = "triton_streamed"
    kernel_module = "attention_pairs_streamed"


class TritonStagedBackend(_TritonPairVariant):
    """attention_maps by kernels/attention_pairs_staged.py: every head's alpha staged through a per-program
    scratch tile in L2, then the tensor-core Gram dot. ``scratch``: alpha's and G's dtype there, "float32" or
    "bfloat16" (None: float32 for float32 models, bfloat16 for 16-bit ones, whose own rounding is as coarse)."""

    name = "triton_staged"
    kernel_module = "attention_pairs_staged"
    scratch: Optional[str] = None
    SCRATCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}

    def launch_settings(self, attn: Attention) -> dict:
        if self.scratch is None:
            return dict(scratch_dtype=torch.float32 if attn.q.dtype == torch.float32 else torch.bfloat16)
        if self.scratch not in self.SCRATCH:
            raise ValueError(f"scratch must be None, 'float32' or 'bfloat16', got {self.scratch!r}.")
        return dict(scratch_dtype=self.SCRATCH[self.scratch])
