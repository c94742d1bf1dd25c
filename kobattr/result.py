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

from .alignment import AlignmentInputError, align_sentence
from .io import atomic_write  # noqa: F401 (re-exported: other modules imported it from here before kobattr.io)
from .io import tensor_sha256, write_safetensors
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

    # ------------------------------------------------------------------ views (kobattr.views)
    def _repr_html_(self) -> str:
        """Jupyter's rich display: the mixing ratios as a table and a small plot (kobattr.views.summary_html)."""
        from .views import summary_html

        return summary_html(self)

    def show(self, view: str = "tokens", **options):
        """Display a view in the notebook: "tokens", "head" or "model"; options (part, method, layer, heads, batch,
        top_k, title) as kobattr.views.render. Outside a notebook it writes a page and returns its path."""
        from .views import show

        return show(self, view, **options)

    def save_html(self, path, view: str = "tokens", **options) -> Path:
        """Write a view as a standalone, offline HTML page at ``path`` (options as kobattr.views.render)."""
        from .views import save_html

        return save_html(self, path, view, **options)

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
        write_safetensors(path, tensors, {_META_KEY: json.dumps(header, ensure_ascii=False, allow_nan=True)})
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
        result = _decode(_file_class(cls, header, path), header, tensors, path)
        _check_consistency(result, path)
        if not header["fields_intact"]:  # last, so that an inconsistent edit is named more precisely above
            raise AttributionFileError(f"{path} is corrupt: its metadata does not match its SHA-256 checksum.")
        return result

    # ------------------------------------------------- what save/load check (overridden by subclasses)
    # the tag save() writes into the header for this class (None: a plain Attribution, no tag); load() of a base
    # class returns the tagged subclass, so kobattr.Attribution.load opens every kobattr result file
    _FILE_CLASS = None  # (no annotation: a class attribute, not a dataclass field)

    def _shape_table(self) -> dict:
        """{field: shape spec, or {key: shape spec} for a dict field}, letters as in _SHAPES."""
        return _SHAPES

    def _dimension_sizes(self) -> dict:
        """Sizes of the shape letters beyond L, B and N: {letter: (size, what it is)}."""
        return {}

    def _ratio_methods(self) -> tuple:
        """The methods that must have ratios."""
        return self.methods

    def _extra_checks(self, refuse, path: Path, saving: bool) -> None:
        """More consistency checks of a subclass; ``refuse(what)`` raises."""


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
# (tuples tagged so that they come back as tuples). The header also holds a SHA-256 of every tensor and one of the
# field table (fields_sha256), so that any change to the file fails a checksum; nothing is ever unpickled.
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


def _encode_fields(result, prefix: str = "") -> tuple[dict, dict]:
    """(tensors by name, field table) of an Attribution's fields; a field holding an Attribution (a seq2seq result's
    encoder) is stored the same way, its tensors named "<field>/<its tensor name>"."""
    import dataclasses

    tensors, fields = {}, {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, Tensor):
            tensors[prefix + f.name] = value
            fields[f.name] = {"kind": "tensor"}
        elif isinstance(value, Attribution):
            if type(value) is not Attribution:
                raise TypeError(f"Attribution.{f.name} holds a {type(value).__name__}; save() stores only a plain "
                                "Attribution inside another.")
            inner_tensors, inner_fields = _encode_fields(value, f"{prefix}{f.name}/")
            tensors.update(inner_tensors)
            fields[f.name] = {"kind": "attribution", "fields": inner_fields}
        elif isinstance(value, dict) and value and all(isinstance(v, Tensor) for v in value.values()):
            bad = [k for k in value if not isinstance(k, str) or not k]
            if bad:
                raise TypeError(f"Attribution.{f.name} has key {bad[0]!r}; save() needs non-empty str keys.")
            tensors.update({f"{prefix}{f.name}/{k}": v for k, v in value.items()})
            fields[f.name] = {"kind": "tensors", "keys": list(value)}
        else:
            fields[f.name] = {"kind": "json", "value": _to_json(value, f.name)}
    return tensors, fields


