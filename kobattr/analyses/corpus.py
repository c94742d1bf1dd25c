"""Corpus runs (`kobattr corpus`, run_corpus): mixing ratios and bias norms of every token of a corpus, pooled
statistics and the 2021 frequency correlation, sharded over torch.distributed ranks and resumable.

The plan: texts are cut into shards of ``shard_size`` consecutive texts (fixed by the text ranges, not by the
number of ranks) and written once, by rank 0, into ``manifest.json`` before any work, with everything that
decides the outputs (model and tokenizer identity, input content, methods, layers, settings). Every rank then
takes every size-th shard of the ones not yet complete, batches each shard's texts by length, and writes the
shard's files atomically, its record last: ``tokens/shard-NNNNN.parquet`` (the per-token table of the shard),
``maps/shard-NNNNN.safetensors`` (with save_maps) and ``shards/shard-NNNNN.json`` (text range, SHA-256 of each
file, partial statistics). A shard is complete when its record is there and every checksum matches, so a run
killed at any point continues with ``resume`` (any number of ranks): complete shards are skipped, truncated or
corrupted ones are recomputed. No file is written by two ranks. Rank 0 merges at the end, from the records on
disk in shard order with float64 sums, so the summary does not depend on the number of ranks or on
interruptions: ``summary.json`` and ``summary.png``.

Per-token table (``tokens/``, one Parquet file per shard; read the directory with
``pyarrow.dataset.dataset(out / "tokens")`` or ``pandas.read_parquet(out / "tokens")``), one row per text, real
token, analysed layer and method, ordered by text, layer, method (in the run's order) and position:
text_id int64 (index of the text in the input), position int32 (among the text's real tokens, from 0), token
string, layer int16 (model layer index as in the API, from 0), method string, mixing_ratio float32, bias_norm
float32 (null for the weight methods, which have no bias part), token_id int64, special bool (one of the
tokenizer's special tokens).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..distributed import world
from ..core import FF_GEMM_DTYPES
from ..layer import LayerInputError
from ..io import OutputError, atomic_write, file_sha256, lock_directory, write_safetensors

RUN_FORMAT = 1
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
SUMMARY_PLOT = "summary.png"
DEFAULT_SHARD_SIZE = 256
DEFAULT_BATCH_SIZE = 16
# a test hook: the process kills itself (SIGKILL) right after writing its n-th shard record
FAULT_AFTER_SHARDS = "KOBATTR_FAULT_AFTER_SHARDS"
TEXT_KEY = "text"  # the default JSON Lines field and Parquet / dataset column
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
FINGERPRINT_SAMPLE = 4096  # values per parameter that go into the model's fingerprint
# the longest text of a corpus, in UTF-8 bytes (a line of a text or JSON Lines file, a Parquet or dataset value):
# about 200k words, far more than any model reads, and a bound on what one read takes (a file without line breaks)
MAX_TEXT_BYTES = 1 << 20
FREQUENCY_DEFINITION = (
    "Spearman's rho between a token's mixing ratio and its type's frequency rank, over the ordinary tokens of "
    "the corpus (special tokens excluded; rank 1 = most frequent, ties share their average rank), per layer and "
    "pooled over layers, as `kobattr reproduce` defines it for ATTNRESLN-N (here nothing is masked)")


class CorpusError(ValueError):
    """A corpus run refused: bad input, an output directory that holds something else, a mismatched resume."""


def _missing_pyarrow() -> CorpusError:
    return CorpusError("corpus runs write Parquet and need pyarrow: pip install 'kobattr[corpus]'.")


# --------------------------------------------------------------------------------------------------- input
@dataclass
class CorpusInput:
    """The texts of a corpus: how many, the SHA-256 of the input's content, and texts by index range, read
    from disk when asked for (a corpus never has to fit in memory)."""

    path: Path
    format: str  # "text", "jsonl", "parquet" or "dataset"
    key: Optional[str]  # the JSON Lines field or Parquet / dataset column
    count: int
    sha256: Optional[str]
    _read: Callable[[int, int], list]

    def texts(self, start: int, stop: int) -> list[str]:
        return self._read(start, stop)

    def describe(self) -> dict:
        return {"path": str(self.path), "format": self.format, "key": self.key, "texts": self.count,
                "sha256": self.sha256}


def open_corpus(path, field: Optional[str] = None, column: Optional[str] = None, digest: bool = True) -> CorpusInput:
    """The texts of ``path``: a text file (one text per line, blank lines skipped), JSON Lines (.jsonl, .ndjson,
    .json: one object per line, the text in ``field``, default "text"), Parquet (.parquet, .pq: ``column``,
    default "text") or a Hugging Face dataset saved with ``save_to_disk`` (a directory: ``column``). Every record
    is checked here; digest=False skips the content's SHA-256."""
    path = Path(path)
    if field is not None and column is not None:
        raise CorpusError("give --field (JSON Lines) or --column (Parquet, datasets), not both.")
    if not path.exists():
        raise CorpusError(f"--file {str(path)!r} does not exist.")
    if path.is_dir():
        if field is not None:
            raise CorpusError(f"{path} is a dataset directory, whose texts are in a column: use --column, not --field.")
        return _open_dataset(path.resolve(), column or TEXT_KEY, digest)
    suffix = path.suffix.lower()
    if suffix in JSON_LINES_SUFFIXES:
        if column is not None:
            raise CorpusError(f"{path} is JSON Lines, whose texts are in a field: use --field, not --column.")
        return _open_lines(path.resolve(), "jsonl", field or TEXT_KEY, digest)
    if suffix in PARQUET_SUFFIXES:
        if field is not None:
            raise CorpusError(f"{path} is Parquet, whose texts are in a column: use --column, not --field.")
        return _open_parquet(path.resolve(), column or TEXT_KEY, digest)
    if field is not None or column is not None:
        raise CorpusError(f"{path} is read as a text file with one text per line; --field is for JSON Lines "
                          f"({', '.join(JSON_LINES_SUFFIXES)}) and --column for Parquet ({', '.join(PARQUET_SUFFIXES)}) "
                          "and dataset directories.")
    return _open_lines(path.resolve(), "text", None, digest)


