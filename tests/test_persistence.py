"""Attribution.save/load: one safetensors file that loses nothing, written atomically, checked on load."""

import dataclasses
import json
import shutil
import os
import struct
import subprocess
import sys
import textwrap
from typing import Optional

import pytest
import torch

from kobattr.api import analyze
from kobattr.result import FORMAT_VERSION, Attribution, AttributionFileError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXTS = ["日本 café 🎉 naïve", "Short."]  # CJK pieces, an [UNK] and padding in the second text


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer BERT with MiniLM's tokenizer: real tokens, fast."""
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from kobattr.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    return AutoModel.from_config(config).eval(), tokenizer


@pytest.fixture(scope="module")
def full(tiny):
    model, tokenizer = tiny
    return analyze(model, TEXTS, tokenizer=tokenizer, methods="all", heads=True, backend="torch")


def assert_same(a: Attribution, b: Attribution):
    """Every field equal: tensors bit for bit with their dtype, dicts in their order, the rest by repr
    (so a tuple that came back as a list, or a lost NaN, fails)."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, f.name
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=f.name)
        elif isinstance(x, dict) and x and all(isinstance(v, torch.Tensor) for v in x.values()):
            assert list(x) == list(y), f.name
            for k in x:
                assert x[k].dtype == y[k].dtype, (f.name, k)
                torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True, msg=f"{f.name} {k}")
        else:
            assert repr(x) == repr(y), f.name


def test_round_trip_of_a_full_analysis(tmp_path, full):
    # the fixture must exercise what is easy to lose: non-ASCII tokens, heads, FF outputs, per-layer metadata
    assert "日" in full.tokens[0] and "[PAD]" in full.tokens[1]
    assert full.head_maps and full.context_change and any(any(per_batch) for per_batch in full.ff_amp)
    assert full.ratios["attn_w"].isnan().any()  # padding
    path = full.save(tmp_path / "res" / "attribution")
    assert path == tmp_path / "res" / "attribution.safetensors"
    assert sorted(os.listdir(path.parent)) == ["attribution.safetensors"]  # one file, nothing beside it
    back = Attribution.load(tmp_path / "res" / "attribution")
    assert_same(full, back)
    assert isinstance(back.methods, tuple) and isinstance(back.ff_amp[0][0][0], tuple)
    # the metadata sits in the safetensors header as one JSON string
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["kobattr"])
    assert header["format"] == FORMAT_VERSION == 3
    assert header["fields"]["tokens"]["value"][0][1] == "日"


@pytest.mark.parametrize("mode", ["rows", "contracted", "rows+contracted"])
def test_round_trip_of_rows_and_contractions(tmp_path, tiny, mode):
    model, tokenizer = tiny
    n = tokenizer(TEXTS, padding=True, return_tensors="pt")["input_ids"].shape[1]
    kwargs = {"rows": [0, 2]} if "rows" in mode else {}
    if "contracted" in mode:
        kwargs["contract"] = torch.ones(1, n)
    result = analyze(model, TEXTS, tokenizer=tokenizer, methods=["attn_w", "atbff"], backend="torch", **kwargs)
    assert result.contracted == ("contracted" in mode) and (result.rows is not None) == ("rows" in mode)
    back = Attribution.load(result.save(tmp_path / mode))
    assert_same(result, back)


@dataclasses.dataclass
class Extended(Attribution):
    """New fields of every kind must round-trip without save/load naming them."""

    extra: Optional[torch.Tensor] = None
    per_method: dict = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)


def test_any_new_field_round_trips(tmp_path, full):
    fields = {f.name: getattr(full, f.name) for f in dataclasses.fields(Attribution)}
    extended = Extended(**fields, extra=torch.arange(6, dtype=torch.int16).view(2, 3),
                        per_method={"b": torch.ones(2, dtype=torch.bfloat16), "a": torch.zeros(1)},
                        notes={"pair": (1, "二"), "nested": [[(0.5, None)], {"x": float("inf")}]})
    back = Extended.load(extended.save(tmp_path / "ext"))
    assert_same(extended, back)
    assert list(back.per_method) == ["b", "a"]


def test_dotted_names_stay_distinct(tmp_path, full):
    first = full.save(tmp_path / "out" / "run.v1")
    second = full.save(tmp_path / "out" / "run.v2")
    assert (first.name, second.name) == ("run.v1.safetensors", "run.v2.safetensors")
    assert sorted(os.listdir(tmp_path / "out")) == ["run.v1.safetensors", "run.v2.safetensors"]
    assert full.save(tmp_path / "out" / "run.v1.safetensors") == first  # no doubled suffix
    for name in ("run.v1", "run.v1.safetensors", str(tmp_path / "out" / "run.v2")):
        assert_same(full, Attribution.load(tmp_path / "out" / name))
    with pytest.raises(FileNotFoundError, match=r"run\.v3\.safetensors does not exist"):
        Attribution.load(tmp_path / "out" / "run.v3")


def test_utf8_whatever_the_locale(tmp_path, full):
    """Load and save again in a process whose locale is C with UTF-8 mode off (ASCII default encoding)."""
    path = full.save(tmp_path / "a")
    script = textwrap.dedent(f"""
        import json, sys
        from kobattr.result import Attribution
        a = Attribution.load({str(path)!r})
        a.save({str(tmp_path / "b")!r})
        print(ascii(json.dumps(a.tokens)))
        print(sys.getfilesystemencoding(), sys.flags.utf8_mode)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING", "PYTHONUTF8"))}
    env.update(LANG="C", LC_ALL="C", PYTHONUTF8="0")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    tokens_line, encoding_line = done.stdout.strip().splitlines()
    assert encoding_line.split()[1] == "0"  # really not in UTF-8 mode
    assert json.loads(eval(tokens_line)) == full.tokens
    assert_same(full, Attribution.load(tmp_path / "b"))


