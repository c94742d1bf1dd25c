"""What a backend computes: the two pair-norm primitives every method reduces to.

kobattr turns every norm-based method into per-key Gram matrices / per-key parts and per-row
vectors (computed once, O(N) memory, by kobattr/core.py). A backend only has to evaluate the
pairs, never storing an (N, N, D) tensor. Notation for one batch element:

    alpha^h_ij = softmax_j(cap(scale * q^h_i . k^{g(h)}_j)) over the keys j visible from query i
                 (g(h) = h // (H // KV); cap(s) = c tanh(s / c) with softcap c > 0, else s; visible =
                 valid key, valid query, and the rules of Layer.visible: j <= i if causal, i - j < window
                 if window > 0, |i - j| <= radius if radius > 0)
    kappa_ij   = (alpha^0_ij, ..., alpha^{H-1}_ij, [i == j])      a vector of H + 1 coefficients;
                 the last one carries the residual row.

attention_maps  (ATTN-N, ATTNRES-N, ATTNRESLN-N, pre-LN ATB / ATBLN)
    grams      (B, N, M, H+1, H+1) float32  M symmetric Gram matrices per key j (implementations may
                                        read the residual cross term as 2 G[:H, H])
    row_scale  (B, N, M)           float32  per query row multiplier
    map[b, m, i, j] = row_scale[b, i, m] * sqrt(max(kappa_ij^T grams[b, j, m] kappa_ij, 0)),
    0 where j is not visible from i. Optionally alpha itself (B, H, R, N) float32.

ff_maps  (the FF scopes: post-LN ATBFF, ATBFFRES, ATBFFRESLN; pre-LN ATBLNFF, ATBLNFFRES; ...)
    ff_parts   (B, N, H+1, F)  per key: the parts of the FFN input through W_in
    gate_parts (B, N, H+1, F)  or None: the same through W_gate (gated FFN)
    res_parts  (B, N, H+1, D)  per key: the residual-stream parts
               (all three as FFParts.block(keys) gives them for a block of keys)
    in_scale, res_scale, out_scale (B, N); coef_in, coef_gate (B, N, F) (coef_gate None if not gated)
    w_out      (F, D); out_weight (D,) or None; out_center: bool; n_scopes: 2 or 3
    ff_ij  = ((in_scale_i sum_r kappa_ij[r] ff_parts_j[r]) * coef_in_i
              + (in_scale_i sum_r kappa_ij[r] gate_parts_j[r]) * coef_gate_i) @ w_out
    res_ij = res_scale_i sum_r kappa_ij[r] res_parts_j[r]
    scopes: 0: ||ff_ij||   1: ||res_ij + ff_ij||
            2: out_scale_i * ||C(res_ij + ff_ij) * out_weight||  (C = subtract the mean over D if
               out_center, identity otherwise; out_weight None = ones)
    -> (B, n_scopes, R, N) float32, 0 where j is not visible from i.

row_stats  row_lse(attn) -> (B, H, N): log sum_j exp(cap(scale q^h_i . k_j)) over the keys visible from i
           (natural log; float64 for float64 q, else float32; -inf or any value on rows that see no key).
           With the model's attention output (Layer.head_outputs) it is all the O(N^2) work of the row
           pass: alpha^h_ii = exp(logit_ii - lse_i).

Output modes shared by both map primitives: ``rows`` (R,) int64 selects query rows (None = all N, R = N);
``weights`` (B, K, N) float32 asks instead for the contraction out[b, m, k, j] =
sum_i weights[b, k, i] * map[b, m, i, j] over the selected rows i (all rows without ``rows``;
weights stays indexed by the absolute row), with ``normalize_rows`` dividing each map row by its
sum first (rows summing to 0 stay 0), returning (B, M, K, N) without building the map.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..layer import visible


# block features an input may need, and how a refusal names them
FEATURES = {"causal": "causal attention", "window": "sliding-window attention",
            "radius": "symmetric sliding-window attention (|i - j| <= radius)",
            "softcap": "attention logit soft-capping",
            "gqa": "grouped-query attention (fewer KV heads than query heads)"}


# output modes beyond the full map a map primitive may be asked for (kobattr.core: rows=, contract=, the heads'
# alpha), and how a refusal names them
OUTPUTS = {"rows": "selected query rows (rows=)", "contract": "contractions over the rows (contract=)",
           "alpha": "the heads' attention weights alpha"}


def required_features(attn: "Attention") -> set:
    needed = set()
    if attn.causal:
        needed.add("causal")
    if attn.window:
        needed.add("window")
    if attn.radius:
        needed.add("radius")
    if attn.softcap:
        needed.add("softcap")
    if attn.k.shape[1] != attn.q.shape[1]:
        needed.add("gqa")
    return needed


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this input; the message says why."""