def _line_text(path: Path, kind: str, key: Optional[str], line: bytes, number: int) -> Optional[str]:
    """The text of one line (None for a blank line), or CorpusError naming the line."""
    if len(line.rstrip(b"\r\n")) > MAX_TEXT_BYTES:
        raise CorpusError(f"line {number} of {path} is longer than {MAX_TEXT_BYTES >> 20} MiB, the most one text of a "
                          "corpus may hold; split it into several lines.")
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"line {number} of {path} is not UTF-8 ({err.reason} at byte {err.start}).") from None
    if not decoded.strip():
        return None
    if kind == "text":
        return decoded.strip()
    try:
        record = json.loads(decoded.rstrip("\r\n"))  # so that its error counts columns of this line only
    except ValueError as err:
        raise CorpusError(f"line {number} of {path} is not valid JSON ({err}); JSON Lines has one object per "
                          "line.") from None
    if not isinstance(record, dict):
        raise CorpusError(f"line {number} of {path} is a JSON {type(record).__name__}, not an object; JSON Lines "
                          "has one object per line.")
    if key not in record:
        raise CorpusError(f"line {number} of {path} has no field {key!r} (it has {', '.join(map(repr, record)) or 'none'}); "
                          "name the text's field with --field.")
    if not isinstance(record[key], str):
        raise CorpusError(f"field {key!r} on line {number} of {path} is a {type(record[key]).__name__}, not a "
                          "string.")
    return record[key]


def _open_lines(path: Path, kind: str, key: Optional[str], digest: bool) -> CorpusInput:
    """A text or JSON Lines file, indexed by the byte offset of each non-blank line."""
    h = hashlib.sha256()
    offsets, numbers, position = [], [], 0
    with open(path, "rb") as fh:
        # at most one byte past the limit (and the line end) is read, so that an overlong line is refused at once
        for number, line in enumerate(iter(lambda: fh.readline(MAX_TEXT_BYTES + 3), b""), 1):
            if digest:
                h.update(line)
            if _line_text(path, kind, key, line, number) is not None:
                offsets.append(position)
                numbers.append(number)
            position += len(line)
    if not position:
        raise CorpusError(f"{path} is empty; give one text per line.")
    if not offsets:
        raise CorpusError(f"{path} holds no text, only blank lines.")
    offsets, numbers = np.array(offsets, dtype=np.int64), np.array(numbers, dtype=np.int64)

    def read(start: int, stop: int) -> list[str]:
        texts = []
        with open(path, "rb") as fh:
            for offset, number in zip(offsets[start:stop], numbers[start:stop]):
                fh.seek(int(offset))
                text = _line_text(path, kind, key, fh.readline(MAX_TEXT_BYTES + 3), int(number))
                if text is None:
                    raise CorpusError(f"{path} changed while the run read it (line {number} is blank now).")
                texts.append(text)
        return texts

    return CorpusInput(path, kind, key, len(offsets), h.hexdigest() if digest else None, read)


