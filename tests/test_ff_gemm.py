"""attribute(ff_gemm=...): the FF methods' W_2 products in 16-bit inputs with float32 sums, by default for 16-bit
models ("auto"). Held to the flash-attention rule against the float64 reference: at most twice the error of the
reference computed in that dtype on the same (rounded) layer. And the FF pairs as rows of one GEMM: the work
list of visible tiles, the pair batch from budget=, the Triton prologue (triton_gemm)."""

import pytest
import torch

from kobattr.backends import BackendUnavailable, availability, implementation, select
from kobattr.backends.base import visible_block
from kobattr.backends.torch_backend import TorchBackend
from kobattr.core import attention_of, attribute
from kobattr.layer import LayerInputError
from kobattr.methods import ff_methods
from kobattr.reference import reference
from kobattr.testing import random_layer
from kobattr.verify import row_errors

KINDS = ["bert", "gpt2", "pythia", "llama", "sandwich_ln", "post_only_ln"]  # every block structure, GQA, gated


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_products_within_twice_the_bfloat16_reference(kind):
    exact = random_layer(kind, dtype=torch.float64, N=24, pad=3)
    layer = exact.to(dtype=torch.float32)
    methods = ff_methods(attribute(layer, methods="all", verify=0).methods, layer.structure)
    ref = reference(exact, methods=methods)["maps"]
    low = reference(exact.to(dtype=torch.bfloat16), methods=methods)["maps"]
    fp32 = attribute(layer, methods=methods, verify=2)
    bf16 = attribute(layer, methods=methods, verify=2, ff_gemm="bfloat16")  # spot checks at the bf16 tolerance
    assert bf16.backends["ff_maps"] == "torch"
    for m in methods:
        err = float(row_errors(bf16.maps[m], ref[m]).max())
        assert err <= 2 * float(row_errors(low[m], ref[m]).max()), m
        assert err > 10 * float(row_errors(fp32.maps[m], ref[m]).max()), m  # the option took effect


def test_bad_ff_gemm_gets_a_clear_error():
    layer = random_layer("bert", dtype=torch.float32, N=9)
    with pytest.raises(LayerInputError, match="ff_gemm must be one of auto, float32, bfloat16, float16, tf32"):
        attribute(layer, methods=["atbff"], ff_gemm="fp8")
    with pytest.raises(LayerInputError, match="float64 layer"):
        attribute(layer.to(dtype=torch.float64), methods=["atbff"], ff_gemm="bfloat16")
    with pytest.raises(BackendUnavailable, match="triton computes the FF products with W_2 in its own precision, "
                                                 "not bfloat16"):
        attribute(layer, methods=["atbff"], ff_gemm="bfloat16", backend={"ff_maps": "triton"})


