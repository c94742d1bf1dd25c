"""Spot checks: sampled rows of every returned map recomputed by the reference; a broken kernel is caught."""

import pytest
import torch
from random_layers import random_layer

from kobattr.backends.torch_backend import TorchBackend
from kobattr.core import attribute
from kobattr.verify import TOLERANCES, VerificationError, row_errors, sample_rows, tolerance


def _corrupt(monkeypatch, primitive, factor=1.01, row=None):
    """Make the torch implementation of ``primitive`` return slightly wrong numbers (all rows, or one)."""
    original = getattr(TorchBackend, primitive)

    def broken(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        out = result[0] if isinstance(result, tuple) else result
        target = out[:, :, :, 1] if row is None else out[:, :, row]
        target.mul_(factor)
        return result

    monkeypatch.setattr(TorchBackend, primitive, broken)


def test_spot_check_is_recorded_per_method_and_text():
    layer = random_layer("llama", N=12, pad=3, dtype=torch.float32)
    res = attribute(layer, methods="all", heads=True, backend="torch")
    assert set(res.spot_check) == set(res.methods)
    for m, err in res.spot_check.items():
        assert err.shape == (2,) and err.dtype == torch.float64
        assert 0 < err.max() < 1e-5, m  # float32 rounding is seen, and it is small
    assert attribute(layer, methods="all", backend="torch", verify=0).spot_check == {}


@pytest.mark.parametrize("primitive,method", [("attention_maps", "attnresln_n"), ("ff_maps", "atbffresln")])
@pytest.mark.parametrize("mode", ["full", "rows", "contract"])
def test_a_wrong_implementation_is_caught_and_named(monkeypatch, primitive, method, mode):
    layer = random_layer("bert", N=10, pad=2, dtype=torch.float32)
    _corrupt(monkeypatch, primitive)
    kwargs = {"full": {}, "rows": {"rows": [1, 4, 6]}, "contract": {"contract": torch.rand(3, 10)}}[mode]
    with pytest.raises(VerificationError, match=rf"{method} from implementation 'torch' \({primitive}\)"):
        attribute(layer, methods=[method], backend="torch", **kwargs)
    attribute(layer, methods=[method], backend="torch", verify=0, **kwargs)  # unchecked, it goes through


def test_one_wrong_row_is_caught_when_every_row_is_sampled(monkeypatch):
    layer = random_layer("gpt2", N=8, B=1, dtype=torch.float64)
    _corrupt(monkeypatch, "attention_maps", factor=1 + 1e-7, row=5)
    with pytest.raises(VerificationError, match=r"attn_n .* by (1.00e-07|9.9\de-08) .*tolerance for float64 is 1e-09"):
        attribute(layer, methods=["attn_n"], backend="torch", verify=8)


def test_wrong_head_maps_are_caught(monkeypatch):
    layer = random_layer("bert", N=6, dtype=torch.float32)
    original = TorchBackend.attention_maps

    def wrong_alpha(self, *args, **kwargs):
        out, alpha = original(self, *args, **kwargs)
        return out, None if alpha is None else alpha.roll(1, dims=-1)

    monkeypatch.setattr(TorchBackend, "attention_maps", wrong_alpha)
    with pytest.raises(VerificationError, match="attn_w"):
        attribute(layer, methods=["attn_w"], heads=True, backend="torch")


def test_sampling_is_seeded_and_prefers_real_tokens():
    valid = torch.tensor([True] * 5 + [False] * 5)
    candidates = torch.arange(10)
    a = sample_rows(candidates, valid, 3, seed=7)
    assert torch.equal(a, sample_rows(candidates, valid, 3, seed=7))
    assert len(a) == 3 and (a < 5).all()
    draws = {tuple(sample_rows(candidates, valid, 2, seed=s).tolist()) for s in range(20)}
    assert len(draws) > 3  # different seeds (layers, texts) look at different rows
    assert len(sample_rows(candidates, valid, 50, seed=0)) == 5


def test_row_error_definition():
    ref = torch.tensor([[1.0, -4.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    got = torch.tensor([[1.0, -3.0, 2.5], [0.0, 0.0, 0.0], [0.0, 1e-3, 0.0]])
    errors = row_errors(got, ref)
    assert errors[0].item() == pytest.approx(0.25)
    assert errors[1].item() == 0.0 and errors[2].item() == float("inf")


def test_tolerances():
    assert tolerance(torch.float32) == TOLERANCES["float32"] == 1e-4
    assert tolerance(torch.float32, tf32=True) == 5e-3
    assert tolerance(torch.float64) == 1e-9 and tolerance(torch.bfloat16) == 5e-2 and tolerance(torch.float16) == 2e-2


def test_analyze_checks_every_layer_and_text(monkeypatch):
    from test_models import tiny_model, token_batch

    from kobattr.api import analyze

    model, batch = tiny_model("llama"), token_batch("llama", [7, 4])
    res = analyze(model, batch, methods="all", backend="torch")
    assert set(res.spot_check) == set(res.methods)
    for err in res.spot_check.values():
        assert err.shape == (2, 2) and 0 < err.max() < 1e-5
    assert res.backends == [{"attention_maps": "torch", "ff_maps": "torch"}] * 2  # full maps: no row_stats pass
    _corrupt(monkeypatch, "ff_maps")
    with pytest.raises(VerificationError, match=r"layer 0: spot check failed: atblnff"):
        analyze(model, batch, methods="all", backend="torch")