@dataclass
class Attention:
    """The attention pattern every primitive recomputes alpha from."""

    q: Tensor  # (B, H, N, Dh) model dtype
    k: Tensor  # (B, KV, N, Dh) model dtype
    valid: Tensor  # (B, N) bool
    causal: bool
    window: int
    scale: float
    radius: int = 0  # symmetric window |i - j| <= radius (0: none)
    softcap: float = 0.0  # logits c tanh(scale q.k / c) (0: none)
    # (B, H, N) natural-log row log-sum-exp of every row: the implementations that can skip their own
    # row-statistics pass use it, and an attention_maps call over every row leaves it here when it was None
    # (core then takes alpha_ii from it instead of running row_stats)
    row_lse: Optional[Tensor] = None
    row_stats_ran: bool = False  # whether the row_stats primitive computed row_lse (not an attention primitive)


@dataclass
class FFParts:
    """Per-key and per-row pieces of the feed-forward primitive (see module docstring).

    The per-key parts are either stored (ff_parts, gate_parts, res_parts) or computed on demand for a block
    of keys by ``key_block`` (what kobattr.core does: nothing (N, H+1, F) is ever held); ``block(keys)``
    gives them either way."""

    in_scale: Tensor
    res_scale: Tensor
    out_scale: Tensor
    coef_in: Tensor
    coef_gate: Optional[Tensor]
    w_out: Tensor
    out_weight: Optional[Tensor]
    out_center: bool
    n_scopes: int
    ff_parts: Optional[Tensor] = None
    gate_parts: Optional[Tensor] = None
    res_parts: Optional[Tensor] = None
    key_block: Optional[Callable[[slice], tuple]] = None  # keys -> (ff_parts, gate_parts or None, res_parts)
    # the (pairs, F) @ (F, D) product with W_out in this dtype (bfloat16 / float16: attribute(ff_gemm=...)),
    # accumulated in float32; "tf32": float32 operands on TF32 tensor cores (CUDA); None: the compute dtype
    gemm_dtype: Union[torch.dtype, str, None] = None

    def block(self, keys: slice) -> tuple:
        """(ff_parts, gate_parts or None, res_parts) of the keys ``keys``, (B, C, H+1, F / D)."""
        if self.key_block is not None:
            return self.key_block(keys)
        return (self.ff_parts[:, keys], None if self.gate_parts is None else self.gate_parts[:, keys],
                self.res_parts[:, keys])

    def materialised(self) -> "FFParts":
        """The same parts with every key's parts stored (B, N, H+1, F / D): for implementations that read them
        whole, and the tests' oracle."""
        if self.key_block is None:
            return self
        ff, gate, res = self.block(slice(0, self.in_scale.shape[1]))
        return replace(self, ff_parts=ff, gate_parts=gate, res_parts=res, key_block=None)