@pytest.fixture()
def saved(tmp_path, full):
    return full.save(tmp_path / "r")


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5, -1])
def test_truncated_file_is_refused(saved, keep):
    data = saved.read_bytes()
    keep = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    saved.write_bytes(data[:keep])
    with pytest.raises(AttributionFileError, match="truncated or corrupt"):
        Attribution.load(saved)


def test_flipped_byte_is_refused(saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x10
    saved.write_bytes(bytes(data))
    with pytest.raises(AttributionFileError, match="does not match its SHA-256 checksum"):
        Attribution.load(saved)


def rewrite_header(path, edit):
    """Apply edit(kobattr_metadata_dict) to the JSON in a safetensors header, keeping the tensor bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["kobattr"])
    edit(meta)
    header["__metadata__"]["kobattr"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _set(field, value):
    return lambda meta: meta["fields"][field].__setitem__("value", value)


@pytest.mark.parametrize("edit,message", [
    (_set("layers", {"__tuple__": [0, 1, 2]}), r"has 2 in dimension 0 but the number of layers is 3"),
    (_set("methods", {"__tuple__": ["attn_w", "atbffres", "bogus"]}), r"method 'bogus' is listed but has no maps"),
    (_set("tokens", [["a"], ["b"]]), r"tokens is not 2 list\(s\) of 7 tokens"),
    (_set("ff_amp", [[], [], []]), r"ff_amp has 3 entries for 2 layer\(s\)"),
    (_set("contracted", "yes"), r"contracted is not true or false"),
    (lambda m: m["fields"]["maps"]["keys"].pop(), r"holds tensors its metadata does not list \(maps/[a-z_0-9]+\)"),  # the last method
    (lambda m: m["fields"]["maps"]["keys"].append("attn_x"), r"lists tensors the file lacks \(maps/attn_x\)"),
    (lambda m: m["fields"].__setitem__("surprise", {"kind": "json", "value": 1}), r"field 'surprise'"),
    (lambda m: m.__setitem__("format", 1), r"format 1; this kobattr reads formats 2 and 3 only"),
])
def test_tampered_metadata_is_refused(saved, edit, message):
    Attribution.load(saved)  # fine before the edit
    rewrite_header(saved, edit)
    with pytest.raises(AttributionFileError, match=message):
        Attribution.load(saved)


def test_format_2_files_still_load(saved, tmp_path):
    """Format 2 named the block structure "placement"; everything else is the same."""
    want = Attribution.load(shutil.copy(saved, tmp_path / "copy.safetensors"))  # loads map the file: keep one aside

    def as_format_2(meta):
        meta["format"] = 2
        del meta["fields_sha256"]  # format 2 had no checksum of its field table
        meta["fields"]["placement"] = meta["fields"].pop("structure")

    rewrite_header(saved, as_format_2)
    assert_same(want, Attribution.load(saved))


def test_a_consistent_edit_of_the_metadata_fails_its_checksum(saved, tmp_path):
    def rename_a_token(meta):
        meta["fields"]["tokens"]["value"][0][1] = "edited"

    rewrite_header(saved, rename_a_token)
    with pytest.raises(AttributionFileError) as caught:
        Attribution.load(saved)
    assert str(caught.value) == f"{saved} is corrupt: its metadata does not match its SHA-256 checksum."

    # without the field checksum (files written before it existed) the same file loads, with the edit
    rewrite_header(saved, lambda meta: meta.pop("fields_sha256"))
    assert Attribution.load(saved).tokens[0][1] == "edited"


def test_a_pickle_is_never_unpickled(tmp_path):
    """A torch.save file (a pickle) under a result's name: refused as no safetensors file, its payload never runs."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "r.safetensors"
    script = textwrap.dedent(f"""
        import os, torch
        class Payload:
            def __reduce__(self):
                return (os.mkdir, ({str(marker)!r},))
        torch.save({{"maps": Payload()}}, {str(path)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=tmp_path)
    with pytest.raises(AttributionFileError, match="cannot be read as a safetensors file; it is truncated or corrupt"):
        Attribution.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["tensor", "metadata"])
def test_kobattr_view_names_a_tampered_file_in_one_line(saved, tmp_path, capsys, where):
    from kobattr.cli import main

    if where == "tensor":
        data = bytearray(saved.read_bytes())
        data[-5] ^= 0x10
        saved.write_bytes(bytes(data))
    else:
        rewrite_header(saved, lambda meta: meta["fields"]["model_name"].__setitem__("value", "another model"))
    assert main(["view", str(saved), "--out", str(tmp_path / "pages")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"kobattr view: error: {saved} is corrupt: ")
    assert ("does not match its SHA-256 checksum" in err) and not (tmp_path / "pages").exists()


def test_tampered_shapes_are_refused(tmp_path, full):
    """Consistent checksums but tensors that do not fit the metadata (e.g. written by a buggy writer)."""
    bad = dataclasses.replace(full, maps={**full.maps, "attn_w": full.maps["attn_w"][:, :, :3]})
    message = r"cannot save .* maps\['attn_w'\] has 3 query rows but full maps have 7"
    with pytest.raises(AttributionFileError, match=message):
        bad.save(tmp_path / "bad")
    assert not list(tmp_path.iterdir())  # refused before anything was written
    rows = dataclasses.replace(full, rows=torch.tensor([0, 9]), maps={m: t[:, :, :2] for m, t in full.maps.items()},
                               head_maps={})
    with pytest.raises(AttributionFileError, match=r"rows holds indices outside \[0, 7\)"):
        rows.save(tmp_path / "bad")


def test_file_of_format_1_is_refused_with_both_versions(tmp_path, full):
    from safetensors.torch import save_file

    save_file({"value_norms": full.value_norms.contiguous()}, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(AttributionFileError, match=r"format 1 .* reads formats 2 and 3 only"):
        Attribution.load(tmp_path / "old")
    (tmp_path / "old.json").unlink()
    with pytest.raises(AttributionFileError, match="not written by Attribution.save"):
        Attribution.load(tmp_path / "old")


@pytest.mark.parametrize("failure", ["fsync", "write"])
def test_interrupted_save_leaves_the_old_file_or_none(tmp_path, full, monkeypatch, failure):
    import safetensors.torch

    target = tmp_path / "r.safetensors"
    real_save_file = safetensors.torch.save_file

    def broken_fsync(fd):
        raise OSError("disk full")

    def half_written(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(100)
        raise KeyboardInterrupt

    def interrupt():
        if failure == "fsync":
            monkeypatch.setattr(os, "fsync", broken_fsync)
        else:
            monkeypatch.setattr(safetensors.torch, "save_file", half_written)

    interrupt()
    with pytest.raises((OSError, KeyboardInterrupt)):
        full.save(target)
    assert os.listdir(tmp_path) == []  # no target, no temporary file
    monkeypatch.undo()

    small = dataclasses.replace(full, model_name="old")
    small.save(target)
    before = target.read_bytes()
    interrupt()
    with pytest.raises((OSError, KeyboardInterrupt)):
        full.save(target)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["r.safetensors"] and target.read_bytes() == before
    assert Attribution.load(target).model_name == "old"


def test_file_mode_follows_the_umask(tmp_path, full):
    old = os.umask(0o022)
    try:
        path = full.save(tmp_path / "m")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
