"""`kobattr heads` under torchrun (kobattr.analyses.parts): the fixed summation tree against a plain recursive
pairwise sum, split over any number of ranks and through part files; two gloo ranks against one process on the
shipped sample with --coref, --clustering and --gradient (results.json byte for byte)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from test_clark_gradient import tiny_bert
from test_distributed import torchrun

from kobattr.analyses import parts
from kobattr.analyses.parts import Fixed, Max, PairwiseSum, add, batch_sum, read_part, total, write_part
from kobattr.distributed import row_blocks
from kobattr.io import MANIFEST
from kobattr.models import load_default_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def leaf(k: int) -> dict:
    """A batch state with every kind of value; the floats span magnitudes, so summation order shows."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 9, (3, 4), generator=g)
    state = {"x": x, "n": k + 1, "f": float(x[0, 0]) / 3, "losses": [float(k), -float(k)],
             "seen": {f"b{k % 3}"}, "worst": Max(float(k % 4)), "layers": Fixed((0, 2)),
             "per_rel": {f"r{k % 4}": torch.tensor([k, 1], dtype=torch.long)}}
    if k % 2:
        state["odd"] = x.sum()
    return state


def pairwise(lo: int, hi: int):
    """The tree's node over batches lo..hi-1 (an aligned power-of-two range), by plain recursion."""
    if hi - lo == 1:
        return leaf(lo)
    mid = (lo + hi) // 2
    return add(pairwise(lo, mid), pairwise(mid, hi))


def direct(n: int):
    """The whole: the power-of-two ranges of n's binary digits, largest first, summed from the left."""
    out, start = None, 0
    for size in sorted((1 << b for b in range(n.bit_length()) if n >> b & 1), reverse=True):
        part = pairwise(start, start + size)
        out, start = (part if out is None else add(out, part)), start + size
    return out


def same(a, b) -> bool:
    """Equal bit for bit (tensors by dtype and value, floats by repr)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (Max, Fixed)):
        return type(a) is type(b) and a.value == b.value
    if isinstance(a, set):
        return isinstance(b, set) and a == b
    return type(a) is type(b) and repr(a) == repr(b)


@pytest.mark.parametrize("n", [1, 2, 5, 7, 12, 16])
def test_the_tree_is_the_same_sum_for_any_split_and_through_part_files(n, tmp_path):
    expected = direct(n)
    one = PairwiseSum()
    for k in range(n):
        one.add(k, leaf(k))
    assert same(total(one.nodes, n), expected)
    assert expected["losses"] == [v for k in range(n) for v in (float(k), -float(k))]  # batch order
    assert expected["n"] == n * (n + 1) // 2 and expected["worst"].value == max(k % 4 for k in range(n))
    plain = sum(leaf(k)["x"] for k in range(n))  # another order: the same sum up to rounding only
    assert torch.allclose(expected["x"], plain, rtol=1e-12, atol=0)
    for size in (2, 3, 5):
        nodes = {}
        for rank, (start, stop) in enumerate(row_blocks(n, size)):
            tree = PairwiseSum()
            for k in range(start, stop):
                tree.add(k, leaf(k))
            assert len(tree.nodes) <= 2 * max(n.bit_length(), 1)
            path = parts.part_path(tmp_path, "t", rank, size)
            write_part(path, tree.nodes, "t", n)
            nodes.update(read_part(path, "t", n))
        assert same(total(nodes, n), expected), size


def test_missing_parts_and_disagreeing_batches_are_refused(tmp_path):
    tree = PairwiseSum()
    for k in (0, 1, 3):
        tree.add(k, leaf(k))
    with pytest.raises(ValueError, match="batch 2 is in no part"):
        total(tree.nodes, 4)
    with pytest.raises(ValueError, match="disagree"):
        add({"layers": Fixed([0, 1])}, {"layers": Fixed([0, 2])})
    write_part(tmp_path / "p.safetensors", tree.nodes, "heads", 4)
    with pytest.raises(ValueError, match="not a part of this run's heads"):
        read_part(tmp_path / "p.safetensors", "heads", 5)


def test_a_world_of_one_sums_every_batch_without_files(tmp_path):
    assert same(batch_sum(6, leaf, parts=tmp_path), direct(6))
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- torchrun
def run_alone(args) -> subprocess.CompletedProcess:
    """``python -m kobattr ARGS`` in one process with one thread, as each torchrun rank (test_distributed)."""
    return subprocess.run([sys.executable, "-m", "kobattr", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=tempfile.gettempdir(),
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def test_two_ranks_write_the_single_process_results(tmp_path):
    tokenizer = load_default_model()[1]
    tiny_bert(len(tokenizer)).save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    # 20 sentences in 7 batches (ranks: 3 + 4, so rank 0 rebuilds nodes from both parts); 4 documents in 2
    args = ["heads", "--model", tmp_path / "mlm", "--limit", "20", "--batch-size", "3", "--backend", "torch",
            "--coref", "--clustering", "--gradient"]
    alone = run_alone([*args, "--out", tmp_path / "alone"])
    assert alone.returncode == 0, alone.stderr
    logs = tmp_path / "logs"
    shared = torchrun(["--log-dir", logs, "--redirects", "3", "-m", "kobattr", *args, "--out", tmp_path / "shared"])
    assert shared.returncode == 0, shared.stderr
    a, s = tmp_path / "alone", tmp_path / "shared"
    results = json.loads((a / "results.json").read_text())
    assert {"coreference", "clustering", "gradient", "dependency"} <= set(results)
    assert results["texts"] == 20 and results["coreference"]["documents"] == 4 and "mds" in results["clustering"]
    assert (s / "results.json").read_bytes() == (a / "results.json").read_bytes()
    assert sorted(p.name for p in s.iterdir()) == sorted(p.name for p in a.iterdir())  # no parts/ left
    assert json.loads((s / MANIFEST).read_text())["files"] == json.loads((a / MANIFEST).read_text())["files"]
    report = lambda p: [x for x in (p / "report.md").read_text().splitlines()  # noqa: E731
                        if not x.startswith(("- Runtime:", "- Command:"))]  # the wall time and --out differ
    assert report(s) == report(a)
    # each rank's output in its own file: only rank 0 prints the summary and draws the progress bars
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    rank_out = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert sorted(rank_logs) == [0, 1]
    for desc in ("heads: batches", "coreference: batches", "clustering: batches", "gradient: batches"):
        assert f"{desc} (rank 0's share of 2)" in rank_logs[0] and desc not in rank_logs[1]
    assert f"wrote {s}/" in rank_out[0] and rank_out[1].strip() == ""


def test_a_refused_out_stops_every_rank(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "foreign.txt").write_text("not kobattr's")
    done = torchrun(["-m", "kobattr", "heads", "--limit", "2", "--out", out, "--overwrite"], timeout=120)
    assert done.returncode != 0 and "foreign.txt" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["foreign.txt"]
