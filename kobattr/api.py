"""analyze(): attributions of an unmodified Hugging Face model, computed layer by layer."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .core import attribute
from .methods import check_methods
from .models import capture, get_adapter
from .result import Attribution


def _tokenize(inputs, tokenizer, max_length: Optional[int]):
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        if tokenizer is None:
            raise ValueError("text inputs need a tokenizer: analyze(model, text, tokenizer=tokenizer).")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        return tokenizer(texts, return_tensors="pt", padding=True, truncation=max_length is not None,
                         max_length=max_length)
    if hasattr(inputs, "keys") and "input_ids" in inputs:
        return inputs
    raise ValueError("inputs must be a text, a list of texts (with tokenizer=) or a tokenizer batch with input_ids.")


def _layer_output(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def analyze(model, inputs, tokenizer=None, methods=None, layers: Optional[Sequence[int]] = None, rows=None,
            heads: bool = False, weights: Optional[Tensor] = None, normalize_rows: bool = False,
            backend: str = "auto", ig: str = "exact", ig_steps: int = 20, max_length: Optional[int] = None,
            progress: bool = False) -> Attribution:
    """Attributions of ``model`` on ``inputs`` (a tokenizer batch, or text(s) plus ``tokenizer``).

    Each layer is attributed as soon as it has run, on its own device, and its captured tensors are
    dropped before the next layer, so peak memory is one layer's activations plus the results.
    methods: names (see kobattr.methods; "all"); layers: indices (default all); rows: query rows;
    heads: per-head maps of attn_w / attn_n; weights: (K, N) or (B, K, N) to get weights @ map per
    layer instead of maps. Completeness is measured against the model's own layer outputs.
    """
    adapter = get_adapter(model)
    methods = check_methods(methods, adapter.placement)
    batch = _tokenize(inputs, tokenizer, max_length)
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    per_layer: list = []
    outputs: dict[int, Tensor] = {}
    modules = adapter.layer_modules(model)
    n_layers = len(modules)
    for i in list(layers or []):
        if not -n_layers <= i < n_layers:
            raise ValueError(f"layer {i} does not exist; the model has {n_layers} layers (0..{n_layers - 1}).")
    wanted = sorted({(i + n_layers) % n_layers for i in layers}) if layers is not None else list(range(n_layers))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(wanted), desc="layers", leave=False)

    def on_layer(index, layer):
        targets = {"out": _layer_output(outputs.pop(index)).to(layer.x.device)} if index in outputs else None
        per_layer.append((index, attribute(layer, methods=methods, rows=rows, heads=heads, weights=weights,
                                           normalize_rows=normalize_rows, backend=backend, ig=ig,
                                           ig_steps=ig_steps, targets=targets)))
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
    return _collect(per_layer, methods, batch, mask, tokenizer, adapter, model, rows)


def _collect(per_layer, methods, batch, mask, tokenizer, adapter, model, rows) -> Attribution:
    first = per_layer[0][1]

    def stack(get):
        return torch.stack([get(r).cpu() for _, r in per_layer])

    tokens = _tokens(batch["input_ids"], tokenizer)
    result = Attribution(
        methods=methods, layers=tuple(i for i, _ in per_layer),
        maps={m: stack(lambda r: r.maps[m]) for m in methods},
        ratios={m: stack(lambda r: r.ratios[m]) for m in methods},
        value_norms=stack(lambda r: r.value_norms),
        bias_norms={m: stack(lambda r: r.bias_norms[m]) for m in first.bias_norms},
        completeness={m: stack(lambda r: r.completeness[m].amax(-1)) for m in first.completeness},
        model_error=stack(lambda r: r.model_error.amax(-1)),
        tokens=tokens, attention_mask=mask.cpu(), placement=adapter.placement,
        rows=None if first.rows is None else first.rows.cpu(), contracted=first.contracted,
        head_maps={m: stack(lambda r: r.head_maps[m]) for m in first.head_maps},
        context_change={c: stack(lambda r: r.context_change[c]) for c in first.context_change},
        ff_amp=[r.ff_amp for _, r in per_layer],
        model_name=getattr(model.config, "_name_or_path", "") or model.config.model_type, backend=first.backend,
    )
    return result


def _tokens(input_ids: Tensor, tokenizer) -> list[list[str]]:
    if tokenizer is None:
        return [[str(t) for t in row.tolist()] for row in input_ids]
    return [tokenizer.convert_ids_to_tokens(row.tolist()) for row in input_ids]
