"""Integrated Gradients coefficients: closed form vs Riemann sums, quadrature vs scipy, exactness."""

import pytest
import torch

from kobattr import ig


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu"])
def test_closed_form_equals_fine_riemann_sum(act):
    z = torch.linspace(-6, 6, 241, dtype=torch.float64)
    z = z[z != 0]  # relu' jumps at 0, where the Riemann sum of any length is exact anyway
    exact = ig.elementwise_coefficient(act, z)
    riemann = ig.elementwise_coefficient(act, z, method="riemann", steps=10_000)
    # share = z * rho: compare the shares relative to the activation's scale
    assert ((exact - riemann) * z).abs().max() <= 1e-4 * (z * exact).abs().max()
    torch.testing.assert_close(z * exact, ig.activation_fn(act)(z))


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_gated_quadrature_is_accurate(act):
    integrate = pytest.importorskip("scipy.integrate")
    a = torch.tensor([-60.0, -17.3, -4.0, -1.0, -1e-3, 1e-7, 0.5, 2.0, 6.5, 25.0, 80.0], dtype=torch.float64)
    coef_gate, coef_up = ig.gated_coefficients(act, a, torch.ones_like(a))
    f = ig.activation_fn(act)
    for ai, B in zip(a.tolist(), coef_up.tolist()):
        expected = integrate.quad(lambda t: f(torch.tensor(t * ai, dtype=torch.float64)).item(), 0, 1,
                                  epsabs=0, epsrel=1e-12, limit=200)[0]
        assert abs(B - expected) <= 1e-6 * abs(expected), (ai, B, expected)
    for ai, A in zip(a.tolist(), coef_gate.tolist()):
        expected = integrate.quad(lambda t: t * ig.activation_grad(act, torch.tensor(t * ai, dtype=torch.float64)).item(),
                                  0, 1, epsabs=0, epsrel=1e-12, limit=200)[0]
        assert abs(A - expected) <= 1e-6 * abs(expected), (ai, A, expected)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_gated_shares_sum_exactly_to_the_ffn_output(act):
    g = torch.Generator().manual_seed(0)
    parts_a = torch.randn(9, 50, 16, generator=g, dtype=torch.float64) * 3  # 9 parts of 50 rows x 16 units
    parts_b = torch.randn(9, 50, 16, generator=g, dtype=torch.float64)
    a, b = parts_a.sum(0), parts_b.sum(0)
    coef_gate, coef_up = ig.gated_coefficients(act, a, b)
    shares = parts_a * coef_gate + parts_b * coef_up
    torch.testing.assert_close(shares.sum(0), ig.activation_fn(act)(a) * b, rtol=1e-12, atol=1e-12)
    # the Riemann option approximates the same shares
    rg, ru = ig.gated_coefficients(act, a, b, method="riemann", steps=4000)
    approx = parts_a * rg + parts_b * ru
    assert (approx - shares).abs().max() < 1e-2 * shares.abs().max()


def test_bad_ig_options():
    with pytest.raises(ValueError, match="ig must be"):
        ig.elementwise_coefficient("gelu", torch.ones(3), method="trapezoid")
    with pytest.raises(ValueError, match="ig_steps"):
        ig.elementwise_coefficient("gelu", torch.ones(3), method="riemann", steps=0)
