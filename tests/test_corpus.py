"""`kobattr corpus` / run_corpus: per-token table and summary against analyze() text by text; torchrun with 2
gloo ranks against one process; runs killed by SIGKILL and resumed with another number of ranks; corrupted shards;
refused resumes; every input format.

Every run here computes with one thread (torchrun's default per rank; set_num_threads(1) in this process), so
that a shard's bytes do not depend on where it was computed and "identical" can mean byte-identical files."""

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import kobattr
from kobattr.analyses.corpus import MANIFEST, SUMMARY, SUMMARY_PLOT, CorpusError, open_corpus, run_corpus, shard_plan
from kobattr.cli import main as cli_main
from kobattr.methods import spearman
from kobattr.models import load_default_model
from kobattr.reproduce import MaskedCorpus, frequency_ranks
from test_distributed import torchrun

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

TEXTS = ["The cat sat on the mat.", "A dog barked at the mailman.", "Colorless green ideas sleep furiously.",
         "It rained all day in the city.", "She sells sea shells by the sea shore.", "Time flies like an arrow.",
         "I think, therefore I am.", "To be or not to be, that is the question.", "The cat chased the dog.",
         "Café au lait, s'il vous plaît."]
METHODS = ["attn_w", "attnresln_n"]  # a weight method (no bias part) and a vector method
LAYERS = [0, 5]
RUN = dict(methods=METHODS, layers=LAYERS, shard_size=3, batch_size=2, verify=0, progress=False)  # 4 shards
CLI_RUN = ["--methods", *METHODS, "--layers", *map(str, LAYERS), "--shard-size", "3", "--batch-size", "2",
           "--verify", "0"]


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def contents(out) -> dict:
    """Every file of a run directory: relative path -> bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def token_table(out):
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / "tokens").glob("shard-*.parquet"))])


def summary_of(out) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def assert_numbers_close(a, b, path="summary"):
    """Equal structure and strings, numbers within 1e-6 (relative to max(1, |b|))."""
    if isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in b:
            assert_numbers_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_numbers_close(x, y, f"{path}[{i}]")
    elif isinstance(b, float):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (path, a, b)
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def minilm():
    return load_default_model()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "texts.txt"
    lines = TEXTS[:4] + ["", "   "] + TEXTS[4:]  # blank lines hold no text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def baseline(minilm, corpus_file, tmp_path_factory):
    """The uninterrupted single-process run every other run is compared with."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    model, tokenizer = minilm
    with one_thread():
        summary = run_corpus(model, tokenizer, corpus_file, out, **RUN)
    return out, summary


def test_shard_plan_is_fixed_by_text_ranges():
    assert shard_plan(10, 3) == [[0, 3], [3, 6], [6, 9], [9, 10]]
    assert shard_plan(4, 256) == [[0, 4]]


