"""`kobattr bench` (kobattr/bench.py) on the CPU at tiny lengths: its table, its JSON and that the maps it times are
the reference's. No timing is asserted."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from kobattr import bench
from kobattr.backends.torch_backend import TorchBackend
from kobattr.cli import main
from kobattr.reference import reference


def test_the_command_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "sub" / "out.json"
    assert main(["bench", "--device", "cpu", "--model", "minilm", "--lengths", "16,24", "--methods",
                 "attnresln_n,atbffresln", "--repeats", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "vs SDPA" in table and "vs GEMM" in table and f"wrote {out}" in table
    report = json.loads(out.read_text())
    assert report["device"]["type"] == "cpu" and report["model"] == "minilm" and report["dtype"] == "float32"
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["kobattr"]
    assert report["layer"] == dict(heads=12, kv_heads=12, head_size=32, d_model=384, d_ff=1536, causal=False,
                                   structure="post")
    assert [(r["method"], r["N"]) for r in report["results"]] == [("attnresln_n", 16), ("atbffresln", 16),
                                                              ("attnresln_n", 24), ("atbffresln", 24)]
    for r in report["results"]:
        line = next(line for line in table.splitlines() if line.startswith(f"{r['method']} ") and f" {r['N']} " in line)
        assert r["seconds"] > 0 and r["sdpa_seconds"] > 0 and r["peak_bytes"] >= 0
        assert r["vs_sdpa"] == pytest.approx(r["seconds"] / r["sdpa_seconds"])
        assert r["backends"]["attention_maps"] == "cpu" and f"{r['seconds'] * 1e3:.2f}" in line
        assert r["error"] <= r["tolerance"] == 1e-4
        if r["method"] == "atbffresln":
            assert r["backends"]["ff_maps"] == "torch" and r["gemm_dtype"] == "float32"
            useful = 2 * r["N"] ** 2 * 1536 * 384 / r["seconds"] / 1e12  # every pair visible (bidirectional)
            assert r["useful_tflops"] == pytest.approx(useful)
            assert r["vs_gemm"] == pytest.approx(useful / r["gemm_tflops"])
        else:
            assert "vs_gemm" not in r


@pytest.mark.parametrize("spec, method, rows", [("minilm", "attnresln_n", None), ("minilm", "atbffresln", None),
                                                ("llama-tiny", "atblnffres", 5), ("llama-tiny", "attnresln_n", 5)])
def test_the_timed_map_is_the_reference(spec, method, rows):
    N = 20
    layer = bench.capture_layer(bench.load_model(spec, "cpu", torch.float32, N), N)
    picked = None if rows is None else torch.arange(N - rows, N)
    row = bench.measure(layer, method, picked, repeats=1, keep_maps=True)
    ref = reference(layer, methods=[method], rows=picked)["maps"][method].float()
    assert row["map"].shape == ref.shape
    assert (row["map"] - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert row["rows"] == rows and row["error"] <= 1e-5
    if "vs_gemm" in row:  # the useful work: one d_ff x d product per visible pair (causal: j <= i)
        F, D = layer.ffn.w_out.shape
        pairs = N * N if rows is None else sum(i + 1 for i in range(N - rows, N))
        assert row["useful_tflops"] * 1e12 * row["seconds"] == pytest.approx(2 * pairs * F * D)


class Wrong(TorchBackend):
    name = "wrong"

    def attention_maps(self, *args, **kwargs):
        maps, alpha = super().attention_maps(*args, **kwargs)
        return maps * 1.01, alpha


def test_a_wrong_map_is_flagged(capsys):
    layer = bench.capture_layer(bench.load_model("bert-tiny", "cpu", torch.float32, 16), 16)
    row = bench.measure(layer, "attnresln_n", backend={"attention_maps": Wrong()}, repeats=1)
    assert row["backends"]["attention_maps"] == "wrong" and row["error"] == pytest.approx(0.01, rel=1e-3)
    assert row["error"] > row["tolerance"]
    assert "FAIL" in bench.table(dict(device=bench.device_info("cpu"), versions=bench.versions(), model="bert-tiny",
                                      dtype="float32", results=[row]))


def test_bad_requests_are_one_line_errors(capsys):
    assert main(["bench", "--model", "bert-tiny", "--lengths", "16", "--methods", "atblnffres"]) == 2
    assert "not defined for this model's post-LN layers" in capsys.readouterr().err
    assert main(["bench", "--model", "no-such-model", "--lengths", "16"]) == 2
    assert "neither minilm, a shape" in capsys.readouterr().err
    assert main(["bench", "--model", "bert-tiny", "--lengths", "16,x"]) == 2
    assert "comma-separated list" in capsys.readouterr().err


def test_gpu_check_plans_every_step_within_its_deadline(tmp_path):
    """benchmarks/gpu_check.sh parses, and its dry run lists the build, the GPU tests, the tuner and the benches at
    4k and 16k for both shapes (64k with LONG=1), each under the 8-minute deadline."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    for long in ("0", "1"):
        out = tmp_path / long
        done = subprocess.run(["bash", str(script)], env=dict(os.environ, OUT=str(out), DRY_RUN="1", LONG=long),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        steps = (out / "steps.txt").read_text()
        lengths = "4096,16384,65536" if long == "1" else "4096,16384"
        for model in ("bert-base", "llama-7b"):
            assert f"tune --device cuda --model {model} --lengths 512,{lengths}" in steps
            assert f"bench --device cuda --model {model} --lengths {lengths} --methods attnresln_n" in steps
        assert "build (limit" in steps and "GPU tests (limit" in steps and "--rows 16" in steps
        assert ("65536" in steps) == (long == "1") and "gpu_bench" not in steps
        limits = [int(x) for x in re.findall(r"\(limit (\d+) s\)", steps)]
        assert len(limits) == 10 and max(limits) <= 200
        assert re.search(r"DEADLINE=(\d+)", steps).group(1) == ("580" if long == "1" else "470")
