"""Integrated Gradients of the FFN activation (kobattr/ig.py) against independent references.

Nothing here checks ig.py against itself: the activations are compared with torch's own
implementations and transformers' ACT2FN, and the IG shares with IG computed from its definition,
share_k = sum_s part_{s,k} * int_0^1 d out / d total_s (t * totals) dt, where the gradients come
from torch autograd through torch's activations and the integral from a composite Gauss-Legendre
rule in t (an open rule: no evaluation at t = 0, where relu' is ambiguous).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kobattr import ig
from kobattr.layer import ACTIVATIONS, FeedForward

TORCH_ACT = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
# gated FFN activation -> the element-wise activation of its gate, as torch computes it
GATE_OF = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
SMOOTH = ("gelu", "gelu_tanh", "silu")


def _points(dtype=torch.float64):
    """A dense grid over the region that matters plus far tails and values around 0."""
    grid = torch.linspace(-30, 30, 6001, dtype=torch.float64)
    extra = torch.tensor([-700.0, -80.0, -1e-3, -1e-7, 0.0, 1e-7, 1e-3, 80.0, 700.0], dtype=torch.float64)
    return torch.cat([grid, extra]).to(dtype)


def _gauss_legendre(panels=64, order=8):
    """Nodes (T,) and weights (T,) of a composite Gauss-Legendre rule on [0, 1] (fp64)."""
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.arange(panels) / panels
    nodes = (edges[:, None] + (x[None, :] + 1) / (2 * panels)).ravel()
    weights = np.tile(w / (2 * panels), panels)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def _ig_by_autograd(fn, parts):
    """IG shares of out = fn(*totals) (element-wise in its arguments), zero baseline, straight path.

    parts: one (K, ...) tensor per input stream (its K parts); returns the (K, ...) shares."""
    t, w = _gauss_legendre()
    shape = (-1,) + (1,) * (parts[0].dim() - 1)
    points = [(t.view(shape) * p.sum(0)).requires_grad_() for p in parts]  # (T, ...) per stream
    grads = torch.autograd.grad(fn(*points).sum(), points)  # d out / d total_s at t * totals
    path_integrals = [(w.view(shape) * g).sum(0) for g in grads]
    return sum(p * integral for p, integral in zip(parts, path_integrals))


def _parts(seed, k, *shape, scale=3.0, zero_units=2):
    """(k, *shape) random parts; the first ``zero_units`` units of every row sum to exactly 0."""
    g = torch.Generator().manual_seed(seed)
    parts = torch.randn(k, *shape, generator=g, dtype=torch.float64) * scale
    parts[2:, ..., :zero_units] = 0.0
    parts[1, ..., :zero_units] = -parts[0, ..., :zero_units]
    return parts


# ------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("act", sorted(TORCH_ACT))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_activation_fn_matches_torch(act, dtype):
    x = _points(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ig.activation_fn(act)(x), TORCH_ACT[act](x), **tol)


def test_activation_names_of_the_adapters_match_transformers_act2fn():
    """Every Hugging Face activation name kobattr accepts computes what transformers computes."""
    act2fn = pytest.importorskip("transformers.activations").ACT2FN
    from kobattr.models.adapters import ACTIVATION_NAMES

    assert {"gelu", "gelu_new", "silu"} <= set(ACTIVATION_NAMES)
    x = _points()
    for hf_name, name in ACTIVATION_NAMES.items():
        torch.testing.assert_close(ig.activation_fn(name)(x), act2fn[hf_name](x), rtol=1e-12, atol=1e-12,
                                   msg=lambda m, hf_name=hf_name, name=name: f"{hf_name} -> {name}: {m}")


def test_ffn_base_activation_is_the_gate_activation():
    assert {a: FeedForward(a, torch.ones(1, 1), torch.ones(1, 1)).base_activation for a in GATE_OF} == GATE_OF
    for a in TORCH_ACT:
        assert FeedForward(a, torch.ones(1, 1), torch.ones(1, 1)).base_activation == a


@pytest.mark.parametrize("act", sorted(TORCH_ACT))
def test_activation_grad_matches_autograd(act):
    x = _points()
    if act == "relu":
        x = x[x != 0]  # relu'(0) is a convention
    x.requires_grad_()
    (expected,) = torch.autograd.grad(TORCH_ACT[act](x).sum(), x)
    torch.testing.assert_close(ig.activation_grad(act, x.detach()), expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ element-wise IG
@pytest.mark.parametrize("act", sorted(TORCH_ACT))
def test_elementwise_shares_match_ig_by_integration(act):
    parts = _parts(1, 6, 20, 32)  # 6 parts of 20 rows x 32 units; 2 units per row total exactly 0
    z = parts.sum(0)
    shares = parts * ig.elementwise_coefficient(act, z)
    expected = _ig_by_autograd(TORCH_ACT[act], [parts])
    torch.testing.assert_close(shares, expected, rtol=0, atol=1e-11 * expected.abs().max().item())
    # completeness: the shares sum exactly to the activation of the total (zero units included)
    torch.testing.assert_close(shares.sum(0), TORCH_ACT[act](z), rtol=1e-12, atol=1e-12)


def test_elementwise_coefficient_at_zero_is_the_slope_at_zero():
    z = torch.zeros(3, dtype=torch.float64)
    for act, slope in (("gelu", 0.5), ("gelu_tanh", 0.5), ("silu", 0.5)):
        torch.testing.assert_close(ig.elementwise_coefficient(act, z), torch.full_like(z, slope))
        torch.testing.assert_close(ig.gated_coefficients(act, z, torch.ones_like(z))[0], torch.full_like(z, slope / 2))


# ------------------------------------------------------------------------------------ gated IG
@pytest.mark.parametrize("gated", sorted(GATE_OF))
def test_gated_shares_match_ig_by_integration(gated):
    act = GATE_OF[gated]
    parts_a = _parts(2, 7, 16, 24, scale=4.0)  # gate parts; 2 units per row with a gate total of 0
    parts_b = _parts(3, 7, 16, 24, scale=1.0, zero_units=0)  # up parts
    parts_a[0, 0, 2:6] = torch.tensor([-40.0, -12.0, 12.0, 40.0], dtype=torch.float64)  # far into the tails
    a, b = parts_a.sum(0), parts_b.sum(0)
    coef_gate, coef_up = ig.gated_coefficients(act, a, b)
    shares = parts_a * coef_gate + parts_b * coef_up
    expected = _ig_by_autograd(lambda ga, ub: TORCH_ACT[act](ga) * ub, [parts_a, parts_b])
    torch.testing.assert_close(shares, expected, rtol=0, atol=1e-11 * expected.abs().max().item())
    torch.testing.assert_close(shares.sum(0), TORCH_ACT[act](a) * b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", SMOOTH)
def test_gated_integrals_match_scipy_quad(act):
    """B(a) = int_0^1 act(t a) dt and A(a) = int_0^1 t act'(t a) dt, adaptive quadrature per point."""
    integrate = pytest.importorskip("scipy.integrate")
    fn = TORCH_ACT[act]

    def value(s):
        return fn(torch.tensor(s, dtype=torch.float64)).item()

    def slope(s):
        x = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        return torch.autograd.grad(fn(x), x)[0].item()

    a = torch.tensor([-60.0, -17.3, -4.0, -1.0, -1e-3, 1e-7, 0.5, 2.0, 6.5, 25.0, 80.0], dtype=torch.float64)
    coef_gate, coef_up = ig.gated_coefficients(act, a, torch.ones_like(a))
    quad = dict(epsabs=0, epsrel=1e-12, limit=200)
    for ai, A, B in zip(a.tolist(), coef_gate.tolist(), coef_up.tolist()):
        expected_b = integrate.quad(lambda t: value(t * ai), 0, 1, **quad)[0]
        expected_a = integrate.quad(lambda t: t * slope(t * ai), 0, 1, **quad)[0]
        assert abs(B - expected_b) <= 1e-9 * abs(expected_b), (ai, B, expected_b)
        assert abs(A - expected_a) <= 1e-9 * abs(expected_a), (ai, A, expected_a)