def test_table_and_summary_are_analyze_text_by_text(baseline, minilm):
    out, summary = baseline
    model, tokenizer = minilm
    assert sorted(contents(out)) == ["manifest.json", *[f"shards/shard-0000{i}.json" for i in range(4)],
                                     "summary.json", "summary.png",
                                     *[f"tokens/shard-0000{i}.parquet" for i in range(4)]]
    assert summary == summary_of(out)
    table = token_table(out)
    assert table.schema.names == ["text_id", "position", "token", "layer", "method", "mixing_ratio", "bias_norm",
                                  "token_id", "special"]
    assert [str(t) for t in table.schema.types] == ["int64", "int32", "string", "int16", "string", "float",
                                                    "float", "int64", "bool"]
    rows = table.to_pydict()
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    pooled = {m: [[] for _ in LAYERS] for m in METHODS}
    cursor = 0
    for k, text in enumerate(TEXTS):
        alone = kobattr.analyze(model, text, tokenizer=tokenizer, methods=METHODS, layers=LAYERS, verify=0)
        n = len(ids[k])
        for li, layer in enumerate(LAYERS):
            for m in METHODS:  # rows ordered by text, layer, method, position
                block = slice(cursor, cursor + n)
                cursor += n
                assert rows["text_id"][block] == [k] * n and rows["position"][block] == list(range(n))
                assert rows["layer"][block] == [layer] * n and rows["method"][block] == [m] * n
                assert rows["token"][block] == alone.tokens[0] and rows["token_id"][block] == ids[k]
                assert rows["special"][block] == [t in tokenizer.all_special_ids for t in ids[k]]
                ratios = np.array(rows["mixing_ratio"][block])
                np.testing.assert_allclose(ratios, alone.ratios[m][li, 0].numpy(), rtol=0, atol=1e-6)
                if m == "attn_w":
                    assert rows["bias_norm"][block] == [None] * n
                else:
                    np.testing.assert_allclose(np.array(rows["bias_norm"][block]), alone.bias_norms[m][li, 0].numpy(),
                                               rtol=1e-6)
                pooled[m][li].append(alone.ratios[m][li, 0].double())
    assert cursor == table.num_rows
    assert summary["texts"] == len(TEXTS) and summary["tokens"] == sum(map(len, ids)) and summary["shards"] == 4
    assert (summary["methods"], summary["layers"]) == (METHODS, LAYERS)
    for m in METHODS:
        expected = [float(torch.cat(per_layer).mean()) for per_layer in pooled[m]]
        np.testing.assert_allclose(summary["mean_ratio"][m], expected, rtol=1e-6)
    assert list(summary["mean_bias_norm"]) == ["attnresln_n"]

    # the 2021 frequency correlation as `kobattr reproduce` defines it: global ranks over the ordinary tokens
    specials = set(tokenizer.all_special_ids)
    ordinary = [t for x in ids for t in x if t not in specials]
    ranks = frequency_ranks(MaskedCorpus(TEXTS, ids, ids, 0, len(ordinary)), tokenizer)
    token_ranks = torch.tensor([ranks[t] for t in ordinary], dtype=torch.float64)
    frequency = summary["frequency_2021"]
    assert (frequency["tokens"], frequency["types"]) == (len(ordinary), len(set(ordinary)))
    for m in METHODS:
        per_layer = []
        for layer in LAYERS:
            keep = [i for i in range(table.num_rows) if rows["method"][i] == m and rows["layer"][i] == layer
                    and not rows["special"][i]]
            per_layer.append(torch.tensor([rows["mixing_ratio"][i] for i in keep], dtype=torch.float64))
        assert frequency["spearman_ratio_vs_rank_per_layer"][m] == pytest.approx(
            [spearman(r, token_ranks) for r in per_layer], abs=1e-12)
        assert frequency["spearman_ratio_vs_rank_pooled"][m] == pytest.approx(
            spearman(torch.cat(per_layer), token_ranks.repeat(len(LAYERS))), abs=1e-12)


