"""kobattr.distributed: one long text split by query rows over torchrun ranks (gloo, 2 processes) against the
single-process analyze(); the world of one; row blocks and their loader. Also the torchrun launcher of
tests/test_corpus.py."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import kobattr
from kobattr.distributed import World, analyze_rows, load_row_shards, row_blocks, world
from kobattr.layer import LayerInputError
from kobattr.models import load_default_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORKER = Path(__file__).resolve().parent / "workers" / "row_split.py"
METHODS = ["attnresln_n", "atbffresln"]  # an attention-side and an FF scope (different primitives)
LAYERS = [0, 5]
LONG_TEXT = ("The committee met on Tuesday to discuss the budget, but the chair, who had arrived late from another "
             "meeting, asked everyone to postpone the vote until the auditors had finished their report.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, ranks: int = 2, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node=ranks ARGS`` on a free port, one thread per rank (as
    torchrun's default), from a directory outside the repository: ``python -m`` puts the working directory first
    on sys.path, and the source tree's kobattr has no compiled extension unless it was installed in place (CI
    installs it into site-packages), so the ranks would silently run other implementations than this process."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               f"--master-port={free_port()}", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir(),
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})})


def relative_error(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def minilm():
    return load_default_model()


def test_row_blocks_cover_the_rows_once_in_order():
    assert row_blocks(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert row_blocks(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for n, parts in ((7, 2), (33, 5), (5, 5)):
        blocks = row_blocks(n, parts)
        assert [r for start, stop in blocks for r in range(start, stop)] == list(range(n))
        assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1


def test_a_world_of_one_needs_no_process_group():
    here = world()
    assert (here.rank, here.size, here.main) == (0, 1, True)
    assert here.agree(lambda: 42) == 42
    with pytest.raises(ValueError, match="from rank 0"):
        here.agree(lambda: (_ for _ in ()).throw(ValueError("from rank 0")))
    t = torch.arange(3.0)
    assert here.reduce(t, "sum") is t and here.gather_blocks(t, [(0, 3)]) is t
    assert not torch.distributed.is_initialized()
    assert World().device == torch.device("cpu")


def test_row_split_on_one_rank_is_analyze(minilm, tmp_path):
    model, tokenizer = minilm
    full = kobattr.analyze(model, LONG_TEXT[:80], tokenizer=tokenizer, methods=["attnresln_n"], layers=[1], verify=0)
    own = analyze_rows(model, LONG_TEXT[:80], tokenizer=tokenizer, out_dir=tmp_path, methods=["attnresln_n"],
                       layers=[1], verify=0)
    assert own.rows.tolist() == list(range(full.attention_mask.shape[1]))
    loaded = load_row_shards(tmp_path)
    assert loaded.rows is None and torch.equal(loaded.maps["attnresln_n"], own.maps["attnresln_n"])
    # all rows selected vs the full map: the same numbers up to float32 rounding of the two kernel paths
    assert relative_error(loaded.maps["attnresln_n"], full.maps["attnresln_n"]) < 1e-6
    assert relative_error(loaded.ratios["attnresln_n"], full.ratios["attnresln_n"]) < 1e-6


def test_row_split_refuses_a_batch_of_several_texts(minilm):
    model, tokenizer = minilm
    batch = tokenizer(["one text", "two texts"], return_tensors="pt", padding=True)
    with pytest.raises(LayerInputError, match="takes one text"):
        analyze_rows(model, dict(batch), methods=["attn_w"])


def test_load_row_shards_refuses_a_missing_block(minilm, tmp_path):
    model, tokenizer = minilm
    result = kobattr.analyze(model, "a short text", tokenizer=tokenizer, methods=["attn_w"], layers=[0], rows=[0, 1],
                             verify=0)
    result.save(tmp_path / "rows-00000-of-00002.safetensors")
    with pytest.raises(ValueError, match="not one block of each rank"):
        load_row_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="no row-block files"):
        load_row_shards(tmp_path / "empty")


@pytest.fixture(scope="module")
def two_rank_row_split(tmp_path_factory):
    """The worker's outputs for LONG_TEXT on 2 gloo ranks: (out dir, contract)."""
    out = tmp_path_factory.mktemp("row_split")
    (out / "text.txt").write_text(LONG_TEXT, encoding="utf-8")
    generator = torch.Generator().manual_seed(0)
    model, tokenizer = load_default_model()
    n = len(tokenizer(LONG_TEXT)["input_ids"])
    contract = torch.rand(3, n, generator=generator)
    torch.save(contract, out / "contract.pt")
    done = torchrun([WORKER, out / "text.txt", out / "contract.pt", out])
    assert done.returncode == 0, done.stderr[-3000:]
    return out, contract


def test_two_ranks_split_rows_into_contiguous_blocks_equal_to_the_whole_map(minilm, two_rank_row_split):
    out, _ = two_rank_row_split
    model, tokenizer = minilm
    full = kobattr.analyze(model, LONG_TEXT, tokenizer=tokenizer, methods=METHODS, layers=LAYERS, verify=0)
    n = full.attention_mask.shape[1]
    ranks = [json.loads((out / f"rank{r}.json").read_text())["rows"] for r in range(2)]
    assert ranks == [list(range(0, n // 2)), list(range(n // 2, n))]
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["rows-00000-of-00002.safetensors",
                                                                "rows-00001-of-00002.safetensors"]
    joined = load_row_shards(out / "maps")
    assert joined.layers == tuple(LAYERS) and joined.tokens == full.tokens
    for m in METHODS:
        assert joined.maps[m].shape == full.maps[m].shape == (2, 1, n, n)
        assert relative_error(joined.maps[m], full.maps[m]) < 1e-6, m
        # gathered from each rank's block of tokens
        assert relative_error(joined.ratios[m], full.ratios[m]) < 1e-6, m
        assert relative_error(joined.bias_norms[m], full.bias_norms[m]) < 1e-6, m
        assert float(joined.spot_check[m].max()) < 1e-4


def test_two_ranks_sum_their_partial_contractions(minilm, two_rank_row_split):
    out, contract = two_rank_row_split
    model, tokenizer = minilm
    whole = kobattr.analyze(model, LONG_TEXT, tokenizer=tokenizer, methods=METHODS, layers=LAYERS, contract=contract,
                            verify=0)
    written = kobattr.Attribution.load(out / "contracted" / "contracted.safetensors")
    assert written.contracted and written.rows is None
    per_rank = [torch.load(out / f"contracted-rank{r}.pt") for r in range(2)]
    for m in METHODS:
        assert written.maps[m].shape == whole.maps[m].shape == (2, 1, 3, contract.shape[1])
        assert relative_error(written.maps[m], whole.maps[m]) < 1e-6, m
        assert all(torch.equal(p[m], written.maps[m]) for p in per_rank), "every rank gets the summed contraction"
        # one rank's half alone is far from the whole: the sum is what makes it right
        half = kobattr.analyze(model, LONG_TEXT, tokenizer=tokenizer, methods=[m], layers=LAYERS, contract=contract,
                               rows=range(0, contract.shape[1] // 2), verify=0)
        assert relative_error(half.maps[m], whole.maps[m]) > 0.1
