"""analyze(): attributions of an unmodified Hugging Face model, computed layer by layer.

Padding: texts of a batch are padded to one length on the tokenizer's padding side (with its pad
token, or its EOS token when it has none, as for GPT-2 and Llama); padded tokens get no attribution
and no share. With left padding, decoder positions are counted from each text's first real token
(as generate() does), so a padded text is attributed exactly like the same text alone.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .core import as_indices, attribute
from .layer import LayerInputError
from .methods import check_methods
from .models import capture, get_adapter
from .result import Attribution
from .verify import VerificationError


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0  # masked out anyway


def _tokenize(inputs, tokenizer, max_length: Optional[int]) -> dict:
    """A batch of tensors (input_ids, attention_mask, ...) from text(s) or a ready tokenizer batch."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise LayerInputError(f"max_length must be a positive int (tokens per text), got {max_length!r}.")
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs)):
        if tokenizer is None:
            raise LayerInputError("text inputs need a tokenizer: analyze(model, text, tokenizer=tokenizer).")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        # tokenized one by one and padded here, so tokenizers without a pad token (GPT-2, Llama) need no change
        encoded = [tokenizer(t, truncation=max_length is not None, max_length=max_length) for t in texts]
        for i, e in enumerate(encoded):
            if not e["input_ids"]:
                raise LayerInputError(f"text {i} ({texts[i][:40]!r}) has no tokens after tokenization; give non-empty text.")
        width = max(len(e["input_ids"]) for e in encoded)
        left = getattr(tokenizer, "padding_side", "right") == "left"
        batch = {}
        for key in encoded[0].keys():
            fill = _pad_id(tokenizer) if key == "input_ids" else 0
            rows = []
            for e in encoded:
                values = list(e[key])
                pad = [fill] * (width - len(values))
                rows.append(pad + values if left else values + pad)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if "attention_mask" not in batch:
            lengths = [len(e["input_ids"]) for e in encoded]
            batch["attention_mask"] = torch.tensor([[0] * (width - n) + [1] * n if left else [1] * n + [0] * (width - n)
                                                    for n in lengths])
        return batch
    if hasattr(inputs, "keys") and "input_ids" in inputs:
        ids = inputs["input_ids"]
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise LayerInputError("input_ids must be a (batch, tokens) tensor; tokenize with return_tensors='pt'.")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise LayerInputError(f"the batch has no tokens (input_ids of shape {tuple(ids.shape)}); give at least one token.")
        return dict(inputs)
    if isinstance(inputs, (list, tuple)) and not inputs:
        raise LayerInputError("inputs is an empty list; give at least one text.")
    raise LayerInputError("inputs must be a text, a list of texts (with tokenizer=) or a tokenizer batch with input_ids.")


