"""Every backend that can run here against the materialising reference, end to end through attribute().

The triton backend runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it), so the
small shapes here are enough; cuda needs a GPU and is skipped with its reason otherwise.
"""

import dataclasses
import functools

import pytest
import torch
from random_layers import random_layer

from kobattr.backends import BACKEND_NAMES, BackendUnavailable, availability, implementation, select
from kobattr.backends.base import Attention
from kobattr.core import attribute
from kobattr.reference import reference

AVAILABLE = availability()
CASES = [("bert", dict(N=7, pad=2)), ("gpt2", dict(N=9)), ("llama", dict(N=11, window=4, pad=3)),
         ("post_geglu", dict(N=5)),
         # the other block structures: norms after attention / FFN folded into rows, scales and W_out
         ("gemma2", dict(N=9, pad=2, softcap=1.5)), ("olmo2", dict(N=8)), ("pythia", dict(N=9, pad=2)),
         ("sandwich_ln", dict(N=7, radius=2))]


def _skip_unless_available(name):
    if AVAILABLE[name] is not None:
        pytest.skip(f"{name}: {AVAILABLE[name]}")


@pytest.mark.parametrize("name", [b for b in BACKEND_NAMES if b != "torch"])
@pytest.mark.parametrize("kind,kw", CASES, ids=[c[0] for c in CASES])
def test_backend_matches_reference(name, kind, kw):
    _skip_unless_available(name)
    layer = random_layer(kind, dtype=torch.float32, **kw)
    ref = reference(layer, methods="all")
    try:
        res = attribute(layer, methods="all", heads=True, backend=name)
    except BackendUnavailable as err:
        pytest.skip(str(err))
    for primitive in ("attention_maps", "ff_maps"):  # a name runs the primitives it implements
        if primitive in implementation(name).primitives:
            assert res.backends[primitive] == name, primitive
    if "ff_maps" not in implementation(name).primitives:
        assert res.backends["ff_maps"] == "torch"
    for m in res.methods:
        expected = ref["maps"][m].float()
        err = ((res.maps[m] - expected).abs().max() / expected.abs().max()).item()
        assert err < 1e-5, (name, m, err)
    torch.testing.assert_close(res.head_maps["attn_w"], ref["head_maps"]["attn_w"].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [b for b in BACKEND_NAMES if b != "torch"])