def _open_parquet(path: Path, key: str, digest: bool) -> CorpusInput:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise _missing_pyarrow() from None
    try:
        table_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise CorpusError(f"{path} cannot be read as Parquet ({err}).") from None
    schema = table_file.schema_arrow
    if key not in schema.names:
        raise CorpusError(f"{path} has no column {key!r} (it has {', '.join(map(repr, schema.names))}); name the "
                          "text's column with --column.")
    if not (pa.types.is_string(schema.field(key).type) or pa.types.is_large_string(schema.field(key).type)):
        raise CorpusError(f"column {key!r} of {path} holds {schema.field(key).type}, not strings.")
    import pyarrow.compute as pc

    seen = 0
    for batch in table_file.iter_batches(columns=[key]):
        if batch.column(0).null_count:
            first = seen + batch.column(0).is_null().to_pylist().index(True)
            raise CorpusError(f"row {first} of column {key!r} in {path} is null; give every row a text.")
        too_long = pc.greater(pc.binary_length(batch.column(0)), MAX_TEXT_BYTES)
        if pc.any(too_long).as_py():
            first = seen + too_long.to_pylist().index(True)
            raise CorpusError(f"row {first} of column {key!r} in {path} is longer than {MAX_TEXT_BYTES >> 20} MiB, the "
                              "most one text of a corpus may hold; split it into several rows.")
        seen += batch.num_rows
    if not seen:
        raise CorpusError(f"{path} holds no rows.")
    starts = np.cumsum([0] + [table_file.metadata.row_group(g).num_rows for g in range(table_file.num_row_groups)])

    def read(start: int, stop: int) -> list[str]:
        first, last = int(np.searchsorted(starts, start, "right")) - 1, int(np.searchsorted(starts, stop, "left"))
        table = table_file.read_row_groups(list(range(first, last)), columns=[key])
        return table.column(0).slice(start - int(starts[first]), stop - start).to_pylist()

    return CorpusInput(path, "parquet", key, seen, file_sha256(path) if digest else None, read)


def _open_dataset(path: Path, key: str, digest: bool) -> CorpusInput:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise CorpusError(f"{path} is a DatasetDict with the splits {', '.join(splits)}; give one split's directory, "
                          f"e.g. {path / (splits[0] if splits else 'train')}.")
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise CorpusError(f"{path} is a directory but not a Hugging Face dataset saved with save_to_disk; give a "
                          "file or such a dataset's directory.")
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{path} is a Hugging Face dataset, and reading it needs the datasets package: "
                          "pip install 'kobattr[datasets]'.") from None
    data = datasets.load_from_disk(str(path))
    if key not in data.column_names:
        raise CorpusError(f"the dataset {path} has no column {key!r} (it has {', '.join(map(repr, data.column_names))}); "
                          "name the text's column with --column.")
    feature = data.features[key]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise CorpusError(f"column {key!r} of the dataset {path} holds {feature}, not strings.")
    values = data.data.column(key)
    if values.null_count:
        first = values.is_null().to_pylist().index(True)
        raise CorpusError(f"row {first} of column {key!r} in the dataset {path} is null; give every row a text.")
    if not len(data):
        raise CorpusError(f"the dataset {path} holds no rows.")
    sha = None
    if digest:
        h = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{file.relative_to(path).as_posix()}\n{file_sha256(file)}\n".encode())
        sha = h.hexdigest()
    return CorpusInput(path, "dataset", key, len(data), sha, lambda start, stop: data[start:stop][key])


# ------------------------------------------------------------------------------------------------ identity
def model_identity(model, tokenizer) -> dict:
    """What makes the outputs this model's: its name (informative only), a SHA-256 of its configuration, a
    fingerprint of its parameters (name, dtype, shape and an evenly strided sample of each) and of its tokenizer."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    params = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // FINGERPRINT_SAMPLE)][:FINGERPRINT_SAMPLE].cpu().contiguous()
        params.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        params.update(sample.view(torch.uint8).numpy().tobytes())
    if hasattr(tokenizer, "backend_tokenizer"):
        described = json.loads(tokenizer.backend_tokenizer.to_str())
        for state in ("truncation", "padding"):  # set by each call, not part of what the tokenizer is
            described.pop(state, None)
        vocabulary = json.dumps(described, sort_keys=True, ensure_ascii=False)
    else:
        vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    tokens = hashlib.sha256(f"{type(tokenizer).__name__}\n{tokenizer.padding_side}\n"
                            f"{sorted(tokenizer.all_special_ids)}\n{vocabulary}".encode())
    return {"name": getattr(model.config, "_name_or_path", "") or model.config.model_type,
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "parameters_fingerprint": params.hexdigest(), "tokenizer_sha256": tokens.hexdigest()}


# what a resume compares: (path in the manifest, its name in the refusal, whether the values are shown)
_COMPARED = [
    (("kobattr",), "kobattr version", True), (("format",), "run format", True),
    (("model", "config_sha256"), "model configuration", False),
    (("model", "parameters_fingerprint"), "model parameters", False),
    (("model", "tokenizer_sha256"), "tokenizer", False),
    (("input", "format"), "input format", True), (("input", "key"), "input field/column", True),
    (("input", "texts"), "number of input texts", True), (("input", "sha256"), "input content", False),
    *((("settings", s), s.replace("_", " "), True) for s in ("methods", "layers", "max_length", "shard_size",
                                                             "batch_size", "backend", "verify", "save_maps",
                                                             "ff_gemm")),
]


_DEFAULTS = {("settings", "ff_gemm"): "float32"}  # what a run from before the setting existed used


def _differences(stored: dict, current: dict) -> list[str]:
    """What differs between a run's manifest and the current request, named as a refusal says it."""
    def get(manifest, path):
        for part in path:
            manifest = manifest.get(part) if isinstance(manifest, dict) else None
        return _DEFAULTS.get(path) if manifest is None else manifest

    named = []
    for path, name, show in _COMPARED:
        was, now = get(stored, path), get(current, path)
        if was != now:
            named.append(f"{name} (run: {was!r}, now: {now!r})" if show else name)
    return named


