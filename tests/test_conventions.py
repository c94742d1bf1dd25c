"""The map conventions of issue 24: attn_n_prenorm (the 2020 ATTN-N before the norm after attention), and the
decoder self-attention's attnres_w and pre-LN attnresln_n (tests/test_seq2seq.py checks those against the reference
and the model's own norm outputs)."""

import pytest
import torch
from random_layers import random_layer
from test_models import EAGER_ONLY, collect, tiny_model, token_batch

from kobattr.core import attribute
from kobattr.methods import check_methods, methods_for
from kobattr.models import get_adapter
from kobattr.reference import reference

PRENORM_KINDS = ["gemma2", "sandwich_ln", "olmo2", "post_only_ln"]  # sandwich and post_only layers


def close(got, expected, rtol, what):
    scale = expected.abs().max()
    assert (got.double() - expected.double()).abs().max() <= rtol * scale, what


@pytest.mark.parametrize("kind", PRENORM_KINDS)
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("torch", torch.float32), ("cpu", torch.float32),
                                           ("triton", torch.float32)])
def test_attn_n_prenorm_equals_the_reference(kind, backend, dtype):
    """||a_ij|| = ||sum_h alpha^h_ij f^h(x_j)|| before P1, its mixing ratio, bias and per-head alpha^h_ij ||f^h(x_j)||;
    attn_n (after P1) stays what it was, and the two differ."""
    layer = random_layer(kind, N=11, pad=3, window=6, dtype=dtype)
    ref = reference(layer, methods=["attn_n", "attn_n_prenorm"])
    res = attribute(layer, methods=["attn_n", "attn_n_prenorm"], heads=True, backend=backend)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    m = "attn_n_prenorm"
    close(res.maps[m], ref["maps"][m], rtol, "map")
    close(res.head_maps[m], ref["head_maps"][m], rtol, "heads")
    assert torch.equal(res.ratios[m].isnan(), ref["ratios"][m].isnan())
    close(res.ratios[m].nan_to_num(0), ref["ratios"][m].nan_to_num(0), rtol, "ratio")
    close(res.bias_norms[m], ref["bias"][m].norm(dim=-1), rtol, "bias")
    # the plain 2020 definition, from the reference's alpha and value vectors
    alpha, f = ref["alpha"], torch.einsum("bhjd,hde->bjhe", layer.v.double().repeat_interleave(
        layer.n_heads // layer.n_kv_heads, 1), layer.w_o.double())
    literal = torch.einsum("bhij,bjhe->bije", alpha.double(), f).norm(dim=-1) * layer.valid[:, :, None]
    close(res.maps[m], literal, rtol, "literal definition")
    assert (res.maps[m] - res.maps["attn_n"]).abs().max() > 0.1 * res.maps[m].abs().max()


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "olmo2"])
def test_attn_n_prenorm_sums_to_the_models_attention_output_before_its_norm(family):
    """Completeness against the model: the pre-norm parts plus b_O are the output of o_proj, what the norm after
    attention (post_attention_layernorm) reads; attn_n's are that norm's output."""
    model = tiny_model(family).double()
    batch = token_batch(family, [7, 5])
    block = get_adapter(model).layer_modules(model)[1]
    seen = {}
    handle = block.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.update(raw=a[0], normed=o))
    try:
        layer = collect(model, batch, layers=[1])[1]
    finally:
        handle.remove()
    ref = reference(layer, methods=["attn_n", "attn_n_prenorm"])
    valid = layer.valid
    # Hugging Face runs the eager softmax (Gemma 2 has no SDPA) and every RMSNorm in float32 inside a float64 model
    softmax_tol = 1e-6 if family in EAGER_ONLY else 1e-12
    close(ref["total"]["attn_n_prenorm"][valid], seen["raw"][valid], softmax_tol, "before the norm")
    close(ref["total"]["attn_n"][valid], seen["normed"][valid], 1e-6, "after the norm")
    res = attribute(layer, methods=["attn_n_prenorm"], heads=True, backend="torch")  # the spot check passes
    close(res.maps["attn_n_prenorm"], ref["maps"]["attn_n_prenorm"], 1e-12, "map")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "pythia"])
def test_attn_n_prenorm_is_refused_where_no_norm_follows_attention(kind):
    """There attn_n is already the quantity before any norm; asking names the structures that have it."""
    layer = random_layer(kind)
    assert "attn_n_prenorm" not in methods_for(layer.structure)
    with pytest.raises(ValueError, match=r"unknown method 'attn_n_prenorm' .*defined for sandwich, post_only layers"):
        check_methods("attn_n_prenorm", layer.structure)
    assert "attn_n_prenorm" in check_methods("all", "sandwich") and "attn_n_prenorm" in check_methods("all", "post_only")
