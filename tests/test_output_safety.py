"""The output folder of `kobattr analyze` under stress, with real processes: two runs on one --out (the second is
refused with one line, the first's output is complete, a reader never sees a mix), symbolic links (nothing outside
--out is written or deleted), and a file size limit (`ulimit -f`: a one-line error, no file that loads as a result)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from test_cli import analyze_args, checkpoint, files_under, run  # noqa: F401 (checkpoint: the tiny BERT fixture)

from kobattr.io import HOLD_BEFORE_PUBLISH, MANIFEST, STAGE_MARK
from kobattr.result import Attribution, AttributionFileError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def command(checkpoint, out, text, *extra):
    return [sys.executable, "-m", "kobattr", *analyze_args(checkpoint, out, text, extra=extra)]


def environment(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def contents(root):
    return {f: (root / f).read_bytes() for f in files_under(root)}


def last_line(stderr: str) -> str:
    """The error line; anything before it would be a traceback."""
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def assert_complete(out, text):
    """``out`` holds exactly the files its manifest lists, and they are the run of ``text``."""
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["complete"] and manifest["texts"] == [text]
    assert files_under(out) == sorted(manifest["files"] + [MANIFEST])
    assert Attribution.load(out / "text000" / "attribution").tokens[0][1:-1] == text.split()


def no_stages_left(parent):
    return [p.name for p in parent.iterdir() if STAGE_MARK in p.name] == []


def snapshot(out):
    """What a reader sees through one handle on --out: (texts of the manifest, files present, tokens of text000),
    or None when --out was replaced while it read (then what it read may be the old run being deleted)."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        base = f"/proc/self/fd/{fd}"
        try:
            manifest = json.loads(open(f"{base}/{MANIFEST}", encoding="utf-8").read())
            present = sorted(os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs)
            tokens = Attribution.load(f"{base}/text000/attribution").tokens[0]
        except (FileNotFoundError, AttributionFileError):
            if os.path.samestat(os.fstat(fd), os.stat(out)):
                raise
            return None
        if not os.path.samestat(os.fstat(fd), os.stat(out)):
            return None
        return manifest["texts"], present == sorted(manifest["files"] + [MANIFEST]), tokens[1:-1]
    finally:
        os.close(fd)