# ---------------------------------------------------------------------------------------------- the layout
def shard_plan(count: int, shard_size: int) -> list[list[int]]:
    """[start, stop) text ranges of shard_size texts (the last one shorter)."""
    return [[start, min(start + shard_size, count)] for start in range(0, count, shard_size)]


@dataclass(frozen=True)
class _Layout:
    out: Path
    shards: int

    def _name(self, index: int) -> str:
        return f"shard-{index:0{max(5, len(str(self.shards - 1)))}d}"

    def record(self, index: int) -> Path:
        return self.out / "shards" / f"{self._name(index)}.json"

    def tokens(self, index: int) -> Path:
        return self.out / "tokens" / f"{self._name(index)}.parquet"

    def maps(self, index: int) -> Path:
        return self.out / "maps" / f"{self._name(index)}.safetensors"

    def files(self, index: int, save_maps: bool) -> list[Path]:
        return [self.tokens(index)] + ([self.maps(index)] if save_maps else [])

    def directories(self) -> list[Path]:
        return [self.out / "shards", self.out / "tokens", self.out / "maps"]


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _complete_record(layout: _Layout, index: int, span: list[int], save_maps: bool) -> Optional[dict]:
    """The shard's record when it and every file it lists are intact (checksums match), else None."""
    record = _read_json(layout.record(index))
    if record is None or record.get("shard") != index or record.get("texts_range") != span:
        return None
    expected = {p.relative_to(layout.out).as_posix(): p for p in layout.files(index, save_maps)}
    if not isinstance(record.get("files"), dict) or set(record["files"]) != set(expected):
        return None
    for rel, path in expected.items():
        if not path.is_file() or file_sha256(path) != record["files"][rel]:
            return None
    return record


# ---------------------------------------------------------------------------------------------- one shard
@dataclass
class _Job:
    """Everything a rank needs to compute shards."""

    model: object
    tokenizer: object
    corpus: CorpusInput
    layout: _Layout
    methods: tuple
    layers: list
    batch_size: int
    max_length: Optional[int]
    backend: object
    verify: int
    save_maps: bool
    ff_gemm: str


def _token_schema():
    import pyarrow as pa

    return pa.schema([("text_id", pa.int64()), ("position", pa.int32()), ("token", pa.string()),
                      ("layer", pa.int16()), ("method", pa.string()), ("mixing_ratio", pa.float32()),
                      ("bias_norm", pa.float32()), ("token_id", pa.int64()), ("special", pa.bool_())])