def test_two_ranks_give_the_single_process_outputs(baseline, corpus_file, minilm, tmp_path):
    out = tmp_path / "run"
    done = torchrun(["-m", "kobattr", "corpus", "--file", corpus_file, "--out", out, *CLI_RUN, "--save-maps"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "text/s" in done.stderr and "tokens/s" in done.stderr and "2 rank(s)" in done.stderr  # rank 0's bar
    assert done.stdout.count("mean context-mixing ratio") == 1  # rank 0 reports
    assert_numbers_close(summary_of(out), baseline[1])
    two, one = token_table(out).to_pydict(), token_table(baseline[0]).to_pydict()
    for column in one:
        if column in ("mixing_ratio", "bias_norm"):
            np.testing.assert_allclose(np.array(two[column], dtype=float), np.array(one[column], dtype=float),
                                       rtol=1e-6, atol=0)
        else:
            assert two[column] == one[column], column
    # a refusal found by rank 0 stops every rank (none waits for it), and rank 0 alone says it
    again = torchrun(["-m", "kobattr", "corpus", "--file", corpus_file, "--out", out, *CLI_RUN], timeout=120)
    assert again.returncode != 0 and again.stderr.count("pass --resume to continue it") == 1
    # --save-maps: every text's full maps, padding removed
    model, tokenizer = minilm
    from safetensors.torch import load_file

    maps = {}
    for path in sorted((out / "maps").glob("shard-*.safetensors")):
        maps.update(load_file(path))
    assert len(maps) == len(TEXTS) * len(METHODS)
    for k in (0, 9):
        alone = kobattr.analyze(model, TEXTS[k], tokenizer=tokenizer, methods=METHODS, layers=LAYERS, verify=0)
        for m in METHODS:
            torch.testing.assert_close(maps[f"{k}/{m}"], alone.maps[m][:, 0], rtol=1e-6, atol=1e-6)


def test_killed_runs_resume_with_another_world_size_to_identical_outputs(baseline, corpus_file, minilm, tmp_path):
    model, tokenizer = minilm
    expected = contents(baseline[0])

    # 2 ranks, each killed (SIGKILL) right after its first shard; resumed by one process
    out = tmp_path / "two_then_one"
    killed = torchrun(["-m", "kobattr", "corpus", "--file", corpus_file, "--out", out, *CLI_RUN],
                      env={"KOBATTR_FAULT_AFTER_SHARDS": "1"})
    assert killed.returncode != 0
    finished = sorted(p.name for p in (out / "shards").glob("*.json"))
    assert 1 <= len(finished) <= 2 and not (out / "summary.json").exists()
    with one_thread():
        summary = run_corpus(model, tokenizer, corpus_file, out, resume=True, **RUN)
    assert summary == baseline[1]
    assert contents(out) == expected

    # one process killed after its second shard; resumed by 2 ranks
    out = tmp_path / "one_then_two"
    killed = subprocess.run([sys.executable, "-m", "kobattr.cli", "corpus", "--file", str(corpus_file), "--out",
                             str(out), *CLI_RUN], capture_output=True, text=True, timeout=300,
                            cwd=tempfile.gettempdir(),  # not the source tree (see test_distributed.torchrun)
                            env={**os.environ, "OMP_NUM_THREADS": "1",
                                 "KOBATTR_FAULT_AFTER_SHARDS": "2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (out / "shards").glob("*.json")) == ["shard-00000.json", "shard-00001.json"]
    resumed = torchrun(["-m", "kobattr", "corpus", "--file", corpus_file, "--out", out, *CLI_RUN, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert contents(out) == expected


def test_corrupted_shards_are_detected_and_recomputed(baseline, corpus_file, minilm, tmp_path):
    model, tokenizer = minilm
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    (out / "summary.json").unlink()
    truncated = out / "tokens" / "shard-00001.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    flipped = out / "tokens" / "shard-00002.parquet"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the checksum can tell
    flipped.write_bytes(bytes(data))
    record = out / "shards" / "shard-00003.json"
    record.write_text(record.read_text()[:40])
    stale = out / "tokens" / ".shard-00000.parquet.0123456789ab.tmp"  # what a kill inside atomic_write leaves
    stale.write_bytes(b"partial")
    untouched = {p: p.stat().st_ino for p in (out / "tokens" / "shard-00000.parquet", out / "shards" / "shard-00000.json")}
    with one_thread():
        summary = run_corpus(model, tokenizer, corpus_file, out, resume=True, **RUN)
    assert summary == baseline[1]
    assert contents(out) == contents(baseline[0])  # the stale temporary is gone too
    assert all(p.stat().st_ino == inode for p, inode in untouched.items()), "a complete shard was recomputed"
    assert truncated.stat().st_ino != untouched[out / "tokens" / "shard-00000.parquet"]


def test_a_mismatched_resume_is_refused(baseline, corpus_file, minilm, tmp_path):
    model, tokenizer = minilm
    out = baseline[0]
    before = contents(out)

    def refused(match, **changes):
        settings = {**RUN, "resume": True, **changes}
        args = (settings.pop("model", model), tokenizer, settings.pop("file", corpus_file), out)
        with pytest.raises(CorpusError, match=match):
            run_corpus(*args, **settings)

    refused(r"holds a corpus run; pass --resume to continue it", resume=False)
    refused(r"another methods \(run: \['attn_w', 'attnresln_n'\], now: \['attn_w'\]\)", methods=["attn_w"])
    refused(r"another layers \(run: \[0, 5\], now: \[0\]\)", layers=[0])
    refused(r"shard size \(run: 3, now: 4\)", shard_size=4)
    refused(r"ff gemm \(run: 'float32', now: 'bfloat16'\)", ff_gemm="bfloat16")
    changed = tmp_path / "changed.txt"
    changed.write_text(corpus_file.read_text(encoding="utf-8").replace("cat", "dog"), encoding="utf-8")
    refused(r"another input content; resume it with what it was started with", file=changed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1.0
    refused(r"another model parameters;", model=other)
    assert contents(out) == before  # a refusal writes nothing

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="is not empty and holds no corpus run"):
        run_corpus(model, tokenizer, corpus_file, foreign, **RUN)


def test_a_run_from_before_the_ff_gemm_setting_resumes(baseline, corpus_file, minilm, tmp_path):
    model, tokenizer = minilm
    out = tmp_path / "older"
    shutil.copytree(baseline[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["settings"]["ff_gemm"]  # as written before the setting existed: float32 products
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "summary.json").unlink()
    with one_thread():
        assert run_corpus(model, tokenizer, corpus_file, out, resume=True, **RUN) == baseline[1]


def test_ff_gemm_reaches_the_corpus_ff_maps(corpus_file, minilm, tmp_path):
    from safetensors.torch import load_file

    model, tokenizer = minilm
    settings = dict(RUN, methods=["atbff"], layers=[0], shard_size=10, save_maps=True)
    with one_thread():
        for gemm in ("float32", "bfloat16"):
            run_corpus(model, tokenizer, corpus_file, tmp_path / gemm, ff_gemm=gemm, **settings)
    exact, rounded = (load_file(tmp_path / gemm / "maps" / "shard-00000.safetensors") for gemm in ("float32", "bfloat16"))
    assert exact.keys() == rounded.keys()
    worst = max(float((rounded[k] - exact[k]).abs().max() / exact[k].abs().max()) for k in exact)
    assert 1e-5 < worst < 5e-2  # the bfloat16 products ran, within their error


def test_the_command_line_refuses_with_one_line(baseline, corpus_file, capsys):
    code = cli_main(["corpus", "--file", str(corpus_file), "--out", str(baseline[0]), *CLI_RUN])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the loading bar
    assert code == 2 and len(errors) == 1 and errors[0].startswith("kobattr corpus: error: ")
    assert "pass --resume" in errors[0]


def test_json_lines_through_the_command_line_give_the_text_file_run(baseline, minilm, tmp_path, capsys):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": k, "body": t}) + "\n" for k, t in enumerate(TEXTS)), encoding="utf-8")
    out = tmp_path / "run"
    with one_thread():
        code = cli_main(["corpus", "--file", str(path), "--field", "body", "--out", str(out), *CLI_RUN])
    printed = capsys.readouterr().out
    assert code == 0 and "mean context-mixing ratio" in printed and "Spearman" in printed
    assert token_table(out).equals(token_table(baseline[0]))
    summary, expected = summary_of(out), dict(baseline[1])
    assert summary.pop("input")["format"] == "jsonl"
    expected.pop("input")
    assert summary == expected


@pytest.fixture
def formats(tmp_path):
    """The same TEXTS as a text file, JSON Lines, Parquet (3-row groups) and, with datasets, a saved dataset."""
    paths = {"text": tmp_path / "texts.txt", "jsonl": tmp_path / "texts.jsonl", "parquet": tmp_path / "texts.parquet"}
    paths["text"].write_text("\n\n".join(TEXTS) + "\n", encoding="utf-8")
    paths["jsonl"].write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS), encoding="utf-8")
    pq.write_table(pa.table({"n": list(range(len(TEXTS))), "body": TEXTS}), paths["parquet"], row_group_size=3)
    return paths


def test_every_input_format_gives_the_texts_by_range(formats):
    how = {"text": {}, "jsonl": {"field": "body"}, "parquet": {"column": "body"}}
    for kind, options in how.items():
        corpus = open_corpus(formats[kind], **options)
        assert (corpus.format, corpus.count) == (kind, len(TEXTS))
        assert corpus.texts(0, len(TEXTS)) == TEXTS
        assert corpus.texts(2, 7) == TEXTS[2:7] and corpus.texts(9, 10) == TEXTS[9:]  # across Parquet row groups
        assert corpus.sha256 == open_corpus(formats[kind], **options).sha256 and len(corpus.sha256) == 64


def test_a_saved_dataset_is_read_by_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))})
    data.save_to_disk(str(tmp_path / "one"))
    corpus = open_corpus(tmp_path / "one", column="body")
    assert (corpus.format, corpus.count) == ("dataset", len(TEXTS))
    assert corpus.texts(3, 8) == TEXTS[3:8]
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(CorpusError, match="DatasetDict with the splits train; give one split's directory"):
        open_corpus(tmp_path / "splits", column="body")
    with pytest.raises(CorpusError, match="holds Value"):
        open_corpus(tmp_path / "one", column="n")


def test_a_saved_dataset_without_the_datasets_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(CorpusError, match=r"needs the datasets package: pip install 'kobattr\[datasets\]'"):
        open_corpus(tmp_path)


@pytest.mark.parametrize("write, options, match", [
    (None, {}, "does not exist"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"text": "a"}\n{"body": "b"}\n'), {},
     r"line 2 of .* has no field 'text' \(it has 'body'\)"),
    (lambda p: p.with_suffix(".jsonl").write_text('["a"]\n'), {}, "line 1 of .* is a JSON list, not an object"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"text": 3}\n'), {}, "field 'text' on line 1 .* is a int"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"text": "a"}\n'), {"column": "text"}, "use --field, not --column"),
    (lambda p: p.with_suffix(".txt").write_bytes(b"ok\n\xff\n"), {}, "line 2 of .* is not UTF-8"),
    (lambda p: p.with_suffix(".txt").write_text("a\n"), {"field": "text"}, "read as a text file with one text per"),
    (lambda p: p.with_suffix(".txt").write_text("\n \n"), {}, "holds no text, only blank lines"),
    (lambda p: p.with_suffix(".jsonl").write_bytes(b""), {}, "is empty; give one text per line"),
    (lambda p: p.with_suffix(".jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1")), {},
     r"line 1 of .* is not UTF-8 \(invalid continuation byte at byte 13\)"),
    (lambda p: p.with_suffix(".jsonl").write_text('{"text": "a"}\n{"text": "b",\n'), {},
     r"line 2 of .* is not valid JSON \(Expecting property name"),
    (lambda p: p.with_suffix(".txt").write_bytes(b"short\n" + b"x" * (10 << 20) + b"\nshort\n"), {},  # 10 MB
     "line 2 of .* is longer than 1 MiB, the most one text of a corpus may hold; split it into several lines"),
    (lambda p: pq.write_table(pa.table({"text": ["a", "b" * (10 << 20)]}), p.with_suffix(".parquet")), {},
     "row 1 of column 'text' .* is longer than 1 MiB"),
    (lambda p: pq.write_table(pa.table({"body": ["a"]}), p.with_suffix(".parquet")), {},
     r"has no column 'text' \(it has 'body'\)"),
    (lambda p: pq.write_table(pa.table({"text": [1]}), p.with_suffix(".parquet")), {}, "holds int64, not strings"),
    (lambda p: pq.write_table(pa.table({"text": ["a", None]}), p.with_suffix(".parquet")), {},
     "row 1 of column 'text' .* is null"),
    (lambda p: p.with_suffix(".parquet").write_bytes(b"not parquet"), {}, "cannot be read as Parquet"),
    (lambda p: p.with_suffix("").mkdir(), {}, "not a Hugging Face dataset saved with save_to_disk"),
])
def test_bad_inputs_are_refused_with_one_sentence(tmp_path, write, options, match):
    stem = tmp_path / "input"
    if write is not None:
        write(stem)
    path = next(tmp_path.iterdir(), stem)
    with pytest.raises(CorpusError, match=match) as caught:
        open_corpus(path, **options)
    assert "\n" not in str(caught.value)