def test_backend_output_modes_match_reference(name):
    _skip_unless_available(name)
    layer = random_layer("llama", N=13, pad=2, dtype=torch.float32)
    ref = reference(layer, methods="all")
    rows = [0, 12, 4]
    weights = torch.rand(2, 2, 13)
    try:
        picked = attribute(layer, methods="all", rows=rows, backend=name)
        contracted = attribute(layer, methods="all", contract=weights, normalize_rows=True, backend=name)
        picked_contracted = attribute(layer, methods="all", rows=rows, contract=weights, backend=name)
    except BackendUnavailable as err:
        pytest.skip(str(err))
    for m in picked.methods:
        full = ref["maps"][m].float()
        torch.testing.assert_close(picked.maps[m], full[:, rows], rtol=1e-5, atol=1e-6)
        normed = full / full.sum(-1, keepdim=True).clamp_min(1e-30)
        torch.testing.assert_close(contracted.maps[m], weights @ normed, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(picked_contracted.maps[m], weights[:, :, rows] @ full[:, rows], rtol=1e-5, atol=1e-5)


# (kind, random_layer options, block features): ModernBERT-style local attention (radius alone), Gemma 2-style
# soft-capping (softcap alone) and both with causal, window, padding and GQA; soft-caps of 0.5 against logits
# of standard deviation about 1 change every map by more than 5 %
FEATURE_CASES = [("bert", dict(N=11, pad=2), dict(radius=3)), ("gpt2", dict(N=9), dict(softcap=0.5)),
                 ("llama", dict(N=11, window=6, pad=3), dict(radius=2, softcap=0.5))]


@functools.lru_cache(maxsize=None)
def _feature_case(index):
    """(layer, its reference, the reference without the features), shared by every backend."""
    kind, kw, features = FEATURE_CASES[index]
    plain = random_layer(kind, dtype=torch.float32, **kw)
    layer = dataclasses.replace(plain, **features)
    return layer, reference(layer, methods="all"), reference(plain, methods="all")


@pytest.mark.parametrize("name", BACKEND_NAMES)
@pytest.mark.parametrize("case", range(len(FEATURE_CASES)), ids=[c[0] for c in FEATURE_CASES])
def test_radius_and_softcap_match_reference(name, case):
    _skip_unless_available(name)
    layer, ref, ref_plain = _feature_case(case)
    N = layer.q.shape[2]
    rows = [0, N - 1, 4, 4]
    weights = torch.rand(2, 2, N, generator=torch.Generator().manual_seed(3))
    try:
        res = attribute(layer, methods="all", heads=True, backend=name)
        contracted = attribute(layer, methods="all", rows=rows, contract=weights, normalize_rows=True, backend=name)
    except BackendUnavailable as err:
        pytest.skip(str(err))
    assert name in (res.backends["attention_maps"], res.backends["ff_maps"])
    for m in res.methods:
        expected = ref["maps"][m].float()
        scale = expected.abs().max()
        assert (res.maps[m] - expected).abs().max() / scale < 1e-5, m
        assert (ref_plain["maps"][m].float() - expected).abs().max() / scale > 0.05, m  # the features matter
        picked = expected[:, rows]
        normed = picked / picked.sum(-1, keepdim=True).clamp_min(1e-30)
        torch.testing.assert_close(contracted.maps[m], weights[:, :, rows] @ normed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.head_maps["attn_w"], ref["head_maps"]["attn_w"].float(), rtol=1e-5, atol=1e-6)


def test_auto_prefers_a_compiled_backend_on_cpu_tensors_only_if_available():
    layer = random_layer("bert", dtype=torch.float32)
    attn = Attention(q=layer.q, k=layer.k, valid=layer.valid, causal=False, window=0, scale=layer.softmax_scale)
    chosen = select("auto", "attention_maps", attn)
    assert chosen.name == ("cpu" if AVAILABLE["cpu"] is None else "torch")
    assert select("auto", "ff_maps", attn).name == "torch"


def test_explicit_unavailable_backend_says_why():
    layer = random_layer("bert", dtype=torch.float32)
    attn = Attention(q=layer.q, k=layer.k, valid=layer.valid, causal=False, window=0, scale=layer.softmax_scale)
    with pytest.raises(BackendUnavailable, match="cuda"):
        select("cuda", "attention_maps", attn)
    with pytest.raises(ValueError, match="unknown backend"):
        select("tpu", "attention_maps", attn)


# (kind, random_layer options): N = 13..17 spans 4..5 ff_maps launches of 4 keys each
STREAM_LAYERS = [("llama", dict(N=13, window=6, pad=3)), ("gemma2", dict(N=14, pad=2, softcap=1.5)),
                 ("bert", dict(N=17, pad=2))]


@pytest.mark.parametrize("kind,kw", STREAM_LAYERS, ids=[c[0] for c in STREAM_LAYERS])
def test_triton_ff_maps_stream_key_blocks(kind, kw, monkeypatch):
    """The triton ff_maps run over blocks of one key tile made on demand (never materialised) equals the
    torch backend on every FF method, in every output mode."""
    _skip_unless_available("triton")
    from kobattr.backends.base import FFParts
    from kobattr.backends.triton_backend import TritonBackend
    from kobattr.kernels.ff_pairs import ff_settings
    from kobattr.methods import ff_methods

    layer = random_layer(kind, dtype=torch.float32, **kw)
    N = layer.q.shape[2]
    tile = ff_settings(layer.n_heads)["BLOCK_N"]  # blocks start on key tiles: the smallest block is one tile
    methods = ff_methods(attribute(layer, methods="all", backend="torch").methods, layer.structure)
    assert methods
    rows = [0, N - 1, 5]
    weights = torch.rand(2, 2, N, generator=torch.Generator().manual_seed(4))
    modes = [dict(), dict(rows=rows), dict(contract=weights), dict(contract=weights, normalize_rows=True),
             dict(rows=rows, contract=weights, normalize_rows=True)]
    expected = [attribute(layer, methods=methods, backend="torch", **mode) for mode in modes]

    asked = []
    block = FFParts.block

    def recorded(self, keys):
        asked.append(keys.stop - keys.start)
        return block(self, keys)

    def refuse(self):
        raise AssertionError("the triton ff_maps must not materialise every key's parts")

    monkeypatch.setattr(TritonBackend, "key_block_size", tile)
    monkeypatch.setattr(FFParts, "block", recorded)
    monkeypatch.setattr(FFParts, "materialised", refuse)
    for mode, ref in zip(modes, expected):
        asked.clear()
        res = attribute(layer, methods=methods, backend="triton", **mode)
        assert res.backends["ff_maps"] == "triton"
        assert len(asked) >= -(-N // tile) >= 2 and max(asked) <= tile, asked
        for m in methods:
            scale = ref.maps[m].abs().max()
            assert (res.maps[m] - ref.maps[m]).abs().max() / scale < 1e-5, (mode.keys(), m)