def _layer_output(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def analyze(model, inputs, tokenizer=None, methods=None, layers: Optional[Sequence[int]] = None, rows=None,
            heads: bool = False, contract: Optional[Tensor] = None, normalize_rows: bool = False,
            backend="auto", ig: str = "exact", ig_steps: int = 20, max_length: Optional[int] = None,
            progress: bool = False, verify: int = 2) -> Attribution:
    """Attributions of ``model`` on ``inputs`` (a tokenizer batch, or text(s) plus ``tokenizer``).

    Each layer is attributed as soon as it has run, on its own device, and its captured tensors are
    dropped before the next layer, so peak memory is one layer's activations plus the results.
    methods: names of the registry (kobattr.methods) or "all"; layers: indices (default all; negative
    count from the end); rows: query rows; heads: per-head maps of attn_w / attn_n; contract: (K, N) or
    (B, K, N) to get contract @ map per layer instead of maps; normalize_rows: divide map rows by their
    sums; backend: "auto", a name or {primitive: name} (what ran: result.backends); verify: sampled rows
    per layer and text recomputed by the reference (result.spot_check; 0 disables).
    Completeness of the FF scopes is measured against the model's own layer outputs.
    Encoder-decoder models (BART, Marian, M2M-100 / NLLB, mBART): the encoder layers, from the source text alone;
    their decoder layers and cross-attention: kobattr.models.capture_decoder and kobattr.seq2seq.attribute_decoder.
    """
    adapter = get_adapter(model)
    structure = adapter.structure(model.config)
    methods = check_methods(methods, structure)
    modules = adapter.layer_modules(model)
    n_layers = len(modules)
    if layers is None:
        wanted = list(range(n_layers))
    else:
        indices = as_indices(layers, "layers")
        for i in indices:
            if not -n_layers <= i < n_layers:
                raise LayerInputError(f"layer {i} does not exist; the model has {n_layers} layers "
                                      f"(0..{n_layers - 1}, or -{n_layers}..-1 from the end).")
        wanted = sorted({i % n_layers for i in indices})
    batch = _tokenize(inputs, tokenizer, max_length)
    input_ids = batch["input_ids"]
    limit = adapter.max_tokens(model.config)
    if limit is not None and input_ids.shape[1] > limit:
        raise LayerInputError(f"the input has {input_ids.shape[1]} tokens but {adapter.family} models take at most "
                              f"{limit} positions; truncate with max_length={limit} (CLI: --max-length {limit}).")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    per_layer: list = []
    outputs: dict[int, Tensor] = {}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(wanted), desc="layers", leave=False)

    def on_layer(index, layer):
        targets = {"out": _layer_output(outputs.pop(index)).to(layer.x.device)} if index in outputs else None
        try:
            per_layer.append((index, attribute(layer, methods=methods, rows=rows, heads=heads, contract=contract,
                                               normalize_rows=normalize_rows, backend=backend, ig=ig, ig_steps=ig_steps,
                                               targets=targets, verify=verify, verify_seed=index)))
        except (LayerInputError, VerificationError) as err:  # say which layer
            raise type(err)(f"layer {index}: {err}") from None
        if bar is not None:
            bar.update()

    # registered before capture's own hooks, so it runs first and the output is there for on_layer
    handles = [modules[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)) for i in wanted]
    try:
        capture(model, batch, on_layer, layers=wanted)
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    return _collect(per_layer, methods, batch, mask, tokenizer, adapter, model)


def _collect(per_layer, methods, batch, mask, tokenizer, adapter, model) -> Attribution:
    first = per_layer[0][1]

    def stack(get):
        return torch.stack([get(r).cpu() for _, r in per_layer])

    return Attribution(
        methods=methods, layers=tuple(i for i, _ in per_layer),
        maps={m: stack(lambda r: r.maps[m]) for m in methods},
        ratios={m: stack(lambda r: r.ratios[m]) for m in methods},
        value_norms=stack(lambda r: r.value_norms),
        bias_norms={m: stack(lambda r: r.bias_norms[m]) for m in first.bias_norms},
        completeness={m: stack(lambda r: r.completeness[m].amax(-1)) for m in first.completeness},
        model_error=stack(lambda r: r.model_error.amax(-1)),
        tokens=_tokens(batch["input_ids"], tokenizer), attention_mask=mask.cpu(), structure=adapter.structure(model.config),
        rows=None if first.rows is None else first.rows.cpu(), contracted=first.contracted,
        head_maps={m: stack(lambda r: r.head_maps[m]) for m in first.head_maps},
        context_change={c: stack(lambda r: r.context_change[c]) for c in first.context_change},
        ff_amp=[r.ff_amp for _, r in per_layer],
        model_name=getattr(model.config, "_name_or_path", "") or model.config.model_type,
        backends=[dict(r.backends) for _, r in per_layer],
        spot_check={m: stack(lambda r: r.spot_check[m]) for m in first.spot_check},
    )


def _tokens(input_ids: Tensor, tokenizer) -> list[list[str]]:
    if tokenizer is None:
        return [[str(t) for t in row.tolist()] for row in input_ids]
    return [tokenizer.convert_ids_to_tokens(row.tolist()) for row in input_ids]