def _compute_shard(job: _Job, index: int, span: list[int], between_batches: Callable[[], None]) -> dict:
    """Analyse one shard's texts (batched by length), write its files and, last, its record; returns the record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..api import analyze

    start, stop = span
    texts = job.corpus.texts(start, stop)
    tokenizer, methods, n_layers, n_methods = job.tokenizer, job.methods, len(job.layers), len(job.methods)
    ids = [tokenizer(t, truncation=job.max_length is not None, max_length=job.max_length)["input_ids"] for t in texts]
    special_ids = set(tokenizer.all_special_ids)
    order = sorted(range(len(texts)), key=lambda k: (len(ids[k]), k))  # similar lengths share a batch: less padding
    per_text: list = [None] * len(texts)  # (ratios (L, M, n), bias norms (L, M, n), tokens) of each text
    with_bias: set = set()  # the methods with a bias part (the weight methods have none)
    # the worst errors of the shard; None where nothing was measured (no FF method, verify=0)
    maps, worst = {}, {"model_error": None, "completeness": None, "spot_check": None}
    for first in range(0, len(order), job.batch_size):
        chunk = order[first:first + job.batch_size]
        try:
            result = analyze(job.model, [texts[k] for k in chunk], tokenizer=tokenizer, methods=list(methods),
                             layers=job.layers, backend=job.backend, verify=job.verify, max_length=job.max_length,
                             ff_gemm=job.ff_gemm)
        except LayerInputError as err:  # say which texts
            raise CorpusError(f"texts {', '.join(str(start + k) for k in sorted(chunk))}: {err}") from None
        with_bias |= set(result.bias_norms)
        for name, values in (("model_error", [result.model_error]), ("completeness", result.completeness.values()),
                             ("spot_check", result.spot_check.values())):
            worst[name] = _worst([worst[name]] + [float(v.max()) for v in values if v is not None])
        for b, k in enumerate(chunk):
            real = result.attention_mask[b].nonzero().squeeze(1)
            if len(real) != len(ids[k]):
                raise RuntimeError(f"text {start + k}: analyze saw {len(real)} tokens where the tokenizer gives "
                                   f"{len(ids[k])}.")
            none = torch.full((n_layers, len(real)), float("nan"))  # placeholder, stored as null
            ratios = torch.stack([result.ratios[m][:, b, real].float() for m in methods], 1)
            bias = torch.stack([result.bias_norms[m][:, b, real].float() if m in result.bias_norms else none
                                for m in methods], 1)
            per_text[k] = (ratios.numpy(), bias.numpy(), [result.tokens[b][i] for i in real.tolist()])
            if job.save_maps:
                for m in methods:
                    maps[f"{start + k}/{m}"] = result.maps[m][:, b][:, real][:, :, real].contiguous()
        between_batches()

    # the table: per text a (layer, method, position) grid, flattened in that order
    def grid(values: np.ndarray, axis: int, n: int) -> np.ndarray:
        shape = [1, 1, 1]
        shape[axis] = -1
        return np.broadcast_to(values.reshape(shape), (n_layers, n_methods, n)).reshape(-1)

    has_bias = np.array([m in with_bias for m in methods])
    method_index = np.concatenate([grid(np.arange(n_methods, dtype=np.int32), 1, len(x)) for x in ids])
    columns = {
        "text_id": np.concatenate([np.full(n_layers * n_methods * len(x), start + k, dtype=np.int64)
                                   for k, x in enumerate(ids)]),
        "position": np.concatenate([grid(np.arange(len(x), dtype=np.int32), 2, len(x)) for x in ids]),
        "token": [token for _, _, tokens in per_text for token in tokens * (n_layers * n_methods)],
        "layer": np.concatenate([grid(np.array(job.layers, dtype=np.int16), 0, len(x)) for x in ids]),
        "method": pa.DictionaryArray.from_arrays(pa.array(method_index), pa.array(list(methods), pa.string()))
                  .cast(pa.string()),
        "mixing_ratio": np.concatenate([r.reshape(-1) for r, _, _ in per_text]),
        "bias_norm": pa.array(np.concatenate([b.reshape(-1) for _, b, _ in per_text]), pa.float32(),
                              mask=~has_bias[method_index]),
        "token_id": np.concatenate([grid(np.array(x, dtype=np.int64), 2, len(x)) for x in ids]),
        "special": np.concatenate([grid(np.array([t in special_ids for t in x], dtype=bool), 2, len(x))
                                   for x in ids]),
    }
    table = pa.table(columns, schema=_token_schema())
    layout = job.layout
    for path in layout.files(index, job.save_maps):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(layout.tokens(index), lambda tmp: pq.write_table(table, tmp))
    if job.save_maps:
        write_safetensors(layout.maps(index), maps, {"layers": json.dumps(job.layers), "methods": json.dumps(methods)})

    # partial statistics: float64 sums over the shard's tokens
    sums = np.stack([np.concatenate([part[i] for part in per_text], -1) for i in (0, 1)]).astype(np.float64).sum(-1)
    ordinary = [t for x in ids for t in x if t not in special_ids]
    record = {
        "format": RUN_FORMAT, "shard": index, "texts_range": list(span), "texts": stop - start,
        "tokens": sum(len(x) for x in ids), "ordinary_tokens": len(ordinary),
        "ratio_sum": {m: sums[0, :, mi].tolist() for mi, m in enumerate(methods)},
        "bias_norm_sum": {m: sums[1, :, mi].tolist() for mi, m in enumerate(methods) if has_bias[mi]},
        "token_counts": {str(t): c for t, c in sorted(Counter(ordinary).items())},
        "worst": worst,
        "files": {p.relative_to(layout.out).as_posix(): file_sha256(p) for p in layout.files(index, job.save_maps)},
    }
    layout.record(index).parent.mkdir(exist_ok=True)
    atomic_write(layout.record(index), lambda tmp: tmp.write_text(json.dumps(record, indent=1), encoding="utf-8"))
    return record


# ----------------------------------------------------------------------------------------------- progress
class _Progress:
    """Rank 0's bar for the whole world: texts, texts/s, tokens/s and ETA, counted from the shard records that
    appear on disk (every rank writes them into the shared output directory)."""

    def __init__(self, layout: _Layout, todo: list[int], total: int, done: int, ranks: int, enabled: bool):
        from tqdm.auto import tqdm

        self.layout, self.pending = layout, set(todo)
        # records already there belong to shards being recomputed (corrupt files): count only their replacements
        self.replaced = {i: _identity(layout.record(i)) for i in todo if layout.record(i).exists()}
        self.bar = tqdm(total=total, initial=done, unit="text", desc=f"corpus on {ranks} rank(s)", disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        self.tokens, self.started, self.polled = 0, time.perf_counter(), 0.0

    def poll(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.pending or (not force and now - self.polled < 0.5):
            return
        self.polled = now
        try:
            present = {entry.name for entry in os.scandir(self.layout.out / "shards")}
        except FileNotFoundError:
            return
        for index in sorted(i for i in self.pending if self.layout.record(i).name in present):
            path = self.layout.record(index)
            record = _read_json(path)
            if record is None or (index in self.replaced and _identity(path) == self.replaced[index]):
                continue
            self.pending.discard(index)
            self.tokens += record["tokens"]
            self.bar.update(record["texts"])
        self.bar.set_postfix_str(f"{self.tokens / max(now - self.started, 1e-9):,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        self.poll(force=True)
        self.bar.close()


def _identity(path: Path) -> Optional[tuple]:
    """(inode, modification time) of a file: an atomic replacement changes it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