def test_dispatch_routes_ff_gemm_to_an_implementation_that_takes_it():
    """auto dispatch skips the implementations without the option (their reason says why); naming one of them
    fails with that reason."""
    attn = attention_of(random_layer("llama", dtype=torch.float32, N=9))
    assert select("auto", "ff_maps", attn, torch.bfloat16).name == "torch"
    assert select("cpu", "ff_maps", attn, torch.bfloat16).name == "torch"  # cpu has no ff_maps: auto's choice
    triton = implementation("triton")
    if not isinstance(triton, str):
        assert any("not bfloat16 (ff_gemm)" in r for r in triton.refusals("ff_maps", attn, torch.bfloat16))
        assert not any("ff_gemm" in r for r in triton.refusals("ff_maps", attn))
        with pytest.raises(BackendUnavailable, match="backend 'triton' cannot run ff_maps"):
            select("triton", "ff_maps", attn, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_auto_follows_a_16_bit_model(kind, dtype):
    """A 16-bit layer's FF products run in its own dtype by default, within twice the error of the reference
    computed in that dtype; ff_gemm="float32" keeps the float32 products."""
    exact = random_layer(kind, dtype=torch.float64, N=20, pad=2)
    layer = exact.to(dtype=dtype)
    methods = ff_methods(attribute(layer, methods="all", verify=0).methods, layer.structure)
    ref = reference(exact, methods=methods)["maps"]
    low = reference(layer, methods=methods)["maps"]
    auto = attribute(layer, methods=methods, verify=2)
    fp32 = attribute(layer, methods=methods, verify=2, ff_gemm="float32")
    for m in methods:
        err = float(row_errors(auto.maps[m], ref[m]).max())
        assert err <= 2 * float(row_errors(low[m], ref[m]).max()), m
        assert not torch.equal(auto.maps[m], fp32.maps[m]), m  # the 16-bit products ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_keeps_float32_and_float64(dtype):
    layer = random_layer("llama", dtype=dtype, N=12, pad=2)
    auto = attribute(layer, methods=["atblnffres"], verify=0)
    for m, t in auto.maps.items():
        assert t.dtype == dtype
        assert torch.equal(t, attribute(layer, methods=["atblnffres"], verify=0, ff_gemm="float32").maps[m])


def test_tf32_is_refused_off_cuda():
    layer = random_layer("bert", dtype=torch.float32, N=9)
    with pytest.raises(BackendUnavailable, match="TF32 products on CUDA tensors only"):
        attribute(layer, methods=["atbff"], ff_gemm="tf32", backend={"ff_maps": "torch"})


class Recorder(TorchBackend):
    """The torch ff_maps, recording the tiles its prologue ran and the pairs per tile it was given."""

    def ff_tiles(self, attn, rows, pairs, keys=None):
        self.pairs = pairs
        return super().ff_tiles(attn, rows, pairs, keys)

    def ff_prologue(self, attn, p, rows, cols, lse, vis, *args):
        self.ran.append((rows.clone(), cols.clone(), bool(vis.any())))
        return super().ff_prologue(attn, p, rows, cols, lse, vis, *args)


@pytest.mark.parametrize("kind,kw", [("gpt2", dict(N=40)), ("llama", dict(N=37, window=9, pad=3))])
def test_work_list_skips_every_invisible_tile(kind, kw, monkeypatch):
    """Causal and windowed layers: every tile the prologue runs holds a visible pair, every visible pair lies in
    exactly one of them, and the maps equal the reference; a budget of about 100 pairs per tile makes many."""
    layer = random_layer(kind, dtype=torch.float32, **kw)
    F, D = layer.ffn.w_out.shape
    rec = Recorder(budget=2 * layer.q.shape[0] * 100 * max(F, D))
    rec.ran = []
    methods = ff_methods(attribute(layer, methods="all", verify=0).methods, layer.structure)
    monkeypatch.setattr("kobattr.backends.implementation", lambda name, budget=None: rec)
    res = attribute(layer, methods=methods, backend={"ff_maps": "torch"}, verify=0)
    ref = reference(layer, methods=methods)["maps"]
    for m in methods:
        assert float(row_errors(res.maps[m], ref[m]).max()) < 1e-5, m
    N = layer.q.shape[2]
    assert rec.pairs == 100 and len(rec.ran) > 4
    attn = attention_of(layer)
    covered = torch.zeros(layer.q.shape[0], N, N, dtype=torch.int64)
    for rows, cols, any_visible in rec.ran:
        assert any_visible
        covered[:, rows[:, None], cols[None, :]] += 1
    everything = torch.arange(N)
    vis = visible_block(attn, everything, everything)
    assert covered[vis].eq(1).all()
    assert len(rec.ran) < len(TorchBackend(budget=rec.budget).ff_tiles(attention_of(
        random_layer("bert", dtype=torch.float32, N=N)), everything, 100))  # fewer tiles than a full map


def test_budget_reaches_every_implementation():
    attn = attention_of(random_layer("llama", dtype=torch.float32, N=9))
    for name, reason in availability().items():
        if reason is None:
            assert implementation(name, budget=1234).budget == 1234, name
    assert select("auto", "ff_maps", attn, budget=99).budget == 99
    with pytest.raises(LayerInputError, match="budget must be a positive number"):
        attribute(random_layer("bert", dtype=torch.float32, N=5), methods=["atbff"], budget=0)


# (kind, options, pairs per tile: None = the default, one 32 x 32 tile whose prologue skips its invisible sub-tiles)
TRITON_GEMM_CASES = [("llama", dict(N=13, window=6, pad=3), 30), ("gemma2", dict(N=10, pad=2, softcap=1.5), 30),
                     ("post_geglu", dict(N=9), 30), ("sandwich_ln", dict(N=9, radius=2), 30),
                     ("gpt2", dict(N=40), None), ("bert", dict(N=11, pad=2), 30)]


@pytest.mark.parametrize("kind,kw,pairs", TRITON_GEMM_CASES, ids=[c[0] for c in TRITON_GEMM_CASES])
def test_triton_gemm_matches_the_reference(kind, kw, pairs):
    """triton_gemm's FF maps (the Triton prologue and epilogue interpreted) against the reference, in float32
    (1e-5) and with bfloat16 products (the flash-attention rule), on tiles of a few pairs and on one large causal
    tile."""
    if availability()["triton_gemm"] is not None:
        pytest.skip(availability()["triton_gemm"])
    exact = random_layer(kind, dtype=torch.float64, **kw)
    layer = exact.to(dtype=torch.float32)
    methods = ff_methods(attribute(layer, methods="all", verify=0).methods, layer.structure)
    ref = reference(exact, methods=methods)["maps"]
    low = reference(exact.to(dtype=torch.bfloat16), methods=methods)["maps"]
    F, D = layer.ffn.w_out.shape
    small = None if pairs is None else 2 * layer.q.shape[0] * pairs * max(F, D)  # several tiles, diagonal ones too
    fp32 = attribute(layer, methods=methods, backend={"ff_maps": "triton_gemm"}, budget=small, verify=0)
    bf16 = attribute(layer, methods=methods, backend={"ff_maps": "triton_gemm"}, budget=small, ff_gemm="bfloat16")
    assert fp32.backends["ff_maps"] == bf16.backends["ff_maps"] == "triton_gemm"
    for m in methods:
        assert float(row_errors(fp32.maps[m], ref[m]).max()) < 1e-5, m
        assert float(row_errors(bf16.maps[m], ref[m]).max()) <= 2 * float(row_errors(low[m], ref[m]).max()), m


def test_auto_keeps_float32_products_on_an_implementation_without_16_bit_ones():
    """backend="triton" (its fused FF kernel computes in float32) on a bfloat16 layer: "auto" falls back to the
    float32 products there, where a named ff_gemm="bfloat16" is refused."""
    if availability()["triton"] is not None:
        pytest.skip(availability()["triton"])
    layer = random_layer("llama", dtype=torch.bfloat16, N=9)
    auto = attribute(layer, methods=["atblnffres"], backend={"ff_maps": "triton"})
    fp32 = attribute(layer, methods=["atblnffres"], backend={"ff_maps": "triton"}, ff_gemm="float32")
    assert auto.backends["ff_maps"] == "triton"
    assert torch.equal(auto.maps["atblnffres"], fp32.maps["atblnffres"])
    with pytest.raises(BackendUnavailable, match="not bfloat16"):
        attribute(layer, methods=["atblnffres"], backend={"ff_maps": "triton"}, ff_gemm="bfloat16")


def test_cuda_tiles_take_a_share_of_the_free_memory(monkeypatch):
    """On CUDA the pairs per tile come from torch.cuda.mem_get_info (CUDA_MEMORY_SHARE of the free memory), far
    beyond the CPU's cache tile; an explicit budget caps them."""
    from kobattr.backends import torch_backend

    free = 64 * 2 ** 30  # an H100 after the model
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    cuda, F, D = torch.device("cuda"), 11008, 4096
    per_pair = F * (8 + 2 * 2) + 6 * D * 4
    pairs = TorchBackend().ff_pairs(cuda, 1, F, D, 2)
    assert pairs == int(free * torch_backend.CUDA_MEMORY_SHARE) // per_pair
    assert pairs > 100 * TorchBackend().ff_pairs(torch.device("cpu"), 1, F, D, 2)
    assert TorchBackend(budget=2 * 1000 * F).ff_pairs(cuda, 1, F, D, 2) == 1000
    # a key block's parts stay within CUDA_PARTS_SHARE: (H+1) (2 F + 2 D) float32 per key
    assert TorchBackend().ff_keys(cuda, 1, 32, F, D) == int(free * torch_backend.CUDA_PARTS_SHARE) // (33 * 30208 * 4)
    assert TorchBackend().ff_keys(torch.device("cpu"), 1, 32, F, D) is None


def test_few_rows_take_long_key_blocks_within_the_key_cap():
    """rows= of a few rows: the pairs of a tile go to its keys, never past the key cap."""
    attn = attention_of(random_layer("bert", dtype=torch.float32, N=40))
    rows = torch.tensor([3, 30])
    tiles = TorchBackend().ff_tiles(attn, rows, pairs=60, keys=None)
    assert {(r0, r1) for r0, r1, _, _ in tiles} == {(0, 2)} and max(c1 - c0 for *_, c0, c1 in tiles) == 30
    capped = TorchBackend().ff_tiles(attn, rows, pairs=60, keys=7)
    assert max(c1 - c0 for *_, c0, c1 in capped) == 7 and capped[-1][3] == 40
