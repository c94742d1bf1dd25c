"""attribute(ff_gemm="bfloat16"): the FF methods' W_2 products take bfloat16 inputs with float32 sums. Held to the
flash-attention rule against the float64 reference: at most twice the error of the reference computed in
bfloat16 on the same (rounded) layer."""

import pytest
import torch

from kobattr.backends import BackendUnavailable, implementation, select
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
    with pytest.raises(LayerInputError, match="ff_gemm must be one of float32, bfloat16"):
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
