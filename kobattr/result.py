"""The result of kobattr.analyze(): maps per layer and method, mixing ratios, aggregation, save/load.

Shape vocabulary: L analysed layers, B batch, R requested query rows (N for full maps), N tokens,
H heads, K weight rows (contractions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .methods import row_normalize

# Methods whose maps carry no residual path: rollout adds it as 0.5 * (map) + 0.5 * I (Abnar & Zuidema).
NO_RESIDUAL = ("attn_w", "attn_n", "atbff", "atblnff")
FORMAT_VERSION = 1


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
    placement: str = "post"
    model_error: Optional[Tensor] = None
    rows: Optional[Tensor] = None
    contracted: bool = False
    head_maps: dict = field(default_factory=dict)
    context_change: dict = field(default_factory=dict)
    ff_amp: list = field(default_factory=list)
    model_name: str = ""
    backend: str = ""

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

        Each layer's map is row-normalised; for methods without a residual path (attn_w, attn_n,
        atbff, atblnff) the residual is added first as 0.5 * map_normalised + 0.5 * I, the others
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
            if method in NO_RESIDUAL:
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
        """Write ``path``.safetensors (tensors) and ``path``.json (metadata); lossless."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"attention_mask": self.attention_mask.to(torch.uint8), "value_norms": self.value_norms}
        if self.model_error is not None:
            tensors["model_error"] = self.model_error
        for group in ("maps", "ratios", "bias_norms", "completeness", "head_maps", "context_change"):
            for m, t in getattr(self, group).items():
                tensors[f"{group}.{m}"] = t
        if self.rows is not None:
            tensors["rows"] = self.rows
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path.with_suffix(".safetensors")))
        meta = dict(format=FORMAT_VERSION, methods=list(self.methods), layers=list(self.layers), tokens=self.tokens,
                    placement=self.placement, contracted=self.contracted, ff_amp=self.ff_amp,
                    model_name=self.model_name, backend=self.backend)
        path.with_suffix(".json").write_text(json.dumps(meta, ensure_ascii=False, indent=1))
        return path.with_suffix(".safetensors")

    @classmethod
    def load(cls, path) -> "Attribution":
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} was written by an incompatible kobattr (format {meta.get('format')}).")
        tensors = load_file(str(path.with_suffix(".safetensors")))
        groups = {g: {} for g in ("maps", "ratios", "bias_norms", "completeness", "head_maps", "context_change")}
        for key, t in tensors.items():
            if "." in key:
                group, m = key.split(".", 1)
                groups[group][m] = t
        ff_amp = [[[tuple(p) for p in per_batch] for per_batch in per_layer] for per_layer in meta["ff_amp"]]
        return cls(methods=tuple(meta["methods"]), layers=tuple(meta["layers"]), tokens=meta["tokens"],
                   attention_mask=tensors["attention_mask"].bool(), value_norms=tensors["value_norms"],
                   placement=meta["placement"], model_error=tensors.get("model_error"), rows=tensors.get("rows"), contracted=meta["contracted"],
                   ff_amp=ff_amp, model_name=meta["model_name"], backend=meta["backend"], **groups)


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