# ------------------------------------------------------------------------------------------------ the run
# what a run killed while it wrote its manifest leaves (kobattr.io.atomic_write's temporary): the run never began
_STALE_MANIFEST = re.compile(re.escape(f".{MANIFEST}.") + "[0-9a-f]{12}" + re.escape(".tmp"))


def _start(out: Path, manifest: dict, resume: bool, save_maps: bool) -> tuple[list, list[int]]:
    """Rank 0: check or create the run in ``out``; returns (shard plan, shards still to compute)."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {str(out)!r} is a file; give a directory (it is created if missing).")
    stored_path = out / MANIFEST
    if stored_path.is_file():
        if not resume:
            raise CorpusError(f"--out {str(out)!r} holds a corpus run; pass --resume to continue it, or choose a new "
                              "directory.")
        stored = _read_json(stored_path)
        if stored is None or not isinstance(stored.get("shards"), list):
            raise CorpusError(f"{stored_path} is unreadable; that run cannot be resumed, so start a new one in "
                              "another directory.")
        differences = _differences(stored, manifest)
        if differences:
            raise CorpusError(f"--out {str(out)!r} holds a run with another {'; '.join(differences)}; resume it with "
                              "what it was started with, or start a new run in another directory.")
        manifest = stored
    elif out.is_dir() and any(p for p in out.iterdir() if not _STALE_MANIFEST.fullmatch(p.name)):
        raise CorpusError(f"--out {str(out)!r} is not empty and holds no corpus run ({MANIFEST}); choose a new or empty "
                          "directory.")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(stored_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False),
                                                             encoding="utf-8"))
    plan = manifest["shards"]
    layout = _Layout(out, len(plan))
    for directory in [out] + layout.directories():  # temporaries of writes that a kill interrupted
        if directory.is_dir():
            for stale in directory.glob(".*.tmp"):
                stale.unlink()
    todo = [i for i, span in enumerate(plan) if _complete_record(layout, i, span, save_maps) is None]
    return plan, todo


def _fault_after() -> Optional[int]:
    value = os.environ.get(FAULT_AFTER_SHARDS)
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise CorpusError(f"{FAULT_AFTER_SHARDS}={value!r} must be a positive number of shards.")
    return int(value)


def run_corpus(model, tokenizer, file, out, field: Optional[str] = None, column: Optional[str] = None,
               methods=None, layers: Optional[Sequence[int]] = None, resume: bool = False,
               shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = DEFAULT_BATCH_SIZE,
               max_length: Optional[int] = None, backend="auto", verify: int = 2, save_maps: bool = False,
               progress: bool = True, ff_gemm: str = "auto") -> Optional[dict]:
    """Analyse every text of ``file`` (see open_corpus) into ``out`` (see the module docstring); under torchrun
    the ranks share the shards. Returns the summary (summary.json) on rank 0, None on the other ranks.

    methods, layers, backend, verify, max_length, ff_gemm: as for kobattr.analyze. resume: continue the run in ``out``
    (refused when anything that decides its outputs differs; a new or empty ``out`` starts a run). shard_size:
    texts per shard (the unit of work, of resuming and of the files). batch_size: texts per analyze() call.
    save_maps: also write every text's full maps (maps/). With CUDA, a model on the CPU is moved to this rank's
    GPU (cuda:LOCAL_RANK).
    """
    from .. import __version__
    from ..api import _wanted_layers
    from ..methods import check_methods
    from ..models import get_adapter

    if importlib.util.find_spec("pyarrow") is None:
        raise _missing_pyarrow()
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CorpusError(f"{name} must be a positive number of texts, got {value!r}.")
    if isinstance(verify, bool) or not isinstance(verify, int) or verify < 0:
        raise CorpusError(f"verify must be a number of sampled rows >= 0 (0 disables the spot check), got {verify!r}.")
    if ff_gemm not in FF_GEMM_DTYPES:
        raise CorpusError(f"ff_gemm must be one of {', '.join(FF_GEMM_DTYPES)}, got {ff_gemm!r}.")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise CorpusError(f"max_length must be a positive number of tokens, got {max_length!r}.")
    fault_after = _fault_after()
    adapter = get_adapter(model)
    methods = check_methods(methods, adapter.structure(model.config))
    layers = _wanted_layers(layers, len(adapter.layer_modules(model)))
    out = Path(out).resolve()
    here = world()
    if here.device.type == "cuda" and all(p.device.type == "cpu" for p in model.parameters()):
        model.to(here.device)

    corpus = None
    # the manifest names the product's dtype, so "auto" and its resolution are the same run on resume
    model_dtype = next(model.parameters()).dtype
    stored_ff_gemm = ff_gemm if ff_gemm != "auto" else {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        model_dtype, "float32")

    lock = None  # rank 0 holds a flock on --out for the whole run: a second run on it is refused in one line

    def start():
        nonlocal corpus, lock
        corpus = open_corpus(file, field=field, column=column)
        if out.exists() and not out.is_dir():
            raise CorpusError(f"--out {str(out)!r} is a file; give a directory (it is created if missing).")
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock = lock_directory(out)
        except OutputError as err:
            raise CorpusError(str(err)) from None
        manifest = {"format": RUN_FORMAT, "kobattr": __version__, "model": model_identity(model, tokenizer),
                    "input": corpus.describe(),
                    "settings": {"methods": list(methods), "layers": layers, "max_length": max_length,
                                 "shard_size": shard_size, "batch_size": batch_size, "backend": backend,
                                 "verify": verify, "save_maps": save_maps, "ff_gemm": stored_ff_gemm},
                    "shards": shard_plan(corpus.count, shard_size)}
        return _start(out, manifest, resume, save_maps)

    try:
        plan, todo = here.agree(start)
        if not here.main:  # rank 0 checked the content; every rank reads its own shards' texts
            corpus = open_corpus(file, field=field, column=column, digest=False)
            if corpus.count != plan[-1][1]:
                raise CorpusError(f"{file} holds {corpus.count} texts on rank {here.rank} but {plan[-1][1]} on rank 0; "
                                  "every rank must see the same input.")
        layout = _Layout(out, len(plan))
        job = _Job(model, tokenizer, corpus, layout, methods, layers, batch_size, max_length, backend, verify,
                   save_maps, ff_gemm)
        done = plan[-1][1] - sum(plan[i][1] - plan[i][0] for i in todo)
        bar = _Progress(layout, todo, plan[-1][1], done, here.size, progress) if here.main else None
        poll = bar.poll if bar is not None else (lambda: None)
        try:
            for written, index in enumerate(todo[here.rank::here.size], 1):
                _compute_shard(job, index, plan[index], poll)
                if written == fault_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            here.wait_for_all(poll)
        finally:
            if bar is not None:
                bar.close()
        if not here.main:
            return None
        return _merge(layout, plan, save_maps)
    finally:
        if lock is not None:
            os.close(lock)


# ---------------------------------------------------------------------------------------------- the merge
def _worst(values: list) -> Optional[float]:
    """The largest of the measured values (None: not measured)."""
    measured = [v for v in values if v is not None]
    return max(measured) if measured else None


def _number(value: float) -> Optional[float]:
    """JSON has no NaN: an undefined statistic (e.g. a Spearman over constant ranks) is null."""
    return None if value is None or math.isnan(value) else value


def _merge(layout: _Layout, plan: list, save_maps: bool) -> dict:
    """Rank 0, after every shard is complete: summary.json and summary.png from the records and tables on disk,
    in shard order (so the same shards give the same summary, whoever computed them)."""
    manifest = _read_json(layout.out / MANIFEST)
    records = []
    for index, span in enumerate(plan):
        record = _complete_record(layout, index, span, save_maps)
        if record is None:
            raise CorpusError(f"shard {index} ({layout.record(index)}) is missing or corrupt after the run; run again "
                              "with --resume.")
        records.append(record)
    methods, layers = manifest["settings"]["methods"], manifest["settings"]["layers"]
    tokens = sum(r["tokens"] for r in records)

    def mean(key: str, method: str) -> list:
        total = np.zeros(len(layers), dtype=np.float64)
        for r in records:
            total += np.array(r[key][method], dtype=np.float64)
        return [float(x) for x in total / tokens]

    counts: Counter = Counter()
    for r in records:
        counts.update({int(t): c for t, c in r["token_counts"].items()})
    summary = {
        "model": manifest["model"]["name"], "input": manifest["input"], "texts": plan[-1][1], "tokens": tokens,
        "ordinary_tokens": sum(r["ordinary_tokens"] for r in records), "shards": len(plan),
        "methods": methods, "layers": layers,
        "mean_ratio": {m: mean("ratio_sum", m) for m in methods},
        "mean_bias_norm": {m: mean("bias_norm_sum", m) for m in methods if m in records[0]["bias_norm_sum"]},
        "frequency_2021": _frequency(layout, len(plan), methods, layers, counts),
        "worst": {name: _worst([r["worst"][name] for r in records]) for name in records[0]["worst"]},
    }
    text = json.dumps(summary, indent=1, ensure_ascii=False, allow_nan=False)
    atomic_write(layout.out / SUMMARY, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    from ..plots import PNG_DPI

    figure = _summary_figure(summary)
    atomic_write(layout.out / SUMMARY_PLOT, lambda tmp: figure.savefig(tmp, format="png", dpi=PNG_DPI))
    return summary


def _frequency(layout: _Layout, shards: int, methods: list, layers: list, counts: Counter) -> dict:
    """The 2021 frequency correlation of every method (FREQUENCY_DEFINITION), from the per-token tables: a
    Spearman needs the ranks of the whole corpus, so it is computed here and not from partial sums."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ..methods import spearman
    from ..reproduce import ranks_by_frequency

    ratios = {m: [[] for _ in layers] for m in methods}  # ordinary tokens, in table order
    token_ids = []
    for index in range(shards):
        table = pq.read_table(layout.tokens(index), columns=["layer", "method", "mixing_ratio", "token_id", "special"])
        table = table.filter(pc.invert(table.column("special")))
        for m in methods:
            of_method = table.filter(pc.equal(table.column("method"), m))
            for li, layer in enumerate(layers):
                rows = of_method.filter(pc.equal(of_method.column("layer"), layer))
                ratios[m][li].append(rows.column("mixing_ratio").to_numpy())
                if m == methods[0] and li == 0:  # every (method, layer) lists the same tokens in the same order
                    token_ids.append(rows.column("token_id").to_numpy())
    ranks = ranks_by_frequency(counts)
    ids = np.concatenate(token_ids)
    token_ranks = torch.tensor([ranks[int(t)] for t in ids], dtype=torch.float64)
    per_layer, pooled = {}, {}
    for m in methods:
        values = torch.from_numpy(np.stack([np.concatenate(parts) for parts in ratios[m]]).astype(np.float64))
        per_layer[m] = [_number(spearman(row, token_ranks)) for row in values]
        pooled[m] = _number(spearman(values.flatten(), token_ranks.repeat(len(layers))))
    return {"definition": FREQUENCY_DEFINITION, "tokens": int(ids.size), "types": len(ranks),
            "spearman_ratio_vs_rank_per_layer": per_layer, "spearman_ratio_vs_rank_pooled": pooled}


def _summary_figure(summary: dict):
    """Mean mixing ratio and frequency rho by layer (layers counted from 1, as in every kobattr plot)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    ratio_ax, rho_ax = figure.subplots(1, 2)
    numbers = [layer + 1 for layer in summary["layers"]]
    rho = summary["frequency_2021"]["spearman_ratio_vs_rank_per_layer"]
    for m in summary["methods"]:
        ratio_ax.plot(numbers, [100 * v for v in summary["mean_ratio"][m]], marker="o", markersize=4, label=m)
        rho_ax.plot(numbers, [np.nan if v is None else v for v in rho[m]], marker="o", markersize=4, label=m)
    ratio_ax.set_ylim(0, 100)
    ratio_ax.set_ylabel("mean context-mixing ratio (%)")
    rho_ax.axhline(0, color="grey", linewidth=0.8)
    rho_ax.set_ylabel("Spearman rho: ratio vs frequency rank")
    for ax in (ratio_ax, rho_ax):
        ax.set_xlabel("layer")
        ax.set_xticks(numbers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    figure.suptitle(f"{summary['texts']} texts, {summary['tokens']} tokens")
    return figure