def test_a_text_the_model_cannot_take_is_named(minilm, tmp_path):
    model, tokenizer = minilm
    path = tmp_path / "texts.txt"
    path.write_text("A short text.\n" + "word " * 600 + "\n", encoding="utf-8")
    with one_thread(), pytest.raises(CorpusError, match=r"texts 1: the input has 602 tokens .* max_length=512"):
        run_corpus(model, tokenizer, path, tmp_path / "run", **{**RUN, "batch_size": 1})


@pytest.mark.parametrize("name, content, message", [
    ("long.txt", b"short\n" + b"x" * (10 << 20) + b"\n", "line 2 of {path} is longer than 1 MiB, the most one text of "
                                                          "a corpus may hold; split it into several lines."),
    ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "line 2 of {path} is not valid JSON (Expecting value: line 1 column "
                                                  "10 (char 9)); JSON Lines has one object per line."),
    ("latin1.txt", "ok\ncaf\u00e9\n".encode("latin-1"), "line 2 of {path} is not UTF-8 (invalid continuation byte at "
                                                         "byte 3)."),
    ("empty.jsonl", b"", "{path} is empty; give one text per line."),
], ids=["10MB_line", "bad_json", "not_utf8", "empty"])
def test_bad_inputs_through_the_command_line_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, name,
                                                                                  content, message):
    import kobattr.cli.common

    monkeypatch.setattr(kobattr.cli.common, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = tmp_path / name
    path.write_bytes(content)
    code = cli_main(["corpus", "--file", str(path), "--out", str(tmp_path / "run"), *CLI_RUN])
    assert code == 2
    assert capsys.readouterr().err == f"kobattr corpus: error: {message.format(path=path.resolve())}\n"
    assert not (tmp_path / "run").exists()


def test_a_run_killed_from_outside_resumes_to_identical_outputs(baseline, corpus_file, minilm, tmp_path):
    """SIGKILL from outside the moment the first shard's table appears (its record not yet written, most often)."""
    model, tokenizer = minilm
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "kobattr", "corpus", "--file", str(corpus_file), "--out", str(out),
                                *CLI_RUN], cwd=tempfile.gettempdir(), env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = out / "tokens" / "shard-00000.parquet"
        deadline = time.monotonic() + 300
        while not first.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        process.kill()
    finally:
        process.wait()
    assert process.returncode == -9 and not (out / SUMMARY).exists()
    with one_thread():
        assert run_corpus(model, tokenizer, corpus_file, out, resume=True, **RUN) == baseline[1]
    assert contents(out) == contents(baseline[0])


