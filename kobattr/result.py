"""The result of kobattr.analyze(): maps per layer and method, mixing ratios, aggregation, save/load.

Shape vocabulary: L analysed layers, B batch, R requested query rows (N for full maps), N tokens,
H heads, K weight rows (contractions).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .methods import has_residual, row_normalize

FORMAT_VERSION = 3  # 2: one .safetensors file, metadata in its header; 3: "placement" became "structure"


@dataclass
class Attribution:
    """Attributions of one batch through the analysed layers.

    maps[m]          (L, B, R, N) per-layer map rows (R = N unless rows were selected), or
                     (L, B, K, N) = weights @ map when ``contracted``
    head_maps[m]     (L, B, H, R, N) for attn_w / attn_n when heads=True
    ratios[m]        (L, B, N) context-mixing ratio of every token (NaN on padding)
    value_norms      (L, B, H, N) ||f^h(x_j)||
    bias_norms[m]    (L, B, N) norm of the part of each row that goes to no token
    completeness[m]  (L, B) worst relative error over tokens of (parts + bias) vs the model's real
                     hidden state: small means the decomposition reproduces the model
    model_error      (L, B) worst relative error of kobattr's own forward of the captured layer vs the
                     model's real layer output (checks that the captured Layer is the model's)
    context_change   component -> (L, B) 1 - Spearman (with an FF method and full maps)
    backends         per analysed layer, {primitive: implementation that computed it}
    spot_check[m]    (L, B) largest relative error of the sampled rows vs the reference (verify > 0)
    ff_amp           per layer, per batch element: top (query, key, amplification) pairs
    tokens           per batch element, the token strings (padding included)
    attention_mask   (B, N) bool
    """

    methods: tuple
    layers: tuple
    maps: dict
    ratios: dict
    value_norms: Tensor
    bias_norms: dict
    completeness: dict
    tokens: list
    attention_mask: Tensor
    structure: str = "post"  # the block structure (kobattr.methods.STRUCTURES)
    model_error: Optional[Tensor] = None
    rows: Optional[Tensor] = None
    contracted: bool = False
    head_maps: dict = field(default_factory=dict)
    context_change: dict = field(default_factory=dict)
    ff_amp: list = field(default_factory=list)
    model_name: str = ""
    backends: list = field(default_factory=list)
    spot_check: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        B, n = self.attention_mask.shape
        mode = "contracted" if self.contracted else ("rows " + str(self.rows.tolist()) if self.rows is not None else "full maps")
        used = sorted({f"{p}={name}" for per_layer in self.backends for p, name in per_layer.items()})
        checked = max((float(e.max()) for e in self.spot_check.values()), default=None)
        return (f"Attribution({self.model_name or 'model'}, {self.structure}, layers {list(self.layers)}, "
                f"{B} text(s) x {n} tokens, {mode}, methods {', '.join(self.methods)}; backends {', '.join(used) or '?'}; "
                f"spot check {'off' if checked is None else f'max error {checked:.1e}'})")

    # -------------------------------------------------------------- summaries
    def mean_ratio(self, method: str) -> Tensor:
        """(L,) mean context-mixing ratio over every non-pad token of the batch."""
        r = self.ratios[method]
        return r.nanmean(dim=(1, 2))

    def ratio_table(self) -> str:
        """A per-layer text table of mean mixing ratios (%) for each method."""
        head = "layer " + " ".join(f"{m:>12}" for m in self.methods)
        lines = [head]
        for li, layer in enumerate(self.layers):
            cells = " ".join(f"{100 * self.mean_ratio(m)[li].item():11.1f}%" for m in self.methods)
            lines.append(f"{layer + 1:>5} {cells}")  # counted from 1, as in the plots
        return "\n".join(lines)

    def _full(self, method: str) -> Tensor:
        if self.contracted or self.rows is not None:
            raise ValueError("this needs full maps; run analyze() without rows= or weights=.")
        if method not in self.maps:
            raise ValueError(f"method {method!r} was not computed; computed: {', '.join(self.maps)}.")
        return self.maps[method]

    def rollout(self, method: str) -> Tensor:
        """(B, N, N) attention rollout through the analysed layers, first to last.

        Each layer's map is row-normalised; for methods without a residual path (the registry's
        has_residual: attn_w, attn_n, atbff, atblnff) the residual is added first as 0.5 * map_normalised + 0.5 * I, the others
        already contain it (on the diagonal or inside the vectors) and are used as they are.
        Padding rows stay 0. Row i of the result: how much each input token flows into token i.
        """
        maps = self._full(method).double()
        L, B, N, _ = maps.shape
        valid = self.attention_mask.to(maps.device)
        eye = torch.eye(N, dtype=maps.dtype, device=maps.device) * valid[:, :, None]
        out = eye.clone()
        for layer in maps:
            step = row_normalize(layer)
            if not has_residual(method, self.structure):
                step = 0.5 * step + 0.5 * eye
            out = step @ out
        return out

    # ------------------------------------------------------------ word merging
    def word_maps(self, method: str, batch: int = 0, scheme: str = "auto") -> tuple[Tensor, list[str]]:
        """((L, W, W) word-level maps, words) of one batch element: sum over source pieces, mean over
        target pieces. Padding is dropped."""
        maps = self._full(method)[:, batch]
        valid = self.attention_mask[batch]
        tokens = [t for t, v in zip(self.tokens[batch], valid.tolist()) if v]
        maps = maps[:, valid][:, :, valid]
        groups = word_groups(tokens, scheme)
        return merge_pieces(maps, groups), [join_pieces([tokens[i] for i in g], scheme) for g in groups]

    # ---------------------------------------------------------------- save/load
    def save(self, path) -> Path:
        """Write everything to one ``path.safetensors`` file (the suffix is appended unless ``path`` ends
        with it, so "run.v1" and "run.v2" stay two files); returns the path written.

        Tensors (tensor fields and dicts of tensors) are the file's tensors, every other field is JSON in
        its header (``metadata["kobattr"]``), so ``load`` gives back an equal Attribution. The file is
        written to a temporary name in the same directory, synced and renamed onto ``path``: a crash
        leaves the previous file or none, never a partial one.
        """
        path = attribution_path(path)
        _check_consistency(self, path, saving=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, header = _encode(self)
        _write_atomically(path, tensors, {_META_KEY: json.dumps(header, ensure_ascii=False, allow_nan=True)})
        return path

    @classmethod
    def load(cls, path) -> "Attribution":
        """The Attribution that ``save`` wrote to ``path`` (with or without the .safetensors suffix).

        Raises AttributionFileError when the file is truncated, corrupt, of another format version or
        inconsistent (metadata that does not match the tensors), FileNotFoundError when it is missing.
        """
        path = attribution_path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (Attribution.save writes <name>{SUFFIX}).")
        header, tensors = _read(path)
        result = _decode(cls, header, tensors, path)
        _check_consistency(result, path)
        return result


SPECIAL = ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "<s>", "</s>", "<pad>", "<unk>", "<mask>", "<|endoftext|>")


def detect_scheme(tokens: list[str]) -> str:
    """'wordpiece' (## continues a word), 'bpe' (Ġ starts one) or 'sentencepiece' (▁ starts one)."""
    if any(t.startswith("##") for t in tokens):
        return "wordpiece"
    if any(t.startswith("\u0120") for t in tokens):
        return "bpe"
    if any(t.startswith("\u2581") for t in tokens):
        return "sentencepiece"
    return "wordpiece"


def word_groups(tokens: list[str], scheme: str = "auto") -> list[list[int]]:
    """Token indices grouped into words; special tokens are words of their own."""
    scheme = detect_scheme(tokens) if scheme == "auto" else scheme
    if scheme not in ("wordpiece", "bpe", "sentencepiece"):
        raise ValueError(f"unknown subword scheme {scheme!r}; use wordpiece, bpe, sentencepiece or auto.")
    marker = {"bpe": "\u0120", "sentencepiece": "\u2581"}.get(scheme)
    groups: list[list[int]] = []
    for i, t in enumerate(tokens):
        continues = t.startswith("##") if scheme == "wordpiece" else not t.startswith(marker)
        # the first piece of a text (byte-level BPE gives it no marker) and specials start a word
        if not continues or not groups or _is_special(t) or _is_special(tokens[groups[-1][-1]]):
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def _is_special(t: str) -> bool:
    return t in SPECIAL or (t.startswith("<") and t.endswith(">") and len(t) > 2)


def join_pieces(pieces: list[str], scheme: str = "auto") -> str:
    text = "".join(p[2:] if p.startswith("##") else p for p in pieces)
    return text.replace("\u0120", "").replace("\u2581", "") or text


def merge_pieces(maps: Tensor, groups: list[list[int]]) -> Tensor:
    """(..., N, N) -> (..., W, W): mean over the target (row) pieces, sum over the source (column) pieces."""
    N = maps.shape[-1]
    assign = torch.zeros(len(groups), N, dtype=maps.dtype, device=maps.device)
    for w, g in enumerate(groups):
        assign[w, g] = 1.0
    rows_mean = assign / assign.sum(1, keepdim=True)
    return rows_mean @ maps @ assign.T


# ------------------------------------------------------------------------------------------- persistence
# One .safetensors file per Attribution. Every dataclass field is stored by what it holds, so a new field
# round-trips without being listed here: a Tensor is the tensor "<field>", a non-empty dict of tensors is
# the tensors "<field>/<key>" (key order kept in the header), anything else is JSON in the header
# (tuples tagged so that they come back as tuples). The header also holds a SHA-256 of every tensor.
# _SHAPES says which dimensions load() checks against the metadata: L = len(layers), B and N from
# attention_mask, * = not checked here; a dict field's tensors are each checked. Unnamed fields load unchecked.
SUFFIX = ".safetensors"
_META_KEY = "kobattr"
_TUPLE = "__tuple__"
_SHAPES = {
    "attention_mask": "BN",
    "maps": "LB*N", "head_maps": "LB**N", "value_norms": "LB*N",
    "ratios": "LBN", "bias_norms": "LBN",
    "completeness": "LB", "model_error": "LB", "context_change": "LB", "spot_check": "LB",
}


class AttributionFileError(ValueError):
    """A file that Attribution.load refuses: truncated, corrupt, of another format or inconsistent."""


def attribution_path(path) -> Path:
    """``path`` with ".safetensors" appended unless it already ends so (dots in the name are kept)."""
    path = Path(path)
    return path if path.name.endswith(SUFFIX) else path.with_name(path.name + SUFFIX)


def _to_json(value, where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_to_json(v, where) for v in value]}
    if isinstance(value, list):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) and k != _TUPLE for k in value):
        return {k: _to_json(v, where) for k, v in value.items()}
    raise TypeError(f"Attribution.{where} holds {type(value).__name__} {value!r:.60}, which save() cannot store: "
                    "fields must be tensors, dicts of tensors or JSON values "
                    "(str-keyed dicts, lists, tuples, numbers).")


