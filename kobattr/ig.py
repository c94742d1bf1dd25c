"""Integrated Gradients coefficients of the FFN activation (Kobayashi et al. 2024, spec section 4).

IG with zero baseline on a straight path through the split FFN input is linear in the parts, so it
reduces to per-row, per-unit coefficient vectors:

* element-wise act(z) = z * P(z):   share_k = z_k * P(z)                   (exact, closed form)
  with the Riemann option           share_k = z_k * mean_s act'(t_s z),     t_s = s / m, s = 1..m
* gated act(a) * b (SwiGLU/GeGLU):  share_k = a_k * b * A(a) + b_k * B(a)
  B(a) = int_0^1 act(t a) dt,  A(a) = int_0^1 t act'(t a) dt = (act(a) - B(a)) / a,
  so the shares sum exactly to act(a) * b.

B(a) = F(a) / a with F(a) = int_0^a act(s) ds. Every supported activation is act(s) = s * P(s) with
P(s) + P(-s) = 1, so F(a) = [a > 0] a^2 / 2 + (-1)^{[a > 0]} G(|a|), G(A) = int_0^A s P(-s) ds, whose
integrand decays to 0: 64-point Gauss-Legendre on [0, min(A, L)] gives G to ~1e-10 (fp64).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

_GELU_TANH_K = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715
# Beyond this |s| the tail of s * P(-s) is below 1e-14 (silu decays like s e^-s, the gelus faster).
_TAIL_CUTOFF = {"silu": 40.0, "gelu": 12.0, "gelu_tanh": 12.0}
_GL_POINTS = 64
IG_METHODS = ("exact", "riemann")


def gate_probability(name: str, s: Tensor) -> Tensor:
    """P(s) = act(s) / s (the limit act'(0) at s = 0)."""
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(s * (1.0 / math.sqrt(2.0))))
    if name == "gelu_tanh":
        return 0.5 * (1.0 + torch.tanh(_GELU_TANH_K * (s + _GELU_TANH_C * s**3)))
    if name == "silu":
        return torch.sigmoid(s)
    if name == "relu":
        return (s > 0).to(s.dtype)
    raise ValueError(f"unknown activation {name!r}")


def activation_fn(name: str):
    return lambda s: s * gate_probability(name, s)


def activation_grad(name: str, s: Tensor) -> Tensor:
    """act'(s)."""
    if name == "gelu":
        return gate_probability("gelu", s) + s * torch.exp(-0.5 * s * s) / math.sqrt(2.0 * math.pi)
    if name == "gelu_tanh":
        t = torch.tanh(_GELU_TANH_K * (s + _GELU_TANH_C * s**3))
        return 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * _GELU_TANH_K * (1.0 + 3.0 * _GELU_TANH_C * s * s)
    if name == "silu":
        sig = torch.sigmoid(s)
        return sig + s * sig * (1.0 - sig)
    if name == "relu":
        return (s > 0).to(s.dtype)
    raise ValueError(f"unknown activation {name!r}")


@lru_cache(maxsize=None)
def _gauss_legendre_01(n: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of n-point Gauss-Legendre on [0, 1] (fp64, CPU)."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)


def _tail_integral(name: str, A: Tensor) -> Tensor:
    """G(A) = int_0^A s P(-s) ds for A >= 0 (fp64)."""
    nodes, weights = _gauss_legendre_01(_GL_POINTS)
    nodes, weights = nodes.to(A.device), weights.to(A.device)
    upper = A.clamp(max=_TAIL_CUTOFF[name])
    out = torch.zeros_like(A)
    for t, w in zip(nodes, weights):  # a loop keeps memory at one copy of A
        s = upper * t
        out += w * s * gate_probability(name, -s)
    return out * upper


def _antiderivative(name: str, a: Tensor) -> Tensor:
    """F(a) = int_0^a act(s) ds (fp64)."""
    if name == "relu":
        return 0.5 * a.clamp(min=0) ** 2
    tail = _tail_integral(name, a.abs())
    return torch.where(a > 0, 0.5 * a * a - tail, tail)


def elementwise_coefficient(name: str, z: Tensor, method: str = "exact", steps: int = 20) -> Tensor:
    """rho with share_k = z_k * rho for the row totals z (any shape), in z's dtype."""
    if method == "exact":
        return gate_probability(name, z)
    _check_method(method, steps)
    zz = z.double()
    acc = torch.zeros_like(zz)
    for s in range(1, steps + 1):
        acc += activation_grad(name, zz * (s / steps))
    return (acc / steps).to(z.dtype)


def gated_coefficients(name: str, a: Tensor, b: Tensor, method: str = "exact", steps: int = 20) -> tuple[Tensor, Tensor]:
    """(coef_gate, coef_up) with share_k = a_k * coef_gate + b_k * coef_up, for the gate totals a
    and up totals b of each row. Computed in fp64, returned in a's dtype."""
    aa = a.double()
    if method == "exact":
        safe = torch.where(aa == 0, torch.ones_like(aa), aa)
        B = torch.where(aa == 0, torch.zeros_like(aa), _antiderivative(name, aa) / safe)
        act_a = aa * gate_probability(name, aa)
        A = torch.where(aa == 0, 0.5 * activation_grad(name, torch.zeros_like(aa)), (act_a - B) / safe)
    else:
        _check_method(method, steps)
        A, B = torch.zeros_like(aa), torch.zeros_like(aa)
        for s in range(1, steps + 1):
            t = s / steps
            A += t * activation_grad(name, aa * t)
            B += aa * t * gate_probability(name, aa * t)
        A, B = A / steps, B / steps
    return (b.double() * A).to(a.dtype), B.to(a.dtype)


def _check_method(method: str, steps: int) -> None:
    if method not in IG_METHODS:
        raise ValueError(f"ig must be one of {IG_METHODS}, got {method!r}.")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"ig_steps must be a positive int, got {steps!r}.")


def ffn_coefficients(ffn, z: Tensor, method: str = "exact", steps: int = 20,
                     block: int = 1 << 22) -> tuple[Tensor, Tensor | None]:
    """(coef_in, coef_gate) of an FFN for its real input rows z (..., D): the share of a part p of
    z is ((p W_in) * coef_in + (p W_gate) * coef_gate) W_out (coef_gate None if not gated).
    Rows go through in blocks of about ``block`` pre-activations, so the float64 temporaries stay small."""
    _check_method(method, steps)
    rows = z.reshape(-1, z.shape[-1])
    size = max(1, block // ffn.w_in.shape[1])
    coef_in = torch.empty(rows.shape[0], ffn.w_in.shape[1], dtype=z.dtype, device=z.device)
    coef_gate = torch.empty_like(coef_in) if ffn.gated else None
    for start in range(0, rows.shape[0], size):
        up, gate = ffn.pre_activations(rows[start:start + size])
        if ffn.gated:
            coef_gate[start:start + size], coef_in[start:start + size] = gated_coefficients(
                ffn.base_activation, gate, up, method, steps)
        else:
            coef_in[start:start + size] = elementwise_coefficient(ffn.base_activation, up, method, steps)
    shape = z.shape[:-1] + (ffn.w_in.shape[1],)
    return coef_in.view(shape), None if coef_gate is None else coef_gate.view(shape)