def _encode(result) -> tuple[dict, dict]:
    """(tensors by name, header) of an Attribution, as described above."""
    tensors, fields = _encode_fields(result)
    seen, ready = set(), {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.numel():  # safetensors refuses tensors that share memory: give each its own
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        ready[name] = t
    header = {"format": FORMAT_VERSION, "fields": fields, "fields_sha256": _fields_sha256(fields),
              "sha256": {k: tensor_sha256(t) for k, t in ready.items()}}
    if type(result)._FILE_CLASS is not None:
        header["class"] = type(result)._FILE_CLASS
    return ready, header


def _fields_sha256(fields: dict) -> str:
    """SHA-256 of the field table (every non-tensor value: tokens, layers, methods...) as canonical JSON."""
    text = json.dumps(fields, sort_keys=True, ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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
    # files written before the field table had a checksum have none: they load as before
    stored = header.pop("fields_sha256", None)
    header["fields_intact"] = stored is None or stored == _fields_sha256(header.get("fields"))
    if version == 2:  # the same layout; only the block structure's field was renamed
        fields = header.get("fields")
        if isinstance(fields, dict) and "placement" in fields:
            fields["structure"] = fields.pop("placement")
    elif version != FORMAT_VERSION:
        raise AttributionFileError(f"{path} is in attribution format {version}; this kobattr reads formats "
                                   f"2 and {FORMAT_VERSION} only.")
    return header, tensors


def _file_class(cls, header: dict, path: Path):
    """The class a file's header says it holds (its "class" tag), if ``cls`` may load it; AttributionFileError
    otherwise. A file without the tag holds a plain Attribution (every file before the tag existed)."""
    tag = header.get("class")
    classes = {c._FILE_CLASS: c for c in _tagged_classes()}
    if tag is None:
        if cls._FILE_CLASS is not None:
            raise AttributionFileError(f"{path} holds a plain Attribution, not a {cls.__name__}; load it with "
                                       "kobattr.Attribution.load.")
        return cls
    if tag not in classes:
        raise AttributionFileError(f"{path} holds a kobattr result of class {tag!r}, which this kobattr does not know.")
    target = classes[tag]
    if issubclass(cls, target):  # the tagged class itself, or a subclass of it the caller asked for
        return cls
    if not issubclass(target, cls):
        raise AttributionFileError(f"{path} holds a {target.__name__}, not a {cls.__name__}; load it with "
                                   f"{target.__name__}.load or kobattr.Attribution.load.")
    return target


def _tagged_classes() -> list:
    """Every subclass of Attribution that save() tags in the header."""
    found, todo = [], [Attribution]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub._FILE_CLASS is not None and sub._FILE_CLASS == sub.__dict__.get("_FILE_CLASS"):
                found.append(sub)
    return found


def _listing(cls, fields, path: Path, prefix: str = "") -> dict:
    """{tensor name: (field path, key)} of every tensor a field table lists (nested Attributions included), after
    checking the table against ``cls``'s fields."""
    import dataclasses

    def refuse(what: str):
        raise AttributionFileError(f"{path} is inconsistent: {what}.")

    if not isinstance(fields, dict):
        refuse("its metadata lacks the field table" + (f" of {prefix[:-1]}" if prefix else ""))
    known = {f.name for f in dataclasses.fields(cls)}
    listed = {}
    for name, spec in fields.items():
        if name not in known:
            refuse(f"it has a field {prefix}{name!r} that this kobattr's {cls.__name__} does not have")
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind == "tensor":
            listed[prefix + name] = (prefix + name, None)
        elif kind == "tensors":
            listed.update({f"{prefix}{name}/{k}": (prefix + name, k) for k in spec.get("keys", [])})
        elif kind == "attribution" and not prefix:  # one level: a seq2seq result's encoder
            listed.update(_listing(Attribution, spec.get("fields"), path, f"{name}/"))
        elif kind != "json":
            refuse(f"field {prefix}{name!r} has an unknown storage kind {kind!r}")
    return listed


def _build(cls, fields: dict, tensors: dict, path: Path, prefix: str = ""):
    """An instance of ``cls`` from a checked field table and the file's tensors."""
    import dataclasses

    values = {}
    for name, spec in fields.items():  # dict entries in their saved order
        kind = spec["kind"]
        if kind == "json":
            values[name] = _from_json(spec.get("value"))
        elif kind == "tensor":
            values[name] = tensors[prefix + name]
        elif kind == "tensors":
            values[name] = {k: tensors[f"{prefix}{name}/{k}"] for k in spec.get("keys", [])}
        else:
            values[name] = _build(Attribution, spec["fields"], tensors, path, f"{name}/")
    known = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in known.items() if n not in values and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    if required:
        where = f" of its {prefix[:-1]} part" if prefix else ""
        raise AttributionFileError(f"{path} is inconsistent: it lacks the field(s) {', '.join(required)}{where}.")
    return cls(**values)


def _decode(cls, header: dict, tensors: dict, path: Path):
    fields, digests = header.get("fields"), header.get("sha256")
    if not isinstance(fields, dict) or not isinstance(digests, dict):
        raise AttributionFileError(f"{path} is inconsistent: its metadata lacks the field and checksum tables.")
    listed = _listing(cls, fields, path)
    if set(listed) != set(tensors):
        missing, extra = sorted(set(listed) - set(tensors)), sorted(set(tensors) - set(listed))
        raise AttributionFileError(
            f"{path} is inconsistent: " +
            (f"the metadata lists tensors the file lacks ({', '.join(missing)})." if missing else
             f"the file holds tensors its metadata does not list ({', '.join(extra)})."))
    for name, t in tensors.items():
        if digests.get(name) != tensor_sha256(t):
            raise AttributionFileError(f"{path} is corrupt: tensor {name!r} does not match its SHA-256 checksum.")
    return _build(cls, fields, tensors, path)


def _check_consistency(result, path: Path, saving: bool = False, part: str = "") -> None:
    """Refuse (AttributionFileError) a result whose metadata does not match its tensors; save() checks too,
    so that it never writes what load() would refuse. ``part``: the field holding ``result`` inside another
    result (its encoder), named in the messages."""

    def refuse(what: str):
        what = f"its {part} part: {what}" if part else what
        if saving:
            raise AttributionFileError(f"cannot save to {path}: the {type(result).__name__} is inconsistent: {what}.")
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
    sizes.update(result._dimension_sizes())
    for name, spec_of in result._shape_table().items():
        value = getattr(result, name, None)
        for key, t in (value.items() if isinstance(value, dict) else [(None, value)]):
            if t is None:
                continue
            label = name if key is None else f"{name}[{key!r}]"
            spec = spec_of.get(key) if isinstance(spec_of, dict) else spec_of
            if spec is None:
                refuse(f"{label} belongs to no known method")
            if not isinstance(t, Tensor) or t.dim() != len(spec):
                refuse(f"{label} is not a {len(spec)}-dimensional tensor")
            for dim, (letter, size) in enumerate(zip(spec, t.shape)):
                if letter in sizes and size != sizes[letter][0]:
                    refuse(f"{label} has {size} in dimension {dim} but {sizes[letter][1]} is {sizes[letter][0]}")
    for m in methods:
        if m not in result.maps:
            refuse(f"method {m!r} is listed but has no maps")
        if m in result._ratio_methods() and m not in result.ratios:
            refuse(f"method {m!r} is listed but has no ratios")
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
    result._extra_checks(refuse, path, saving)



# ------------------------------------------------------------------------------------------- encoder-decoder
# the shape letters of a decoder result beyond L, B and N (N = T, the target positions): S source tokens,
# P = S + 1 (source columns and the preserved column), W = T + S (the whole decoder layer: target columns first)
WHOLE_DECODER_LAYER = "decoder_layer"  # spec section 7, the whole decoder layer (kobattr/decoder_layer.py)
ALTI_PLUS = "alti_plus"  # spec section 10, ALTI+ rolled out through the decoder and the encoder (kobattr.peers)


def decoder_map_width(method: str) -> str:
    """The shape letter of the last dimension of a decoder method's map (T = N, S, S + 1 = P, T + S = W); "" for a
    name that is no decoder method."""
    from .seq2seq import CROSS_ALTI, CROSS_METHODS, DECODER_SELF_METHODS

    if method in CROSS_METHODS:
        return "P" if CROSS_METHODS[method].residual else "S"
    if method == CROSS_ALTI:
        return "P"
    if method in (WHOLE_DECODER_LAYER, ALTI_PLUS):
        return "W"
    return "N" if method == "alti" or any(method in names for names in DECODER_SELF_METHODS.values()) else ""


@dataclass
class Seq2SeqAttribution(Attribution):
    """The decoder side of an encoder-decoder model on source-target pairs with teacher forcing
    (``kobattr.analyze(model, sources, targets=..., tokenizer=...)``), with the encoder's Attribution inside.

    Shape vocabulary: L analysed decoder layers, B pairs, T target positions, S source tokens, H heads. Row i
    of every decoder map is target position i: it is fed ``decoder_input_ids[i]`` (the label before it; row 0 the
    decoder start token) and predicts ``labels[i]`` (spec section 7).

    The inherited fields describe the decoder:
    maps[m]          self-attention methods (attn_w, attnres_w, attn_n, attnres_n, attnresln_n):
                     (L, B, T, T); cross_attn_w and cross_attn_n: (L, B, T, S); cross_attnres_n and
                     cross_attnresln_n: (L, B, T, S + 1), the last column what the target position keeps (never an
                     alignment candidate); decoder_layer (the whole layer): (L, B, T, T + S), target columns first;
                     the peers' ALTI: alti (L, B, T, T), cross_alti (L, B, T, S + 1), last column the residual, and
                     alti_plus (L, B, T, T + S), ALTI+ rolled out to decoder layer l, target columns first
    head_maps[m]     heads=True: (L, B, H, T, T) for attn_w / attn_n, (L, B, H, T, S) for cross_attn_w / cross_attn_n
    ratios[m]        (L, B, T) for the self-attention methods, the cross-block mixing ratio
                     ||sum_j c_ij|| / (||sum_j c_ij|| + ||p_i||) for cross_attnres_n / cross_attnresln_n (with the
                     norm g for the latter) and decoder_layer's; none for cross_attn_w / cross_attn_n. NaN on padding.
    value_norms      (L, B, H, T) ||f^h(x_k)|| of the self-attention
    bias_norms[m]    (L, B, T); completeness[m] (L, B) for the residual cross maps (parts + preserved + bias vs the
                     model's y, g(y)); model_error (L, B): the captured layer (self block, cross block and the
                     whole layer's forward) vs the model's own states; spot_check[m] (L, B)
    tokens           per pair, the T decoder input tokens; attention_mask (B, T) bool: decoder_attention_mask
    structure        the decoder's placement: "post" (Marian, BART) or "pre" (M2M-100, NLLB, mBART)
    Fields of its own:
    source_tokens    per pair, the S source tokens (padding included)
    source_mask      (B, S) bool, the source attention_mask
    source_ids       (B, S) the source input_ids
    decoder_input_ids (B, T)
    labels           (B, T) the reference translation's ids (row i predicts labels[i]; right padding with the
                     pad id); None when analyze got ready decoder inputs without labels
    label_tokens     per pair, the T label tokens (None without labels)
    special_ids      the ids that word alignment leaves out: the tokenizer's all_special_ids minus its unknown id
                     (BOS, EOS, padding, language codes), sorted; () when no tokenizer was given
    cross_value_norms (L, B, H, S) ||f_c^h(e_j)|| of the cross-attention (None without cross maps)
    encoder          the encoder's Attribution (kobattr.analyze on the sources alone), None when not asked for
    """

    source_tokens: list = field(default_factory=list)
    source_mask: Optional[Tensor] = None
    source_ids: Optional[Tensor] = None
    decoder_input_ids: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    label_tokens: Optional[list] = None
    special_ids: tuple = ()
    cross_value_norms: Optional[Tensor] = None
    encoder: Optional[Attribution] = None

    _FILE_CLASS = "Seq2SeqAttribution"

    def __repr__(self) -> str:
        B, T = self.attention_mask.shape
        S = self.source_mask.shape[1] if self.source_mask is not None else 0
        checked = max((float(e.max()) for e in self.spot_check.values()), default=None)
        return (f"Seq2SeqAttribution({self.model_name or 'model'}, {self.structure}-LN decoder, layers "
                f"{list(self.layers)}, {B} pair(s) x {S} source x {T} target tokens, methods {', '.join(self.methods)}; "
                f"encoder {'not analysed' if self.encoder is None else 'layers ' + str(list(self.encoder.layers))}; "
                f"spot check {'off' if checked is None else f'max error {checked:.1e}'})")

    # -------------------------------------------------------------- summaries
    def mean_ratio(self, method: str) -> Tensor:
        if method not in self.ratios:
            raise ValueError(f"{method!r} has no mixing ratio; ratios exist for {', '.join(self.ratios) or 'no method'}.")
        return super().mean_ratio(method)

    def ratio_table(self) -> str:
        """Per decoder layer (counted from 1), the mean mixing ratio (%) of each method that has one."""
        methods = [m for m in self.methods if m in self.ratios]
        lines = ["layer " + " ".join(f"{m:>17}" for m in methods)]
        for li, layer in enumerate(self.layers):
            lines.append(f"{layer + 1:>5} " + " ".join(f"{100 * self.mean_ratio(m)[li].item():16.1f}%" for m in methods))
        return "\n".join(lines)

    def _full(self, method: str) -> Tensor:
        if method in self.maps and decoder_map_width(method) != "N":
            raise ValueError(f"{method!r} is not a target x target map; rollout and word_maps take the decoder's "
                             "self-attention methods. Cross maps: alignments() or kobattr.alignment.")
        return super()._full(method)

    # -------------------------------------------------------------- word alignment
    def _row(self, layer: int) -> int:
        """The position in self.layers of decoder layer ``layer`` (negative: from the end of self.layers)."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"layer must be an int, got {layer!r}.")
        if layer < 0:
            if -len(self.layers) <= layer:
                return len(self.layers) + layer
        elif layer in self.layers:
            return self.layers.index(layer)
        raise ValueError(f"decoder layer {layer} was not analysed; the result holds layers {list(self.layers)} "
                         "(or count from the end with negative numbers).")

    def cross_map(self, method: str, batch: int, layer: int = -1) -> Tensor:
        """(T_b, S_b) the piece-level cross map of one pair without padding and without the preserved column."""
        if decoder_map_width(method) not in ("S", "P") or method not in self.maps:
            cross = [m for m in self.maps if decoder_map_width(m) in ("S", "P")]
            raise ValueError(f"{method!r} is not a cross map of this result; it has {', '.join(cross) or 'none'}.")
        t = int(self.attention_mask[batch].sum())
        s = int(self.source_mask[batch].sum())
        return self.maps[method][self._row(layer), batch, :t, :s]

    def alignments(self, method: str, setting: str = "output", layer: int = -1, pairs=None,
                   scheme: Optional[str] = None) -> list:
        """Per pair, the word links {(source word, target word)} of the argmax alignment of ``method``'s map at decoder
        ``layer`` (a layer of self.layers, or negative from the end) in ``setting``: "output" (target word y_t at the
        row that predicts it) or "input" (at the row it is fed to). Words and special tokens as kobattr.alignment
        (spec section 7): special_ids left out on both sides, sum over source pieces, mean over target pieces; the
        preserved column never aligns. pairs: the pair indices (default all); scheme: the subword scheme
        (default: detected). Without labels (ready decoder inputs) the last row is taken to predict no word (right
        when the labels end with EOS). kobattr.alignment.AlignmentInputError names the pair it cannot group."""
        links = []
        for b in range(self.attention_mask.shape[0]) if pairs is None else pairs:
            piece = self.cross_map(method, b, layer)
            t, s = piece.shape
            if self.labels is not None:
                ids, tokens, ids_are = self.labels[b, :t], self.label_tokens[b][:t], "labels"
            else:
                ids, tokens, ids_are = self.decoder_input_ids[b, :t], self.tokens[b][:t], "decoder_input"
            try:
                links.append(align_sentence(piece, ids, tokens, self.source_ids[b, :s], self.source_tokens[b][:s],
                                            set(self.special_ids), setting, ids_are=ids_are,
                                            has_preserved_column=False, scheme=scheme))
            except AlignmentInputError as err:
                raise AlignmentInputError(f"pair {b}: {err}") from err
        return links

    # -------------------------------------------------------------- consistency (save/load)
    def _shape_table(self) -> dict:
        table = dict(_SHAPES)
        table.update({
            "maps": {m: "LBN" + decoder_map_width(m) if decoder_map_width(m) else None for m in self.maps},
            "head_maps": {m: "LB*N" + decoder_map_width(m) if decoder_map_width(m) in ("N", "S") else None
                          for m in self.head_maps},
            "source_mask": "BS", "source_ids": "BS", "decoder_input_ids": "BN", "labels": "BN",
            "cross_value_norms": "LB*S",
        })
        return table

    def _dimension_sizes(self) -> dict:
        mask = self.source_mask
        S = mask.shape[1] if isinstance(mask, Tensor) and mask.dim() == 2 else -1
        T = self.attention_mask.shape[1]
        return {"S": (S, "the number of source tokens"), "P": (S + 1, "the number of source tokens + 1"),
                "W": (T + S, "the number of target + source tokens")}

    def _ratio_methods(self) -> tuple:
        return tuple(m for m in self.methods if decoder_map_width(m) in ("N", "P", "W"))

    def _extra_checks(self, refuse, path: Path, saving: bool) -> None:
        mask = self.source_mask
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            refuse("source_mask is not a (batch, source tokens) bool tensor")
        B, S = mask.shape
        if B != self.attention_mask.shape[0]:
            refuse(f"source_mask has {B} pairs but attention_mask {self.attention_mask.shape[0]}")
        for name in ("source_ids", "decoder_input_ids"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.is_floating_point():
                refuse(f"{name} is not an integer tensor")
        if self.labels is not None and self.labels.is_floating_point():
            refuse("labels is not an integer tensor")
        if not isinstance(self.source_tokens, list) or len(self.source_tokens) != B or \
                any(not isinstance(t, list) or len(t) != S for t in self.source_tokens):
            refuse(f"source_tokens is not {B} list(s) of {S} tokens like source_mask")
        T = self.attention_mask.shape[1]
        if (self.labels is None) != (self.label_tokens is None):
            refuse("labels and label_tokens must both be given or both be None")
        if self.label_tokens is not None and (not isinstance(self.label_tokens, list) or len(self.label_tokens) != B
                                              or any(len(t) != T for t in self.label_tokens)):
            refuse(f"label_tokens is not {B} list(s) of {T} tokens like labels")
        if not isinstance(self.special_ids, tuple) or any(isinstance(i, bool) or not isinstance(i, int)
                                                          for i in self.special_ids):
            refuse("special_ids is not a tuple of token ids")
        if self.rows is not None or self.contracted:
            refuse("a decoder result holds full maps (no rows, no contraction)")
        if self.encoder is not None:
            if type(self.encoder) is not Attribution:
                refuse("encoder is not an Attribution")
            _check_consistency(self.encoder, path, saving, part="encoder")
            if tuple(self.encoder.attention_mask.shape) != (B, S):
                refuse(f"the encoder's attention_mask is {tuple(self.encoder.attention_mask.shape)}, not (pairs, "
                       f"source tokens) = ({B}, {S})")
