"""`kobattr selftest`: passes on this machine, and fails (exit status 1) when an implementation is wrong."""

import json

import torch

from kobattr import selftest
from kobattr.backends.torch_backend import TorchBackend
from kobattr.cli import main as cli_main
from kobattr.methods import STRUCTURES
from kobattr.verify import tolerance


def test_every_structure_and_feature_passes_on_this_machine(tmp_path, capsys):
    assert cli_main(["selftest", "--backends", "torch,cpu", "--json", str(tmp_path / "self.json")]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("PASS") and "torch" in out and "ff_maps" in out
    outcomes = json.loads((tmp_path / "self.json").read_text())["outcomes"]
    cases = {o["case"].split("/")[0] for o in outcomes}
    assert cases == set(STRUCTURES)  # every block structure is tried
    ran = [o for o in outcomes if o["skipped"] is None]
    assert ran and all(o["error"] <= o["tolerance"] for o in ran)


def test_a_wrong_implementation_fails_and_a_declined_input_is_skipped(monkeypatch, capsys):
    real = TorchBackend.ff_maps

    def off_by_a_little(self, attn, parts, *args, **kwargs):
        return real(self, attn, parts, *args, **kwargs) * 1.001  # above the float32 tolerance 1e-4

    monkeypatch.setattr(TorchBackend, "ff_maps", off_by_a_little)
    monkeypatch.setattr(TorchBackend, "features", frozenset({"causal", "window", "gqa"}))
    report = selftest.run(names=("torch",))
    assert report.failed and all(o.primitive == "ff_maps" for o in report.failed)
    skipped = [o for o in report.outcomes if o.skipped]
    assert {o.case.split("/")[1] for o in skipped} == {"radius", "softcap"}
    assert all("torch does not compute" in o.skipped for o in skipped)
    assert cli_main(["selftest", "--backends", "torch"]) == 1
    assert "FAILED torch ff_maps" in capsys.readouterr().out
    assert torch.device(report.device).type == "cpu"


def test_low_precision_tolerance_is_at_least_twice_the_references_own_error(monkeypatch):
    # bfloat16 inputs of the post-LN-only FF case are off by more than the table's 5e-2 from rounding alone
    report = selftest.run(names=("torch",), dtypes=(torch.bfloat16,))
    assert not report.failed, report.table()
    ff = {o.case: o for o in report.outcomes if o.primitive == "ff_maps" and o.skipped is None}
    hard = ff["post_only/plain"]
    assert hard.error > tolerance(torch.bfloat16) and hard.tolerance == 2 * hard.reference_error
    assert all(o.reference_error is not None and o.tolerance >= tolerance(torch.bfloat16) for o in ff.values())
    real = TorchBackend.ff_maps
    # 15% off is more than twice any reference error of these cases (at most 6.5e-2): every FF case fails
    monkeypatch.setattr(TorchBackend, "ff_maps", lambda self, *args, **kwargs: real(self, *args, **kwargs) * 1.15)
    report = selftest.run(names=("torch",), dtypes=(torch.bfloat16,))
    assert {(o.primitive, o.case) for o in report.failed} == {("ff_maps", case) for case in ff}


def test_the_triton_alti_kernel_is_checked_and_a_wrong_one_fails(monkeypatch):
    # under the interpreter on CPU (tests/conftest.py): triton's choice for the attention maps brings its ALTI L1
    # kernel (kobattr.peers.TritonPeers), checked as the primitive "peers" in every case
    from kobattr.peers import TritonPeers

    report = selftest.run(names=("triton", "torch"), primitives=("peers",))
    assert not report.failed, report.table()
    ran = [o for o in report.outcomes if o.skipped is None]
    assert {(o.implementation, o.primitive) for o in report.outcomes} == {("triton", "peers")}
    assert {o.case.split("/")[0] for o in ran} == set(STRUCTURES)
    real = TritonPeers.l1

    def odd_keys_off(kappa, *args):  # the odd keys' proximities 0.1% high: each row's shares move by ~2.5e-4
        return real(kappa, *args) * (1 + 1e-3 * (torch.arange(kappa.shape[-1]) % 2))

    monkeypatch.setattr(TritonPeers, "l1", staticmethod(odd_keys_off))
    report = selftest.run(names=("triton",), primitives=("peers",))
    assert report.failed and all(o.primitive == "peers" for o in report.failed)
