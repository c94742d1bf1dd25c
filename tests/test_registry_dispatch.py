"""The method registry is the one source of method facts; dispatch per primitive records what ran."""

import dataclasses

import pytest
import torch
from random_layers import KINDS, STRUCTURE_KINDS, random_layer

from kobattr.backends import BackendUnavailable, availability, select
from kobattr.backends.base import Attention
from kobattr.backends.torch_backend import TorchBackend
from kobattr.core import attribute
from kobattr.layer import STRUCTURE_NAMES
from kobattr.methods import PAPERS, REGISTRY, STRUCTURES, MethodSpec, _vector, form, methods_for
from kobattr.reference import reference

AVAILABLE = availability()


def _attention(layer):
    return Attention(q=layer.q, k=layer.k, valid=layer.valid, causal=layer.causal, window=layer.window,
                     scale=layer.softmax_scale, radius=layer.radius, softcap=layer.softcap)


def test_registry_is_consistent_with_the_layer_states_and_structures():
    states = {s: set(random_layer(kind).forward()) for s, kind in STRUCTURE_KINDS.items()}
    assert set(states) == set(STRUCTURES) == set(STRUCTURE_NAMES)
    assert all(random_layer(kind).structure == s for s, kind in STRUCTURE_KINDS.items())
    for name, spec in REGISTRY.items():
        assert spec.paper in PAPERS and spec.display
        for structure, f in spec.forms.items():
            assert structure in STRUCTURES
            if f.kind in ("vector", "ff") or f.target is not None:  # peers: where they decompose a state
                assert f.target in states[structure], (name, structure)
            if f.kind == "ff":
                assert f.ff_scope in (0, 1, 2) and name in STRUCTURES[structure].scopes
    for structure in STRUCTURES.values():
        assert set(structure.scopes) <= set(methods_for(structure.name))
        for before, after in [*structure.components.values(), structure.ff_amp]:
            assert before in structure.scopes and after in structure.scopes


def test_a_new_registry_entry_is_all_a_new_method_needs(monkeypatch):
    """One entry (here: attnres_n split by LN2 in a post-LN layer, i.e. a new vector form) and the
    implementation, the reference, the spot check and the ratios all follow."""
    entry = MethodSpec("attnres_ln2", "ATTNRES-LN2", "kobayashi2021", {"post": _vector(True, "y", "ln2")})
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    layer = random_layer("bert", N=9, pad=2)
    ref = reference(layer, methods=["attnres_ln2", "attnres_n"])
    res = attribute(layer, methods=["attnres_ln2"], backend="torch")
    torch.testing.assert_close(res.maps["attnres_ln2"], ref["maps"]["attnres_ln2"])
    torch.testing.assert_close(res.ratios["attnres_ln2"], ref["ratios"]["attnres_ln2"], equal_nan=True)
    assert res.spot_check["attnres_ln2"].max() < 1e-9
    # and it is not the same map as an existing method
    assert (ref["maps"]["attnres_ln2"] - ref["maps"]["attnres_n"]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", list(KINDS))
def test_backends_record_what_ran_per_primitive(kind):
    layer = random_layer(kind, N=6, dtype=torch.float32)
    res = attribute(layer, methods="all", backend="auto")
    expected_attention = "cpu" if AVAILABLE["cpu"] is None else "torch"
    # the peers' measures follow the attention maps' implementation (the Triton L1 kernel only with triton's)
    assert res.backends == {"attention_maps": expected_attention, "ff_maps": "torch", "peers": "torch"}
    only_attention = attribute(layer, methods=["attn_n"], backend="torch")
    assert only_attention.backends == {"attention_maps": "torch"}
    mixed = attribute(layer, methods="all", backend={"attention_maps": "torch", "ff_maps": "torch"})
    assert mixed.backends == {"attention_maps": "torch", "ff_maps": "torch", "peers": "torch"}


def test_float64_never_silently_goes_through_a_float32_kernel():
    layer = random_layer("bert", N=5, dtype=torch.float64)
    assert attribute(layer, methods=["attn_n"]).backends == {"attention_maps": "torch"}
    with pytest.raises(BackendUnavailable, match="float64"):
        attribute(layer, methods=["attn_n"], backend="triton")


def test_refusal_lists_every_reason():
    layer = random_layer("bert", N=5, dtype=torch.float64)
    many_heads = dataclasses.replace(_attention(layer), q=torch.zeros(1, 80, 5, 300, dtype=torch.float64),
                                     k=torch.zeros(1, 80, 5, 300, dtype=torch.float64))
    with pytest.raises(BackendUnavailable) as err:
        select("triton", "attention_maps", many_heads)
    message = str(err.value)
    for part in ("float64", "at most 64 heads", "head sizes up to 256"):
        assert part in message, message
    with pytest.raises(BackendUnavailable, match="cuda: .*(could not be imported|no CUDA device)"):
        select("cuda", "attention_maps", _attention(layer))


def test_auto_explains_when_nothing_fits():
    layer = random_layer("bert", N=5, dtype=torch.float32)
    meta = Attention(q=layer.q.to("meta"), k=layer.k.to("meta"), valid=layer.valid.to("meta"), causal=False,
                     window=0, scale=1.0)
    with pytest.raises(BackendUnavailable, match="no implementation can run attention_maps.*torch takes cpu or cuda"):
        select("auto", "attention_maps", meta)


def test_backend_argument_errors():
    layer = random_layer("bert", N=5)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        attribute(layer, backend="tpu")
    with pytest.raises(ValueError, match="primitives"):
        attribute(layer, backend={"attention": "torch"})


def test_a_name_applies_to_the_primitives_it_implements():
    if AVAILABLE["cpu"] is not None:
        pytest.skip(AVAILABLE["cpu"])
    layer = random_layer("gpt2", N=6, dtype=torch.float32)
    res = attribute(layer, methods="all", backend="cpu")
    assert res.backends == {"attention_maps": "cpu", "ff_maps": "torch", "peers": "torch"}
    assert isinstance(select("cpu", "ff_maps", _attention(layer)), TorchBackend)
    assert form("atblnff", "pre").primitive == "ff_maps"


def test_an_implementation_without_a_block_feature_is_skipped_with_its_reason(monkeypatch):
    layer = random_layer("llama", N=9, window=4, dtype=torch.float32)  # causal, windowed, GQA
    monkeypatch.setattr(TorchBackend, "features", frozenset({"causal", "gqa"}))
    with pytest.raises(BackendUnavailable, match="torch does not compute sliding-window attention"):
        attribute(layer, methods=["attn_n"], backend="torch")
    if AVAILABLE["cpu"] is None:  # auto passes over it to one that computes windows
        assert attribute(layer, methods=["attn_n"]).backends == {"attention_maps": "cpu"}
