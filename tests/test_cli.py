"""`kobattr analyze`: argument errors, what is written, --overwrite, interrupted runs, the HTML title."""

import json
import os

import pytest
import torch

import kobattr.api
from kobattr import plots
from kobattr.cli import MANIFEST, STAGING_PREFIX
from kobattr.cli import main as cli_main
from kobattr.result import Attribution

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 2-layer BERT with MiniLM's tokenizer, saved as a local checkpoint for --model."""
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from kobattr.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_bert")
    AutoModel.from_config(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run(argv, capsys):
    """(exit status, stdout, stderr) of the command line, whether main returns or exits."""
    try:
        code = cli_main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def analyze_args(checkpoint, out, *texts, extra=()):
    return ["analyze", *texts, "--model", checkpoint, "--out", str(out), "--methods", "attn_w", "atbff",
            "--backend", "torch", "--no-plots", *extra]


def files_under(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_no_plots_run_writes_and_lists_exactly_its_files(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, _ = run(analyze_args(checkpoint, out, "日本 is big.", "A second text."), capsys)
    assert code == 0
    expected = [MANIFEST, "summary.json", "text000/attribution.safetensors", "text001/attribution.safetensors"]
    assert files_under(out) == expected  # no staging directory or temporary file left
    wrote = printed.strip().splitlines()[-1]
    assert wrote.startswith(f"wrote {out}/: ")
    assert sorted(wrote.split(": ", 1)[1].split(", ")) == expected
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["complete"] and manifest["texts"] == ["日本 is big.", "A second text."]
    assert sorted(manifest["files"] + [MANIFEST]) == expected
    first = Attribution.load(out / "text000" / "attribution")
    assert "日" in first.tokens[0] and first.methods == ("attn_w", "atbff")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"attn_w", "atbff"} and len(summary["atbff"]) == 2


def test_run_with_plots_lists_its_files(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a for a in analyze_args(checkpoint, out, "One {{DATA}} text.") if a not in ("--no-plots", "atbff")]
    code, printed, _ = run(argv, capsys)
    assert code == 0
    written = files_under(out)
    assert written == sorted([MANIFEST, "mixing_ratios.png", "summary.json", "text000/attn_w_layer1.png",
                              "text000/attn_w_layer2.png", "text000/attribution.safetensors", "text000/report.html"])
    assert sorted(json.loads((out / MANIFEST).read_text())["files"] + [MANIFEST]) == written
    assert sorted(printed.strip().splitlines()[-1].split(": ", 1)[1].split(", ")) == written
    page = (out / "text000" / "report.html").read_text(encoding="utf-8")
    assert "<title>One {{DATA}} text.</title>" in page


def one_line_error(err):
    """The error line, after checking it is one line and the last (model loading may draw a progress bar)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("kobattr analyze: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["analyze", "x", "--file"], "argument --file: expected one argument"),
    (["analyze", "--file", "{tmp}/missing.txt"], "missing.txt' does not exist"),
    (["analyze", "--file", "{tmp}"], "is not a file"),
    (["analyze", "--file", "{tmp}/empty.txt"], "no texts"),
    (["analyze"], "no texts"),
    (["analyze", "x", "--out", "{tmp}/empty.txt"], "is a file; give a directory"),
    (["analyze", "x", "--max-length", "0"], "--max-length must be a positive number of tokens, got 0"),
    (["analyze", "x", "--max-length", "-3"], "got -3"),
    (["analyze", "x", "--max-length", "many"], "invalid int value: 'many'"),
    (["analyze", "x", "--backend", "gpu"], "unknown --backend 'gpu'"),
    (["analyze", "x", "--out", "{tmp}"], "is not empty; choose a new or empty directory, or pass --overwrite"),
    (["analyze", "x", "--model", "{tmp}/no_model"], "does not exist"),
])
def test_argument_errors_are_one_line_and_status_2(tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, kobattr_out, lands here if a case gets that far
    (tmp_path / "empty.txt").write_text("\n  \n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, printed, err = run(argv, capsys)
    assert code == 2 and message in one_line_error(err) and printed == ""
    assert sorted(os.listdir(tmp_path)) == ["empty.txt"]  # nothing written


@pytest.mark.parametrize("extra,message", [
    (["--methods", "bogus"], "unknown method 'bogus'"),
    (["--layers", "5"], "--layers 5 does not exist; the model has 2 layers"),
])
def test_arguments_checked_against_the_model(checkpoint, tmp_path, capsys, extra, message):
    argv = analyze_args(checkpoint, tmp_path / "out", "x") + extra
    code, _, err = run(argv, capsys)
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_file_texts_and_no_utf8_locale(checkpoint, tmp_path):
    """--file is read as UTF-8 and everything is written as UTF-8 even in the C locale with UTF-8 mode off."""
    import subprocess
    import sys

    texts = tmp_path / "texts.txt"
    texts.write_text("日本 🎉\n\n  second line  \n", encoding="utf-8")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING", "PYTHONUTF8"))}
    env.update(LANG="C", LC_ALL="C", PYTHONUTF8="0")
    argv = ["analyze", "naïve ✓", "--file", str(texts), "--model", checkpoint, "--out", str(out),
            "--methods", "attn_w", "--backend", "torch"]  # with plots: report.html and PNGs too
    # cwd: not the repository root, whose kernels/ folder would hide Hugging Face's `kernels` (README, Development)
    done = subprocess.run([sys.executable, "-m", "kobattr", *argv], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["texts"] == ["naïve ✓", "日本 🎉", "second line"]  # argv texts first
    assert Attribution.load(out / "text000" / "attribution").tokens[0][1] == "naive"  # uncased: accents go
    assert "日" in Attribution.load(out / "text001" / "attribution").tokens[0]
    assert "<title>naïve ✓</title>" in (out / "text000" / "report.html").read_text(encoding="utf-8")
    assert "<title>日本 🎉</title>" in (out / "text001" / "report.html").read_text(encoding="utf-8")


def test_internal_errors_keep_their_traceback(checkpoint, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug, not the user's input")

    monkeypatch.setattr(kobattr.api, "analyze", broken)
    with pytest.raises(ValueError, match="internal bug"):
        cli_main(analyze_args(checkpoint, tmp_path / "out", "x"))
    assert not (tmp_path / "out").exists()


def test_library_input_errors_are_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    from kobattr import BackendUnavailable, LayerInputError

    for error in (LayerInputError("the sequence is empty."), BackendUnavailable("the cuda backend needs a GPU.")):
        def broken(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(kobattr.api, "analyze", broken)
        code, _, err = run(analyze_args(checkpoint, tmp_path / "out", "x"), capsys)
        assert code == 2 and one_line_error(err).endswith(str(error))


def test_overwrite_replaces_only_the_earlier_run(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(analyze_args(checkpoint, out, "first text", "second text"), capsys)[0] == 0
    code, _, err = run(analyze_args(checkpoint, out, "again"), capsys)
    assert code == 2 and "--overwrite" in one_line_error(err)
    assert run(analyze_args(checkpoint, out, "again", extra=["--overwrite"]), capsys)[0] == 0
    assert files_under(out) == [MANIFEST, "summary.json", "text000/attribution.safetensors"]  # text001 is gone
    assert Attribution.load(out / "text000" / "attribution").tokens[0][1] == "again"

    # a file kobattr did not write: --overwrite refuses rather than delete it
    (out / "notes.txt").write_text("mine")
    code, _, err = run(analyze_args(checkpoint, out, "third", extra=["--overwrite"]), capsys)
    assert code == 2 and "kobattr did not write (e.g. 'notes.txt')" in one_line_error(err)
    assert (out / "notes.txt").read_text() == "mine" and (out / "text000" / "attribution.safetensors").exists()


def test_overwrite_never_deletes_outside_out(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(analyze_args(checkpoint, out, "text"), capsys)[0] == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].append("../victim.txt")
    (out / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = run(analyze_args(checkpoint, out, "text", extra=["--overwrite"]), capsys)
    assert code == 2 and "not inside --out" in one_line_error(err)
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("earlier_run", [False, True])
def test_interrupted_run_leaves_nothing_that_looks_complete(checkpoint, tmp_path, capsys, monkeypatch, earlier_run):
    out = tmp_path / "out"
    if earlier_run:
        assert run(analyze_args(checkpoint, out, "old text"), capsys)[0] == 0
    before = {f: (out / f).read_bytes() for f in files_under(out)} if earlier_run else None
    real_analyze, calls = kobattr.api.analyze, []

    def interrupted_on_the_second_text(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_analyze(*args, **kwargs)

    monkeypatch.setattr(kobattr.api, "analyze", interrupted_on_the_second_text)
    code, _, err = run(analyze_args(checkpoint, out, "new one", "new two", extra=["--overwrite"]), capsys)
    assert code == 130 and "interrupted" in err and len(calls) == 2
    if earlier_run:  # the earlier run is untouched, still complete, nothing of the new one mixed in
        assert {f: (out / f).read_bytes() for f in files_under(out)} == before
        assert Attribution.load(out / "text000" / "attribution").tokens[0][1] == "old"
    else:
        assert not out.exists()
        with pytest.raises(FileNotFoundError):
            Attribution.load(out / "text000" / "attribution")


def test_leftovers_of_a_killed_run_need_overwrite(checkpoint, tmp_path, capsys):
    """A run killed without cleanup (SIGKILL, power loss) leaves only its staging directory."""
    out = tmp_path / "out"
    staged = out / f"{STAGING_PREFIX}abc" / "text000"
    staged.mkdir(parents=True)
    (staged / "attribution.safetensors").write_bytes(b"partial")
    code, _, err = run(analyze_args(checkpoint, out, "text"), capsys)
    assert code == 2 and "not empty" in one_line_error(err)
    assert run(analyze_args(checkpoint, out, "text", extra=["--overwrite"]), capsys)[0] == 0
    assert files_under(out) == [MANIFEST, "summary.json", "text000/attribution.safetensors"]


def test_html_title_is_never_a_template_slot(tmp_path):
    import re

    title = 'x {{DATA}} {{TITLE}} </script><script>alert(1)</script> & "q"'
    tokens = ["a", "{{DATA}}", "</script>"]
    maps = {"attn_w": torch.full((1, 3, 3), 1 / 3)}
    page = plots.html_report(maps, tokens, tmp_path / "r.html", title=title).read_text(encoding="utf-8")
    escaped = 'x {{DATA}} {{TITLE}} &lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;q&quot;'
    assert f"<title>{escaped}</title>" in page and f"<h1>{escaped}</h1>" in page
    assert page.count("<script") == page.count("</script>") == 2
    (data,) = re.findall(r'<script type="application/json" id="kobattr-data">(.*?)</script>', page, re.S)
    parsed = json.loads(data)
    assert parsed["tokens"] == tokens and parsed["maps"]["attn_w"][0][0] == [0.3333] * 3


def test_ff_gemm_option_reaches_the_ff_maps(checkpoint, tmp_path, capsys):
    runs = {}
    for gemm in ("float32", "bfloat16"):
        out = tmp_path / gemm
        code, _, _ = run(analyze_args(checkpoint, out, "The cat sat on the mat.", extra=("--ff-gemm", gemm)), capsys)
        assert code == 0
        runs[gemm] = Attribution.load(out / "text000" / "attribution")
    exact, rounded = runs["float32"].maps["atbff"], runs["bfloat16"].maps["atbff"]
    assert 1e-5 < float((rounded - exact).abs().max() / exact.abs().max()) < 5e-2  # the bfloat16 products ran
    assert torch.equal(runs["float32"].maps["attn_w"], runs["bfloat16"].maps["attn_w"])  # the attention side did not change


@pytest.mark.parametrize("module", ["kobattr", "kobattr.cli"])
def test_python_dash_m_runs_the_command(tmp_path, module):
    """`python -m kobattr` (and torchrun -m kobattr) is the `kobattr` command: it parses and dispatches."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "analyze", "x", "--max-length", "0"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "kobattr analyze: error: --max-length must be a positive number of tokens, got 0."
    assert os.listdir(tmp_path) == []
