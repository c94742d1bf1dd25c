"""Spot checks: every returned map verifies itself against the materialising reference on a few rows.

For each batch element, ``k`` query rows are sampled (seeded) among the returned rows whose token is
not padding, and the reference (kobattr/reference.py; float64 for float64 layers, float32 otherwise)
recomputes them from the captured Layer: alpha from q and k, norms and FFN from the layer's weights,
and the value vectors f^h(x_j) of the preparation step (plain torch, tested against the reference;
recomputed where they were too large to keep). Nothing an implementation computed (row statistics,
Gram quadratic forms, kernel outputs) is reused. A contracted result is checked by rerunning the
implementations with the contraction restricted to the sampled rows S and comparing with
contract[:, S] @ reference[S].

Error of a row: max_j |got_ij - ref_ij| / max_j |ref_ij| (0 when both rows are all zero, inf when only
the reference row is). The largest over the sampled rows (and heads) is the method's error.

A layer captured with the model's own head outputs (Layer.head_outputs) is attributed with them: its real
hidden states (y, every norm's statistic, the FFN input) come from the attention output as the model computed
it. The maps are then compared with the reference computed the model's way (reference.materialise with that
attention output), to the tolerance of the layer's dtype, and the sampled rows' head outputs themselves with
their recomputation from q, k and v, to the tolerance of the precision the model's softmax really ran in:
Hugging Face's eager attention runs it in float32 inside a float64 model (softmax(..., dtype=torch.float32)), so
head outputs that the recomputation with a float32 softmax explains (to FLOAT32_SOFTMAX) are held to the float32
tolerance, and any others of a float64 layer to the float64 one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layer import cap_logits
from .methods import form, row_normalize
from .reference import materialise

# the largest spot-check error accepted, by the dtype the implementation computed in
TOLERANCES = {"float64": 1e-9, "float32": 1e-4, "tf32": 5e-3, "float16": 2e-2, "bfloat16": 5e-2}
# a float64 layer's head outputs within this of the recomputation with a float32 softmax came from a float32
# softmax (they agree to float32 rounding, a few units in the last place of alpha, where the float64 recomputation
# is ~1e-8 away); a real error that large would still be caught by the float64 tolerance
FLOAT32_SOFTMAX = 1e-6


class VerificationError(RuntimeError):
    """A returned map disagrees with the reference on its sampled rows by more than the dtype's tolerance."""


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    name = str(dtype).replace("torch.", "")
    if tf32 and name == "float32":
        name = "tf32"
    if name not in TOLERANCES:
        raise ValueError(f"no spot-check tolerance for {dtype}; known: {', '.join(TOLERANCES)}.")
    return TOLERANCES[name]


def row_errors(got: Tensor, ref: Tensor) -> Tensor:
    """(..., R) error of each row of (..., R, N) maps, as the module docstring defines it."""
    got, ref = got.double(), ref.double()
    scale = ref.abs().amax(-1)
    diff = (got - ref).abs().amax(-1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, diff / safe, torch.where(diff > 0, float("inf"), 0.0))


def sample_rows(candidates: Tensor, valid: Tensor, k: int, seed: int) -> Tensor:
    """Up to k of the row positions 0..len(candidates)-1, preferring rows whose token is valid."""
    g = torch.Generator().manual_seed(seed)
    pool = valid[candidates].nonzero().flatten().cpu()
    if pool.numel() == 0:
        pool = torch.arange(len(candidates))
    return pool[torch.randperm(pool.numel(), generator=g)[:k]].sort().values