class Backend:
    """An implementation of some of the pair primitives, declaring what it takes (xformers style).

    Subclasses set ``name``, ``primitives`` (the ones they implement), ``devices`` and ``dtypes`` (of q
    and k), optionally ``max_heads`` / ``max_head_size``, ``features`` and ``outputs`` (what they compute of
    FEATURES and OUTPUTS), and implement those primitives. Dispatch
    (kobattr/backends/__init__.py) asks ``refusals`` and reports every reason when nothing fits.
    """

    name = "?"
    primitives: tuple = ()
    devices: tuple = ("cpu", "cuda")
    dtypes: tuple = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    max_heads: Optional[int] = None
    max_head_size: Optional[int] = None
    features: frozenset = frozenset(FEATURES)  # the block features of FEATURES it computes
    outputs: frozenset = frozenset(OUTPUTS)  # the output modes of OUTPUTS its map primitives produce
    ff_gemm_dtypes: tuple = (None,)  # FFParts.gemm_dtype values its ff_maps takes (None: the compute dtype)
    budget: Optional[int] = None  # elements per intermediate (attribute(budget=...)); None: its own sizing

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """None if the implementation can run on this machine, else a sentence saying why not."""
        return None

    def refusals(self, primitive: str, attn: Attention, ff_gemm_dtype: Optional[torch.dtype] = None,
                 outputs: frozenset = frozenset()) -> list[str]:
        """Every reason this implementation cannot run ``primitive`` on this input (empty: it can);
        ``ff_gemm_dtype``: the FFParts.gemm_dtype that ff_maps would get; ``outputs``: the output modes of OUTPUTS
        asked for beyond the full map."""
        if primitive not in self.primitives:
            return [f"{self.name} does not implement {primitive}."]
        reasons = []
        machine = self.unavailable_reason()
        if machine is not None:
            reasons.append(machine)
        device = attn.q.device.type
        if device not in self.devices:
            reasons.append(f"{self.name} takes {' or '.join(self.devices)} tensors, not {device}.")
        if attn.q.dtype not in self.dtypes or attn.k.dtype != attn.q.dtype:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"{self.name} takes q and k of one dtype among {names}, got {attn.q.dtype} and {attn.k.dtype}.")
        B, H, N, Dh = attn.q.shape
        if attn.k.shape[1] == 0 or H % attn.k.shape[1]:
            reasons.append(f"{H} query heads are not a multiple of {attn.k.shape[1]} key/value heads.")
        if self.max_heads is not None and H > self.max_heads:
            reasons.append(f"{self.name} takes at most {self.max_heads} heads, got {H}.")
        if self.max_head_size is not None and Dh > self.max_head_size:
            reasons.append(f"{self.name} takes head sizes up to {self.max_head_size}, got {Dh}.")
        for feature in sorted(required_features(attn) - self.features):
            reasons.append(f"{self.name} does not compute {FEATURES[feature]}.")
        if primitive != "row_stats":
            for mode in sorted(set(outputs) - self.outputs):
                reasons.append(f"{self.name} does not produce {OUTPUTS[mode]}.")
        if primitive == "ff_maps" and ff_gemm_dtype not in self.ff_gemm_dtypes:
            reasons.append(f"{self.name} computes the FF products with W_2 in its own precision, not "
                           f"{str(ff_gemm_dtype).replace('torch.', '')} (ff_gemm).")
        return reasons

    def row_lse(self, attn: Attention) -> Tensor:
        raise NotImplementedError

    def attention_maps(self, attn: Attention, grams: Tensor, row_scale: Tensor, rows: Optional[Tensor] = None,
                       weights: Optional[Tensor] = None, normalize_rows: bool = False,
                       want_alpha: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def ff_maps(self, attn: Attention, parts: FFParts, rows: Optional[Tensor] = None,
                weights: Optional[Tensor] = None, normalize_rows: bool = False) -> Tensor:
        raise NotImplementedError


def visible_block(attn: Attention, rows: Tensor, cols: Tensor) -> Tensor:
    """(B, len(rows), len(cols)) bool visibility of keys ``cols`` from queries ``rows``."""
    return visible(rows, cols, attn.valid, attn.causal, attn.window, attn.radius)