def test_a_second_run_on_a_busy_out_is_refused_and_a_reader_sees_one_run(checkpoint, tmp_path, capsys):
    out = tmp_path / "conc"
    assert run(analyze_args(checkpoint, out, "one two three"), capsys)[0] == 0
    hold = tmp_path / "hold"
    hold.mkdir()
    first = subprocess.Popen(command(checkpoint, out, "four five six", "--overwrite"), cwd=tmp_path,
                             env=environment(**{HOLD_BEFORE_PUBLISH: str(hold)}), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (hold / "held").exists():  # the first run holds the lock, its output staged, not published
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = contents(out)
        second = subprocess.run(command(checkpoint, out, "seven eight", "--overwrite"), cwd=tmp_path,
                                env=environment(), capture_output=True, text=True, timeout=180)
        assert second.returncode == 2 and second.stdout == ""
        assert last_line(second.stderr) == (f"kobattr analyze: error: --out {str(out)!r} is in use by another kobattr "
                                            f"run (pid {first.pid}); wait for it to finish or choose another directory.")
        assert contents(out) == before  # nothing of the first run touched, nothing of the second written

        seen, stop = [], threading.Event()

        def reader():
            while not stop.is_set():
                seen.append(snapshot(out))

        thread = threading.Thread(target=reader)
        thread.start()
        time.sleep(0.3)
        (hold / "release").touch()
        printed, errors = first.communicate(timeout=180)
        stop.set()
        thread.join()
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, errors
    assert "wrote" in printed
    seen.append(snapshot(out))
    runs = {(("one two three",), True, ("one", "two", "three")), (("four five six",), True, ("four", "five", "six"))}
    complete = [(tuple(texts), ok, tuple(tokens)) for texts, ok, tokens in filter(None, seen)]
    assert set(complete) <= runs, set(complete) - runs  # never a mix of the two runs, never an incomplete one
    assert complete[0][0] == ("one two three",) and complete[-1][0] == ("four five six",)
    print(f"{len(seen)} reads, {len(complete)} of one whole run, {seen.count(None)} of a replaced --out")
    assert_complete(out, "four five six")
    assert no_stages_left(tmp_path)


def test_two_runs_started_at_once_leave_one_complete_output(checkpoint, tmp_path):
    """The reported failure: both started at once on a new --out. One publishes; the other is refused with one
    line, whether it met the lock or the first's complete output."""
    out = tmp_path / "conc"
    texts = ["one two three", "four five six"]
    runs = [subprocess.Popen(command(checkpoint, out, text), cwd=tmp_path, env=environment(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for text in texts]
    done = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in runs]
    assert sorted(code for *_, code in done) == [0, 2], done
    (winner,) = [k for k, (*_, code) in enumerate(done) if code == 0]
    loser_error = last_line(done[1 - winner][2])
    assert loser_error in (
        f"kobattr analyze: error: --out {str(out)!r} is in use by another kobattr run (pid {done[winner][0]}); wait "
        "for it to finish or choose another directory.",
        f"kobattr analyze: error: --out {str(out)!r} is not empty; choose a new or empty directory, or pass "
        "--overwrite to replace what an earlier kobattr run wrote there.")
    assert_complete(out, texts[winner])
    assert no_stages_left(tmp_path)


def test_a_symlinked_out_is_refused(checkpoint, tmp_path, capsys):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "out").symlink_to(target)
    code, _, err = run(analyze_args(checkpoint, tmp_path / "out", "text", extra=["--overwrite"]), capsys)
    assert code == 2
    assert last_line(err) == (f"kobattr analyze: error: --out {str(tmp_path / 'out')!r} is a symbolic link; give the "
                              "directory itself, so that nothing is written or deleted outside it.")
    assert list(target.iterdir()) == [] and (tmp_path / "out").is_symlink()


@pytest.mark.parametrize("link", ["text000", "summary.json"])
def test_a_symlink_inside_out_is_never_followed(checkpoint, tmp_path, capsys, link):
    """--overwrite refuses an earlier output in which a listed file or directory became a link out of --out."""
    out = tmp_path / "out"
    assert run(analyze_args(checkpoint, out, "text"), capsys)[0] == 0
    victim = tmp_path / "victim"
    (out / link).rename(victim)
    (out / link).symlink_to(victim)
    before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} if victim.is_dir() else victim.read_bytes()
    code, _, err = run(analyze_args(checkpoint, out, "other", extra=["--overwrite"]), capsys)
    assert code == 2 and ("not inside --out" in last_line(err) or "kobattr did not write" in last_line(err))
    after = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} if victim.is_dir() else victim.read_bytes()
    assert after == before and (out / link).is_symlink()


@pytest.mark.parametrize("earlier_run", [False, True])
def test_a_file_size_limit_gives_one_line_and_no_result(checkpoint, tmp_path, capsys, earlier_run):
    """`ulimit -f` (Python ignores SIGXFSZ, so a write past it fails with EFBIG) stops the attribution file."""
    text = " ".join(["word"] * 40)
    sizes = tmp_path / "sizes"
    assert run(analyze_args(checkpoint, sizes, text), capsys)[0] == 0
    size = (sizes / "text000" / "attribution.safetensors").stat().st_size
    out = tmp_path / "out"
    if earlier_run:
        assert run(analyze_args(checkpoint, out, "old text"), capsys)[0] == 0
    before = contents(out) if earlier_run else None
    limit = size // 2 // 1024  # blocks of 1024 bytes: half the attribution file
    assert limit > 4  # the summary and the manifest fit
    line = " ".join(f"'{a}'" for a in command(checkpoint, out, text, "--overwrite"))
    done = subprocess.run(["bash", "-c", f"ulimit -f {limit}; exec {line}"], cwd=tmp_path, env=environment(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 1 and done.stdout == ""
    assert last_line(done.stderr) == (f"kobattr analyze: error: cannot write the output into {out}: File too large; "
                                      "it is as it was before this run.")
    if earlier_run:
        assert contents(out) == before
    else:
        assert not out.exists()
    assert no_stages_left(tmp_path)
    loaded = []
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.parent.parent != sizes:
            try:
                loaded.append(Attribution.load(path))
            except (AttributionFileError, FileNotFoundError):
                pass
    assert [r.tokens[0][1:-1] for r in loaded] == ([["old", "text"]] if earlier_run else [])