# ----------------------------------------------------------------------- a whole FFN, end to end
def _torch_ffn(activation, w, z):
    """FF(z) written with torch's activations, independent of kobattr.layer.FeedForward."""
    if activation in GATE_OF:
        hidden = TORCH_ACT[GATE_OF[activation]](z @ w["w_gate"] + w["b_gate"]) * (z @ w["w_in"] + w["b_in"])
    else:
        hidden = TORCH_ACT[activation](z @ w["w_in"] + w["b_in"])
    return hidden @ w["w_out"] + w["b_out"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ffn_shares_of_input_parts_sum_to_the_ffn_output(activation):
    """ffn_coefficients on a FeedForward: token parts and a bias part (which takes b_in, b_gate, b_out)
    of the FFN input get IG shares that match the definition and sum to FF(z)."""
    g = torch.Generator().manual_seed(4)
    D, Fw, rows, k = 8, 16, 10, 5
    w = {name: torch.randn(*shape, generator=g, dtype=torch.float64) * scale for name, shape, scale in (
        ("w_in", (D, Fw), 0.6), ("w_gate", (D, Fw), 0.6), ("w_out", (Fw, D), 0.3),
        ("b_in", (Fw,), 0.5), ("b_gate", (Fw,), 0.5), ("b_out", (D,), 0.5))}
    gated = activation in GATE_OF
    ffn = FeedForward(activation, w["w_in"], w["w_out"], b_in=w["b_in"], b_out=w["b_out"],
                      w_gate=w["w_gate"] if gated else None, b_gate=w["b_gate"] if gated else None)
    parts = torch.randn(k + 1, rows, D, generator=g, dtype=torch.float64)  # the last part is the bias part
    z = parts.sum(0)
    coef_in, coef_gate = ig.ffn_coefficients(ffn, z)
    assert (coef_gate is not None) == gated

    # pre-activation parts; the bias part carries the biases
    up = parts @ w["w_in"]
    up[-1] += w["b_in"]
    gate = parts @ w["w_gate"]
    gate[-1] += w["b_gate"]
    hidden = up * coef_in + (gate * coef_gate if gated else 0.0)
    shares = hidden @ w["w_out"]
    shares[-1] += w["b_out"]

    if gated:
        act = TORCH_ACT[GATE_OF[activation]]
        expected_hidden = _ig_by_autograd(lambda ga, ub: act(ga) * ub, [gate, up])
    else:
        expected_hidden = _ig_by_autograd(TORCH_ACT[activation], [up])
    torch.testing.assert_close(hidden, expected_hidden, rtol=0, atol=1e-11 * expected_hidden.abs().max().item())
    torch.testing.assert_close(shares.sum(0), _torch_ffn(activation, w, z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "riemann"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_coefficients_keep_the_input_dtype(activation, method):
    """fp32 rows give fp32 coefficients (computed in fp64 where needed) that agree with fp64 rows."""
    g = torch.Generator().manual_seed(5)
    D, Fw = 6, 10
    ffn = FeedForward(activation, torch.randn(D, Fw, generator=g), torch.randn(Fw, D, generator=g),
                      w_gate=torch.randn(D, Fw, generator=g) if activation == "swiglu" else None)
    z = torch.randn(7, D, generator=g) * 2
    coefs32 = ig.ffn_coefficients(ffn, z, method)
    ffn64 = FeedForward(activation, ffn.w_in.double(), ffn.w_out.double(),
                        w_gate=None if ffn.w_gate is None else ffn.w_gate.double())
    coefs64 = ig.ffn_coefficients(ffn64, z.double(), method)
    for c32, c64 in zip(coefs32, coefs64):
        if c64 is None:
            assert c32 is None
            continue
        assert c32.dtype == torch.float32
        torch.testing.assert_close(c32.double(), c64, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- Riemann option
@pytest.mark.parametrize("act", sorted(TORCH_ACT))
def test_riemann_converges_to_the_closed_form(act):
    z = torch.linspace(-6, 6, 241, dtype=torch.float64)
    z = z[z != 0]
    exact = ig.elementwise_coefficient(act, z)
    riemann = ig.elementwise_coefficient(act, z, method="riemann", steps=10_000)
    assert ((exact - riemann) * z).abs().max() <= 1e-4 * TORCH_ACT[act](z).abs().max()


def _slope(act, x):
    x = x.clone().requires_grad_()
    return torch.autograd.grad(TORCH_ACT[act](x).sum(), x)[0]


@pytest.mark.parametrize("act", SMOOTH)
def test_riemann_is_the_right_endpoint_rule(act):
    """rho_m = (1/m) sum_{s=1..m} act'(s z / m). By Euler-Maclaurin its error against the exact
    coefficient is (act'(z) - act'(0)) / (2m) + O(1/m^2): first order, halving when m doubles."""
    z = torch.linspace(-4, 4, 81, dtype=torch.float64)
    exact = ig.elementwise_coefficient(act, z)
    leading = (_slope(act, z) - _slope(act, torch.zeros_like(z))) / 2
    for m in (25, 200):
        scaled_error = m * (ig.elementwise_coefficient(act, z, method="riemann", steps=m) - exact)
        assert (scaled_error - leading).abs().max() <= 4.0 / m * leading.abs().max(), m
    # m = 20 (the default) on unit-scale inputs: the shares are a few percent off
    rho20 = ig.elementwise_coefficient(act, z, method="riemann", steps=20)
    off = ((rho20 - exact) * z).norm() / (exact * z).norm()
    assert 0.005 < off < 0.05


@pytest.mark.parametrize("act", SMOOTH)
def test_gated_riemann_is_the_right_endpoint_rule(act):
    """Gated: A_m - A = act'(a) / (2m) + O(1/m^2) and B_m - B = act(a) / (2m) + O(1/m^2)."""
    a = torch.linspace(-4, 4, 81, dtype=torch.float64)
    b = torch.linspace(0.5, 2.0, 81, dtype=torch.float64)
    gate, up = ig.gated_coefficients(act, a, b)
    lead_gate, lead_up = b * _slope(act, a) / 2, TORCH_ACT[act](a) / 2
    for m in (25, 200):
        gate_m, up_m = ig.gated_coefficients(act, a, b, method="riemann", steps=m)
        for err, lead in ((m * (gate_m - gate), lead_gate), (m * (up_m - up), lead_up)):
            assert (err - lead).abs().max() <= 4.0 / m * lead.abs().max(), m


def test_bad_ig_options():
    with pytest.raises(ValueError, match="ig must be"):
        ig.elementwise_coefficient("gelu", torch.ones(3), method="trapezoid")
    with pytest.raises(ValueError, match="ig_steps"):
        ig.elementwise_coefficient("gelu", torch.ones(3), method="riemann", steps=0)
    ffn = FeedForward("swiglu", torch.ones(2, 3), torch.ones(3, 2), w_gate=torch.ones(2, 3))
    with pytest.raises(ValueError, match="ig must be"):
        ig.ffn_coefficients(ffn, torch.ones(1, 2), method="midpoint")
    with pytest.raises(ValueError, match="ig_steps"):  # checked even where the exact form ignores it
        ig.ffn_coefficients(ffn, torch.ones(1, 2), method="exact", steps=0)
    with pytest.raises(ValueError, match="unknown activation"):
        ig.activation_fn("tanh")(torch.ones(1))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_coefficients_in_row_blocks_equal_one_block(kind):
    from kobattr.ig import ffn_coefficients
    from kobattr.testing import random_layer

    layer = random_layer(kind, N=13, B=2)
    z = layer.forward()["mid"]
    whole = ffn_coefficients(layer.ffn, z)
    blocked = ffn_coefficients(layer.ffn, z, block=3 * layer.ffn.w_in.shape[1])  # 3 rows at a time: 9 blocks
    for a, b in zip(whole, blocked):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == z.shape[:-1] + (layer.ffn.w_in.shape[1],)
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)  # only the matmul blocking differs