def _killed_in_the_manifest_write(out):
    for entry in out.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (out / f".{MANIFEST}.0123456789ab.tmp").write_bytes(b'{"format": 1, "kob')


def _killed_between_a_table_and_its_record(out):
    (out / SUMMARY).unlink()
    (out / SUMMARY_PLOT).unlink()
    (out / "shards" / "shard-00002.json").unlink()
    (out / "shards" / ".shard-00002.json.0123456789ab.tmp").write_bytes(b'{"format"')


def _killed_in_the_merge(out):
    (out / SUMMARY_PLOT).unlink()
    (out / f".{SUMMARY_PLOT}.0123456789ab.tmp").write_bytes(b"\x89PNG")


@pytest.mark.parametrize("kill", [_killed_in_the_manifest_write, _killed_between_a_table_and_its_record,
                                  _killed_in_the_merge])
def test_every_state_a_kill_leaves_resumes_to_identical_outputs(baseline, corpus_file, minilm, tmp_path, kill):
    """The states SIGKILL leaves between the steps that FAULT_AFTER_SHARDS does not reach: before the manifest
    exists, between a shard's files and its record, between the summary's two files."""
    model, tokenizer = minilm
    out = tmp_path / "run"
    shutil.copytree(baseline[0], out)
    kill(out)
    with one_thread():
        assert run_corpus(model, tokenizer, corpus_file, out, resume=True, **RUN) == baseline[1]
    assert contents(out) == contents(baseline[0])


def test_a_second_run_on_a_locked_out_is_refused_in_one_line_and_touches_nothing(corpus_file, tmp_path):
    """Another process holds --out's lock (as a running corpus run does): a new run on it stops with one line that
    names the holder's pid, and the directory stays as it was."""
    from kobattr.io import lock_directory

    out = tmp_path / "busy"
    out.mkdir()
    (out / "earlier.txt").write_text("not ours")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
                               " fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "kobattr", "corpus", "--file", str(corpus_file), "--out", str(out),
                                 *CLI_RUN], capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir(),
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    lines = [line for line in second.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and f"is in use by another kobattr run (pid {holder.pid})" in lines[0], second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]
    os.close(lock_directory(out))  # released with its holder