def _from_json(value):
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(_from_json(v) for v in value[_TUPLE])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _digest(t: Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}\n".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _encode(result) -> tuple[dict, dict]:
    """(tensors by name, header) of an Attribution, as described above."""
    import dataclasses

    tensors, fields = {}, {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, Tensor):
            tensors[f.name] = value
            fields[f.name] = {"kind": "tensor"}
        elif isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values()):
            bad = [k for k in value if not isinstance(k, str) or not k]
            if bad:
                raise TypeError(f"Attribution.{f.name} has key {bad[0]!r}; save() needs non-empty str keys.")
            tensors.update({f"{f.name}/{k}": v for k, v in value.items()})
            fields[f.name] = {"kind": "tensors", "keys": list(value)}
        else:
            fields[f.name] = {"kind": "json", "value": _to_json(value, f.name)}
    seen, ready = set(), {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.numel():  # safetensors refuses tensors that share memory: give each its own
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        ready[name] = t
    header = {"format": FORMAT_VERSION, "fields": fields, "sha256": {k: _digest(t) for k, t in ready.items()}}
    return ready, header


def _write_atomically(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def atomic_write(path: Path, write) -> None:
    """``write(temporary path)`` beside ``path``, fsync, rename onto ``path``: a crash leaves the previous
    file or none, never a partial one. The file gets the mode open() would give it (0o666 minus umask)."""
    import os
    import secrets

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777  # 0o666 minus the umask, as open() gives
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file with mode 0o600
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _read(path: Path) -> tuple[dict, dict]:
    """(header, tensors by name) of a file written by save(); AttributionFileError when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types on truncated or garbled files
        raise AttributionFileError(f"{path} cannot be read as a safetensors file; it is truncated or corrupt "
                                   f"({type(err).__name__}: {err}).") from err
    if _META_KEY not in metadata:
        legacy = path.with_name(path.name[: -len(SUFFIX)] + ".json")
        if legacy.is_file():
            raise AttributionFileError(f"{path} is in attribution format 1 (metadata in {legacy.name}); this "
                                       f"kobattr reads formats 2 and {FORMAT_VERSION} only, so re-run the analysis.")
        raise AttributionFileError(f"{path} has no kobattr metadata in its header; it was not written by "
                                   "Attribution.save.")
    try:
        header = json.loads(metadata[_META_KEY])
        version = header["format"]
    except (ValueError, TypeError, KeyError) as err:
        raise AttributionFileError(f"{path} has unreadable kobattr metadata ({err}).") from err
    if version == 2:  # the same layout; only the block structure's field was renamed
        fields = header.get("fields")
        if isinstance(fields, dict) and "placement" in fields:
            fields["structure"] = fields.pop("placement")
    elif version != FORMAT_VERSION:
        raise AttributionFileError(f"{path} is in attribution format {version}; this kobattr reads formats "
                                   f"2 and {FORMAT_VERSION} only.")
    return header, tensors


def _decode(cls, header: dict, tensors: dict, path: Path):
    import dataclasses

    def refuse(what: str):
        raise AttributionFileError(f"{path} is inconsistent: {what}.")

    fields, digests = header.get("fields"), header.get("sha256")
    if not isinstance(fields, dict) or not isinstance(digests, dict):
        refuse("its metadata lacks the field and checksum tables")
    known = {f.name: f for f in dataclasses.fields(cls)}
    listed = {}
    for name, spec in fields.items():
        if name not in known:
            refuse(f"it has a field {name!r} that this kobattr's Attribution does not have")
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind == "tensor":
            listed[name] = (name, None)
        elif kind == "tensors":
            listed.update({f"{name}/{k}": (name, k) for k in spec.get("keys", [])})
        elif kind != "json":
            refuse(f"field {name!r} has an unknown storage kind {kind!r}")
    if set(listed) != set(tensors):
        missing, extra = sorted(set(listed) - set(tensors)), sorted(set(tensors) - set(listed))
        refuse(f"the metadata lists tensors the file lacks ({', '.join(missing)})" if missing else
               f"the file holds tensors its metadata does not list ({', '.join(extra)})")
    for name, t in tensors.items():
        if digests.get(name) != _digest(t):
            raise AttributionFileError(f"{path} is corrupt: tensor {name!r} does not match its SHA-256 checksum.")
    values = {}
    for name, spec in fields.items():
        if spec["kind"] == "json":
            values[name] = _from_json(spec.get("value"))
        elif spec["kind"] == "tensors":
            values[name] = {}
    for tensor_name, (name, key) in listed.items():
        if key is None:
            values[name] = tensors[tensor_name]
    for name, spec in fields.items():  # dict entries in their saved order
        if spec["kind"] == "tensors":
            values[name] = {k: tensors[f"{name}/{k}"] for k in spec.get("keys", [])}
    required = [n for n, f in known.items() if n not in values and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    if required:
        refuse(f"it lacks the field(s) {', '.join(required)}")
    return cls(**values)


def _check_consistency(result, path: Path, saving: bool = False) -> None:
    """Refuse (AttributionFileError) a result whose metadata does not match its tensors; save() checks too,
    so that it never writes what load() would refuse."""

    def refuse(what: str):
        if saving:
            raise AttributionFileError(f"cannot save to {path}: the Attribution is inconsistent: {what}.")
        raise AttributionFileError(f"{path} is inconsistent: {what}.")

    mask = result.attention_mask
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        refuse("attention_mask is not a (batch, tokens) bool tensor")
    B, N = mask.shape
    layers, methods = result.layers, result.methods
    if not isinstance(layers, tuple) or not layers or not all(isinstance(i, int) for i in layers):
        refuse("layers is not a non-empty tuple of layer indices")
    if not isinstance(methods, tuple) or not methods:
        refuse("methods is not a non-empty tuple of method names")
    L = len(layers)
    sizes = {"L": (L, "the number of layers"), "B": (B, "the batch size"), "N": (N, "the number of tokens")}
    for name, spec in _SHAPES.items():
        value = getattr(result, name, None)
        for key, t in (value.items() if isinstance(value, dict) else [(None, value)]):
            if t is None:
                continue
            label = name if key is None else f"{name}[{key!r}]"
            if not isinstance(t, Tensor) or t.dim() != len(spec):
                refuse(f"{label} is not a {len(spec)}-dimensional tensor")
            for dim, (letter, size) in enumerate(zip(spec, t.shape)):
                if letter in sizes and size != sizes[letter][0]:
                    refuse(f"{label} has {size} in dimension {dim} but {sizes[letter][1]} is {sizes[letter][0]}")
    for m in methods:
        for group in ("maps", "ratios"):
            if m not in getattr(result, group):
                refuse(f"method {m!r} is listed but has no {group}")
    if not isinstance(result.tokens, list) or len(result.tokens) != B or any(len(t) != N for t in result.tokens):
        refuse(f"tokens is not {B} list(s) of {N} tokens like attention_mask")
    if not isinstance(result.contracted, bool):
        refuse("contracted is not true or false")
    rows = result.rows
    if rows is not None:
        if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.numel() == 0 or rows.is_floating_point():
            refuse("rows is not a non-empty 1-D tensor of query indices")
        if rows.min() < 0 or rows.max() >= N:
            refuse(f"rows holds indices outside [0, {N})")
    if not result.contracted:  # full maps or the selected rows
        R = N if rows is None else len(rows)
        for group, dim in (("maps", 2), ("head_maps", 3)):
            for m, t in getattr(result, group).items():
                if t.shape[dim] != R:
                    refuse(f"{group}[{m!r}] has {t.shape[dim]} query rows but "
                           + (f"rows selects {R}" if rows is not None else f"full maps have {N}"))
    for name in ("ff_amp", "backends"):
        value = getattr(result, name, None)
        if isinstance(value, list) and len(value) not in (0, L):
            refuse(f"{name} has {len(value)} entries for {L} layer(s)")