def head_output_check(recorded: Tensor, scores: Tensor, v: Tensor, model_dtype: torch.dtype) -> tuple[float, torch.dtype]:
    """(error of recorded head outputs (B, H, R, Dh) vs their recomputation sum_j alpha^h_ij v_j from the logits
    ``scores`` (B, H, R, N; -inf where invisible) and ``v`` (B, KV, N, Dh), in the dtype of ``scores``, the dtype
    the model's softmax ran in) for a block of a ``model_dtype`` model (module docstring)."""
    dtype = scores.dtype
    B, H, R, _ = scores.shape
    KV = v.shape[1]
    recorded, v = recorded.to(dtype), v.to(dtype)

    def error(alpha):
        heads = (alpha.nan_to_num(0.0).to(dtype).reshape(B, KV, H // KV * R, -1) @ v).view(B, H, R, -1)
        return row_errors(recorded, heads).max().item()

    err = error(torch.softmax(scores, -1))
    if model_dtype != torch.float64 or err <= TOLERANCES["float64"]:
        return err, model_dtype
    if error(torch.softmax(scores, -1, dtype=torch.float32)) <= FLOAT32_SOFTMAX:
        return err, torch.float32
    return err, model_dtype


def verify_head_outputs(recorded: Tensor, scores: Tensor, v: Tensor, model_dtype: torch.dtype, where: str) -> None:
    """VerificationError when head_output_check's error exceeds the tolerance of the precision it detects; ``where``
    names the batch element and rows."""
    err, softmax_dtype = head_output_check(recorded, scores, v, model_dtype)
    tol = tolerance(softmax_dtype)
    if not err <= tol:
        raise VerificationError(
            f"spot check failed: the model's recorded head outputs differ from their recomputation from q, k and v by "
            f"{err:.2e} (relative) on {where}; the tolerance for {str(softmax_dtype).replace('torch.', '')} (the "
            f"precision the model's softmax ran in) is {tol:.0e}.")


def spot_check(layer, result, impls: dict, rerun, k: int, seed: int, contract, normalize_rows: bool,
               ig: str, ig_steps: int, ff_dtype: torch.dtype = None) -> dict:
    """{method: (B,) float64 error} of ``result`` (a LayerAttribution); raises VerificationError. ``ff_dtype``:
    the dtype of the FF methods' W_2 products when lower than the layer's (attribute(ff_gemm=...)), whose
    tolerance those methods are then held to."""
    B, H, N, _ = layer.q.shape
    requested = result.rows if result.rows is not None else torch.arange(N, device=layer.q.device)
    valid = layer.valid
    # float64 for float64 layers; float32 otherwise, whose own error (~1e-6) is 1% of the loosest
    # tolerance it is held to, at 40% of the cost of float64
    reference_dtype = torch.float64 if layer.q.dtype == torch.float64 else torch.float32
    samples = [sample_rows(requested, valid[b], k, seed * 1_000_003 + b).to(requested.device) for b in range(B)]
    errors = {m: torch.zeros(B, dtype=torch.float64) for m in result.methods}

    rerun_maps = None
    if contract is not None:  # the implementations again, contracted over the sampled rows only
        positions = torch.cat(samples).unique()
        keep = torch.zeros(B, N, dtype=torch.bool, device=contract.device)
        for b, s in enumerate(samples):
            keep[b, requested[s]] = True
        rerun_maps = rerun(requested[positions], contract * keep[:, None, :])

    for b, s in enumerate(samples):
        rows = requested[s]
        # the layer was validated before it was attributed
        one = layer.select(b).to(reference_dtype)
        attention_output = None
        if one.head_outputs is not None:
            k = one.k.repeat_interleave(one.n_heads // one.n_kv_heads, 1)
            scores = cap_logits(one.q[:, :, rows] @ k.transpose(-1, -2) * one.softmax_scale, one.softcap)
            scores = scores.masked_fill(~one.visible(rows)[:, None], float("-inf"))
            verify_head_outputs(one.head_outputs[:, :, rows], scores, one.v, layer.q.dtype,
                                f"batch element {b}, sampled rows {rows.tolist()}")
            attention_output = torch.einsum("bhrd,hde->bre", one.head_outputs[:, :, rows], one.w_o)
        ref = materialise(one, result.methods, ig, ig_steps, rows, with_heads=bool(result.head_maps),
                          attention_output=attention_output)
        for m in result.methods:
            expected = ref["maps"][m][0].to(layer.q.device)  # (S, N)
            if normalize_rows:
                expected = row_normalize(expected)
            if contract is None:
                err = row_errors(result.maps[m][b, s], expected).max()
                if m in result.head_maps:
                    ref_heads = ref["head_maps"][m][0].to(layer.q.device)
                    if normalize_rows:
                        ref_heads = row_normalize(ref_heads)
                    err = torch.maximum(err, row_errors(result.head_maps[m][b][:, s], ref_heads).max())
            else:
                expected = contract[b][:, rows].double() @ expected.double()  # (K, N)
                err = row_errors(rerun_maps[m][b], expected).max()
            errors[m][b] = err.item()

    for m, err in errors.items():
        primitive = form(m, layer.structure).primitive
        # every implementation computes float32 dots at float32 accuracy (Triton: tf32x3)
        dtype = ff_dtype if ff_dtype is not None and primitive == "ff_maps" else layer.q.dtype
        tol = tolerance(dtype)
        impl = impls[primitive]
        worst = int(err.argmax())
        if not err[worst] <= tol:
            raise VerificationError(
                f"spot check failed: {m} from implementation {impl.name!r} ({primitive}) differs from the reference by "
                f"{err[worst]:.2e} (relative) on batch element {worst}, sampled rows {requested[samples[worst]].tolist()}; "
                f"the tolerance for {str(dtype).replace('torch.', '')} is {tol:.0e}.")
    return errors
