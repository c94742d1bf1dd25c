"""The on-device tuner (kobattr/tuner.py) on the CPU: its candidates, the correctness gate, the cache and dispatch."""

import json

import pytest
import torch

from kobattr import tuner
from kobattr.backends import select
from kobattr.backends.compiled_backend import CompiledBackend
from kobattr.backends.torch_backend import TorchBackend
from kobattr.cli import main
from kobattr.core import attention_of, attribute, ff_shape
from kobattr.reference import reference
from kobattr.testing import random_layer

SMALL = 1 << 21


class FastWrong(CompiledBackend):
    """Planted: the C++ kernel's maps, 3% too large on the first half of each row's keys: as fast as the fastest
    candidate, and wrong."""

    def __init__(self):
        super().__init__("cpu")
        self.name = "fastwrong"

    def attention_maps(self, attn, grams, row_scale, **kwargs):
        maps, alpha = super().attention_maps(attn, grams, row_scale, **kwargs)
        maps[..., : maps.shape[-1] // 2] *= 1.03
        return maps, alpha


PLANTED = tuner.Candidate("fastwrong", factory=FastWrong)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory and an empty in-process memory; KOBATTR_TUNE set by each test."""
    monkeypatch.setenv("KOBATTR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuner, "_MEMO", {})
    return tmp_path / "tuning.json"


@pytest.fixture
def attn():
    return attention_of(random_layer("bert", N=40, B=1, dtype=torch.float32))


def test_candidates_are_the_implementations_with_their_tile_settings(monkeypatch):
    budgets = ["torch"] + [f"torch(budget={b})" for b in tuner.BUDGETS["cpu"]]
    assert [c.label for c in tuner.candidates("attention_maps", "cpu")] == ["cpu"] + budgets
    assert [c.label for c in tuner.candidates("ff_maps", "cpu")] == budgets  # the C++ kernel has no ff_maps
    assert [c.label for c in tuner.candidates("row_stats", "cpu")] == ["cpu", "torch"]  # neither triton on a CPU
    cuda = [c.label for c in tuner.candidates("ff_maps", "cuda")]
    assert cuda[0] == "torch" and cuda[-1] == "triton" and "cuda" not in cuda  # static order first
    built = tuner.candidates("ff_maps", "cpu")[1].build()
    assert isinstance(built, TorchBackend) and built.budget == tuner.BUDGETS["cpu"][0]
    # a new variant plugs in by registering a source
    monkeypatch.setattr(tuner, "_SOURCES", [])
    tuner.register_candidates(lambda primitive, device: [PLANTED] if primitive == "attention_maps" else [])
    assert tuner.candidates("attention_maps", "cpu")[-1] is PLANTED
    assert PLANTED not in tuner.candidates("ff_maps", "cpu")
    with pytest.raises(ValueError, match="no setting 'tile'"):
        tuner.Candidate("torch", (("tile", 4),)).build()


def test_the_gate_rejects_a_wrong_candidate_and_passes_the_right_ones(attn):
    verdicts = tuner._gate("attention_maps", {"cpu": CompiledBackend("cpu"), "fastwrong": FastWrong()},
                           tuner._gate_layer(tuner.workload("attention_maps", attn), attn, None), torch.float32)
    assert verdicts["cpu"] is None
    assert "over the tolerance" in verdicts["fastwrong"]


def test_a_fast_wrong_candidate_is_never_chosen(attn, cache, monkeypatch):
    pool = [tuner.Candidate("torch", (("budget", SMALL),)), PLANTED]
    # without the gate it would win: it is as fast as the C++ kernel, far faster than torch
    monkeypatch.setattr(tuner, "_gate", lambda primitive, impls, *args: {label: None for label in impls})
    assert tuner.tune("attention_maps", attn, pool=pool, save=False)["winner"]["backend"] == "fastwrong"
    monkeypatch.undo()
    monkeypatch.setattr(tuner, "_MEMO", {})
    entry = tuner.tune("attention_maps", attn, pool=pool, path=cache)
    assert entry["winner"]["label"] == f"torch(budget={SMALL})"
    assert "over the tolerance" in entry["rejected"]["fastwrong"] and "fastwrong" not in entry["seconds"]


def _plant_winner(attn, cache):
    """A cache entry whose winner (torch with a small budget) differs from the static rule's (cpu)."""
    entry = tuner.tune("attention_maps", attn, pool=[tuner.Candidate("torch", (("budget", SMALL),))], path=cache)
    tuner._MEMO.clear()
    return entry


def _no_tuning(monkeypatch):
    calls = []
    monkeypatch.setattr(tuner, "tune", lambda *args, **kwargs: calls.append(args) or tuner._MEMO.setdefault(
        tuner.key_text(tuner.workload(*args[:2])), None))
    return calls


def test_a_cache_hit_is_used_by_auto_dispatch_only(attn, cache, monkeypatch):
    _plant_winner(attn, cache)
    calls = _no_tuning(monkeypatch)
    monkeypatch.setenv("KOBATTR_TUNE", "1")
    impl = select("auto", "attention_maps", attn)
    assert isinstance(impl, TorchBackend) and impl.budget == SMALL and not calls
    assert select("cpu", "attention_maps", attn).name == "cpu"  # a named backend is never replaced
    layer = random_layer("bert", N=40, B=1, dtype=torch.float32)
    assert attribute(layer, methods=["attnresln_n"]).backends["attention_maps"] == "torch"
    monkeypatch.setenv("KOBATTR_TUNE", "0")  # the default: static rule, the cache is not even read
    tuner._MEMO.clear()
    assert select("auto", "attention_maps", attn).name == "cpu" and not calls


def test_a_miss_tunes_once_per_process(attn, cache, monkeypatch):
    monkeypatch.setenv("KOBATTR_TUNE", "1")
    seen = []
    real = tuner.tune
    monkeypatch.setattr(tuner, "tune", lambda *a, **k: seen.append(a[0]) or real(*a, **k))
    first = select("auto", "attention_maps", attn)
    second = select("auto", "attention_maps", attn)
    assert seen == ["attention_maps"] and first is second
    entries = json.loads(cache.read_text())["entries"]
    (key, entry), = entries.items()
    assert json.loads(key)["length_bucket"] == 64 and entry["winner"]["backend"] == first.name
    assert entry["env"] == tuner.environment() and set(entry["seconds"]) >= {"cpu"}


@pytest.mark.parametrize("damage", ["corrupt", "stale", "unknown settings", "malformed"])
def test_an_untrustworthy_cache_is_ignored_with_a_warning(attn, cache, monkeypatch, damage):
    _plant_winner(attn, cache)
    data = json.loads(cache.read_text())
    (key, entry), = data["entries"].items()
    if damage == "corrupt":
        cache.write_text('{"format": 1, "entries": {' + key[:20])
    else:
        if damage == "stale":
            entry["env"]["torch"] = "0.0.1"
        elif damage == "unknown settings":
            entry["winner"]["settings"] = [["budget", 12345]]
        else:
            del entry["winner"]["settings"]
        cache.write_text(json.dumps(data))
    calls = _no_tuning(monkeypatch)
    monkeypatch.setenv("KOBATTR_TUNE", "1")
    with pytest.warns(tuner.TuneCacheWarning, match="ignor"):
        impl = select("auto", "attention_maps", attn)
    assert impl.name == "cpu" and len(calls) == 1  # the static rule, and a miss that would tune again


def test_force_tunes_again_and_the_store_keeps_other_entries(attn, cache, monkeypatch):
    _plant_winner(attn, cache)
    other = dict(tuner.workload("attention_maps", attn), length_bucket=4096)
    tuner.store(other, dict(env=tuner.environment(), winner=None))
    calls = _no_tuning(monkeypatch)
    monkeypatch.setenv("KOBATTR_TUNE", "1")
    longer = attention_of(random_layer("bert", N=3000, B=1, D=8, F=8, dtype=torch.float32))
    assert select("auto", "attention_maps", longer).name == "cpu" and not calls  # tuned, nothing passed: static
    monkeypatch.setenv("KOBATTR_TUNE", "force")
    select("auto", "attention_maps", attn)
    assert len(calls) == 1
    assert len(json.loads(cache.read_text())["entries"]) == 2
    monkeypatch.setenv("KOBATTR_TUNE", "yes")
    with pytest.raises(ValueError, match="KOBATTR_TUNE must be 0, 1 or force"):
        select("auto", "attention_maps", attn)


def test_tuned_ff_maps_and_row_stats_match_the_reference(cache, monkeypatch):
    """With KOBATTR_TUNE=1 a layer is attributed by the winners, and its maps are still the reference's."""
    monkeypatch.setenv("KOBATTR_TUNE", "1")
    layer = random_layer("llama", N=30, B=1, pad=3, dtype=torch.float32)
    layer.head_outputs = None
    methods = ["attnresln_n", "atblnffres"]
    result = attribute(layer, methods=methods)
    ref = reference(layer, methods=methods)
    for m in methods:
        assert (result.maps[m] - ref["maps"][m].float()).abs().max() <= 1e-5 * ref["maps"][m].abs().max()
    keys = [json.loads(k) for k in json.loads(cache.read_text())["entries"]]
    assert sorted(k["primitive"] for k in keys) == ["attention_maps", "ff_maps"]
    ff_key = next(k for k in keys if k["primitive"] == "ff_maps")
    assert (ff_key["d_model"], ff_key["d_ff"], ff_key["gated"]) == ff_shape(layer)


def test_the_tune_command(cache, capsys):
    args = ["tune", "--device", "cpu", "--model", "bert-tiny", "--lengths", "40", "--primitives", "attention_maps,row_stats"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "attention_maps N <= 64" in out and out.count("winner:") == 2
    assert len(json.loads(cache.read_text())["entries"]) == 2
    assert main(args) == 0
    assert capsys.readouterr().out.count("cached winner") == 2
    assert main(["tune", "--primitives", "ff", "--model", "bert-tiny"]) == 2
    assert "unknown primitive(s) ff" in capsys.readouterr().err


def test_ff_maps_with_bfloat16_products_are_gated_at_that_precision(cache):
    layer = random_layer("bert", N=40, B=1, dtype=torch.float32)
    attn = attention_of(layer)
    assert tuner.workload("ff_maps", attn, torch.bfloat16, ff_shape(layer))["ff_gemm"] == "bfloat16"
    entry = tuner.tune("ff_maps", attn, torch.bfloat16, ff_shape(layer), save=False)
    assert entry["winner"]["backend"] == "torch" and not entry["rejected"]
    # the gate ran the bfloat16 products (an error far above float32's 1e-4), held to bfloat16's tolerance
    from kobattr.selftest import Outcome, _try

    exact = tuner._gate_layer(tuner.workload("ff_maps", attn, None, ff_shape(layer)), attn, ff_shape(layer))
    outcome = Outcome("torch", "ff_maps", "gate", "float32")
    _try(outcome, TorchBackend(), "ff_maps", exact.to(dtype=torch.float32), ["atbffresln"],
         reference(exact, methods="all"), torch.float32, None, torch.bfloat16)
    assert 1e-4 < outcome.error <= outcome.tolerance == 5e-2


def test_dispatch_takes_implementation_instances(attn):
    """What the tuner hands to dispatch: an instance with its settings, used for the primitives it implements."""
    from kobattr.backends.base import BackendUnavailable

    mine = TorchBackend(budget=SMALL)
    assert select(mine, "attention_maps", attn) is mine and select({"ff_maps": mine}, "ff_maps", attn) is mine
    assert select(CompiledBackend("cpu"), "ff_maps", attn).name == "torch"  # no ff_maps there: auto's choice
    exact = attention_of(random_layer("bert", N=12, B=1, dtype=torch.float64))
    with pytest.raises(BackendUnavailable, match="backend 'cpu' cannot run attention_maps"):
        select({"attention_maps": CompiledBackend("cpu")}, "attention_maps", exact)


class FullOnly(CompiledBackend):
    """A variant that writes full maps only (as a kernel without a rows= path would)."""

    def __init__(self):
        super().__init__("cpu")
        self.name = "fullonly"

    def attention_maps(self, attn, grams, row_scale, rows=None, weights=None, **kwargs):
        if rows is not None or weights is not None:
            raise NotImplementedError("full maps only")
        return super().attention_maps(attn, grams, row_scale, **kwargs)


def test_each_output_mode_is_its_own_workload_timed_in_that_mode(attn, cache):
    pool = [tuner.Candidate("fullonly", factory=FullOnly)]
    full = tuner.tune("attention_maps", attn, pool=pool, save=False)
    assert full["winner"]["label"] == "fullonly" and set(full["seconds"]) == {"fullonly"}  # timed whole
    for outputs in ({"rows"}, {"contract"}, {"rows", "contract"}):
        entry = tuner.tune("attention_maps", attn, pool=pool, save=False, outputs=frozenset(outputs))
        assert entry["winner"] is None and "full maps only" in entry["rejected"]["fullonly"]
        key = tuner.workload("attention_maps", attn, outputs=frozenset(outputs))
        assert key["outputs"] == sorted(outputs) and key != tuner.workload("attention_maps", attn)
    cpu = tuner.tune("attention_maps", attn, pool=[tuner.Candidate("cpu")], path=cache,
                     outputs=frozenset({"contract", "alpha"}))
    assert cpu["winner"]["label"] == "cpu"


def test_dispatch_asks_for_the_workload_of_its_output_mode(cache, monkeypatch):
    monkeypatch.setenv("KOBATTR_TUNE", "1")
    layer = random_layer("bert", N=30, B=1, dtype=torch.float32)
    attribute(layer, methods=["attnresln_n"], rows=[3, 7])
    attribute(layer, methods=["attn_n"], heads=True)
    modes = sorted(tuple(json.loads(k)["outputs"]) for k in json.loads(cache.read_text())["entries"])
    assert modes == [("alpha",), ("rows",)]


class WrongOffTheFullMap(CompiledBackend):
    """Right on full maps, 3% off on rows= or contractions: what a gate of full maps alone would let through."""

    def __init__(self):
        super().__init__("cpu")
        self.name = "partlywrong"

    def attention_maps(self, attn, grams, row_scale, rows=None, weights=None, **kwargs):
        maps, alpha = super().attention_maps(attn, grams, row_scale, rows=rows, weights=weights, **kwargs)
        return (maps * 1.03 if rows is not None or weights is not None else maps), alpha


def test_the_gate_checks_the_workloads_output_mode(attn):
    pool = [tuner.Candidate("partlywrong", factory=WrongOffTheFullMap)]
    assert tuner.tune("attention_maps", attn, pool=pool, save=False)["winner"]["label"] == "partlywrong"
    for outputs in ({"rows"}, {"contract"}, {"rows", "contract"}):
        entry = tuner.tune("attention_maps", attn, pool=pool, save=False, outputs=frozenset(outputs))
        assert entry["winner"] is None and "over the tolerance" in entry["rejected"]["partlywrong"], outputs
