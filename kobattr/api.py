"""analyze(): attributions of an unmodified Hugging Face model, computed layer by layer.

Padding: texts of a batch are padded to one length on the tokenizer's padding side (with its pad
token, or its EOS token when it has none, as for GPT-2 and Llama); padded tokens get no attribution
and no share. With left padding, decoder positions are counted from each text's first real token
(as generate() does), so a padded text is attributed exactly like the same text alone.

Encoder-decoder models (BART, Marian, M2M-100 / NLLB, mBART; spec section 7): with ``targets=`` (or a batch
holding decoder_input_ids or labels) analyze() runs the model with teacher forcing on the targets and returns
a :class:`~kobattr.result.Seq2SeqAttribution` of the decoder layers, the encoder's Attribution inside it.
Each pair is tokenised as ``tokenizer(source, text_target=target)`` (Marian, M2M-100, NLLB and mBART
tokenizers put the source and target language codes where their models expect them: set src_lang / tgt_lang
on the tokenizer); the decoder inputs are the labels shifted right behind the model's decoder start token,
by the model family's own shift (``prepare_decoder_input_ids_from_labels`` or the modeling file's
``shift_tokens_right``). Sources and targets are padded on the right, with the model's pad id.
"""

from __future__ import annotations

import inspect
import sys
from typing import Optional, Sequence

import torch
from torch import Tensor

from .core import as_indices, attribute
from .layer import LayerInputError, head_vectors
from .methods import check_methods, default_methods
from .models import capture, get_adapter
from .peers import apply_rollouts, check_rollout
from .result import ALTI_PLUS, WHOLE_DECODER_LAYER, Attribution, Seq2SeqAttribution
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


def _wanted_layers(layers, n_layers: int, what: str = "layers") -> list[int]:
    """The sorted, distinct layer indices of a request (None: all); LayerInputError for one that does not exist."""
    if layers is None:
        return list(range(n_layers))
    indices = as_indices(layers, "layers")
    for i in indices:
        if not -n_layers <= i < n_layers:
            raise LayerInputError(f"layer {i} does not exist; the model has {n_layers} {what} "
                                  f"(0..{n_layers - 1}, or -{n_layers}..-1 from the end).")
    return sorted({i % n_layers for i in indices})


def _layer_output(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def analyze(model, inputs, tokenizer=None, methods=None, layers: Optional[Sequence[int]] = None, rows=None,
            heads: bool = False, contract: Optional[Tensor] = None, normalize_rows: bool = False,
            backend="auto", ig: str = "exact", ig_steps: int = 20, max_length: Optional[int] = None,
            progress: bool = False, verify: int = 2, targets=None, encoder_methods=None,
            ff_gemm: str = "auto") -> Attribution:
    """Attributions of ``model`` on ``inputs`` (a tokenizer batch, or text(s) plus ``tokenizer``).

    Each layer is attributed as soon as it has run, on its own device, and its captured tensors are
    dropped before the next layer, so peak memory is one layer's activations plus the results.
    methods: names of the registry (kobattr.methods) or "all"; layers: indices (default all; negative
    count from the end); rows: query rows; heads: per-head maps of attn_w / attn_n; contract: (K, N) or
    (B, K, N) to get contract @ map per layer instead of maps; normalize_rows: divide map rows by their
    sums; backend: "auto", a name or {primitive: name} (what ran: result.backends); verify: sampled rows
    per layer and text recomputed by the reference (result.spot_check; 0 disables).
    Completeness of the FF scopes is measured against the model's own layer outputs.
    Encoder-decoder models (BART, Marian, M2M-100 / NLLB, mBART): without targets, the encoder layers from the
    source text alone. With ``targets=`` (the reference translation(s), one per source text) or a batch holding
    decoder inputs ({"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"}, optionally
    "labels"; or "labels" alone, shifted here), the decoder layers with teacher forcing: a Seq2SeqAttribution
    (kobattr.result) with the decoder methods of spec section 7 (methods: None or "all" for every one, or names of
    kobattr.seq2seq.decoder_methods) and ``result.encoder``, the encoder's Attribution with ``encoder_methods``
    (None: the encoder's defaults; [] or False: no encoder analysis). Not with rows=, contract= or normalize_rows=.
    ff_gemm: "auto" (follow the model), "float32", "bfloat16", "float16" or "tf32", the FF methods' W_2 products
    (kobattr.core.attribute); encoders and decoder-only models.
    """
    if targets is not None or _has_decoder_inputs(model, inputs):
        if ff_gemm not in ("auto", "float32"):
            raise LayerInputError("ff_gemm= applies to encoders and decoder-only models; a translation pair's "
                                  "decoder layers compute their FF maps in float32.")
        return _analyze_pairs(model, inputs, targets, tokenizer, methods=methods, layers=layers, rows=rows,
                              heads=heads, contract=contract, normalize_rows=normalize_rows, backend=backend, ig=ig,
                              ig_steps=ig_steps, max_length=max_length, progress=progress, verify=verify,
                              encoder_methods=encoder_methods)
    if encoder_methods is not None:
        raise LayerInputError("encoder_methods= goes with targets= (the decoder's analysis); without targets, "
                              "methods= chooses the encoder's methods.")
    adapter = get_adapter(model)
    structure = adapter.structure(model.config)
    methods = check_methods(methods, structure)
    modules = adapter.layer_modules(model)
    n_layers = len(modules)
    wanted = _wanted_layers(layers, n_layers)
    check_rollout(methods, structure, wanted, rows, contract)
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
                                               targets=targets, verify=verify, verify_seed=index, ff_gemm=ff_gemm)))
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
    result = _collect(per_layer, methods, batch, mask, tokenizer, adapter, model)
    apply_rollouts(result)  # the peers' *_rollout methods through the analysed layers
    return result


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


# ----------------------------------------------------------------------------------------- encoder-decoder
def _has_decoder_inputs(model, inputs) -> bool:
    """Whether a batch asks for the decoder: decoder_input_ids, or labels for an encoder-decoder model (a
    classification batch's labels of an encoder are no target)."""
    if not hasattr(inputs, "keys"):
        return False
    return "decoder_input_ids" in inputs or ("labels" in inputs and
                                             bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)))


def _is_texts(value) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value)
                                      and all(isinstance(t, str) for t in value))


def _right_padded(mask: Tensor, what: str) -> None:
    """LayerInputError unless every row of ``mask`` is real tokens then padding, with at least one real token."""
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        row = int((mask[:, 1:] & ~mask[:, :-1]).any(1).nonzero()[0])
        raise LayerInputError(f"{what} of pair {row} is not padded on the right; encoder-decoder inputs take right "
                              "padding on both sides (BART's, Marian's and mBART's positions count from the first "
                              "column whatever the mask says).")
    if not mask[:, 0].all():
        row = int((~mask[:, 0]).nonzero()[0])
        raise LayerInputError(f"{what} of pair {row} has no tokens; every pair needs a source and a target token.")


def _model_pad_id(model, tokenizer) -> int:
    value = getattr(model.config, "pad_token_id", None)
    if value is None and tokenizer is not None:
        value = getattr(tokenizer, "pad_token_id", None)
    return 0 if value is None else int(value)


def shift_labels(model, labels: Tensor) -> Tensor:
    """The decoder inputs of teacher forcing: ``labels`` (B, T; padding with the model's pad id) shifted one position
    right behind the decoder start token, by the model family's own function: the model's
    ``prepare_decoder_input_ids_from_labels`` (generation models of BART, Marian, mBART), else ``shift_tokens_right``
    of its modeling file (M2M-100 / NLLB, the base models; mBART's wraps the last real token, its language code or
    EOS, around to the front)."""
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    try:
        if prepare is not None:
            return prepare(labels=labels)
        shift = getattr(sys.modules.get(type(model).__module__), "shift_tokens_right", None)
        if shift is None:
            raise LayerInputError(f"{type(model).__name__} has no way to shift labels into decoder inputs; pass "
                                  "decoder_input_ids and decoder_attention_mask yourself.")
        config = model.config
        args = [labels, config.pad_token_id]
        if len(inspect.signature(shift).parameters) >= 3:
            args.append(config.decoder_start_token_id)
        return shift(*args)
    except ValueError as err:  # e.g. "decoder_start_token_id has to be defined"
        raise LayerInputError(f"cannot shift the labels into decoder inputs: {err}") from None


def _pair_batch(model, inputs, targets, tokenizer, max_length: Optional[int]) -> dict:
    """input_ids, attention_mask, decoder_input_ids, decoder_attention_mask and (when known) labels, all (B, *)
    right-padded tensors, from source and target texts or from a ready batch."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise LayerInputError(f"max_length must be a positive int (tokens per text), got {max_length!r}.")
    pad = _model_pad_id(model, tokenizer)
    if targets is not None:
        if not _is_texts(inputs) or not _is_texts(targets):
            raise LayerInputError("targets= takes the reference translation(s) as text, with the source(s) as text: "
                                  "analyze(model, sources, targets=targets, tokenizer=tokenizer); ready tensors go in "
                                  "one batch with decoder_input_ids (or labels) and no targets=.")
        sources = [inputs] if isinstance(inputs, str) else list(inputs)
        targets = [targets] if isinstance(targets, str) else list(targets)
        if len(sources) != len(targets):
            raise LayerInputError(f"{len(sources)} source text(s) but {len(targets)} target text(s); give one target "
                                  "per source.")
        if tokenizer is None:
            raise LayerInputError("text inputs need a tokenizer: analyze(model, sources, targets=targets, "
                                  "tokenizer=tokenizer).")
        rows = {"input_ids": [], "labels": []}
        for k, (source, target) in enumerate(zip(sources, targets)):
            encoded = tokenizer(source, text_target=target, truncation=max_length is not None, max_length=max_length)
            if "labels" not in encoded:
                raise LayerInputError(f"the tokenizer ({type(tokenizer).__name__}) gave no labels for text_target=; "
                                      "pass a tokenized batch with decoder_input_ids instead.")
            for key, what, text in (("input_ids", "source", source), ("labels", "target", target)):
                ids = list(encoded[key])
                if not ids:
                    raise LayerInputError(f"{what} text {k} ({text[:40]!r}) has no tokens after tokenization; give "
                                          "non-empty text.")
                rows[key].append(ids)

        def padded(lists):
            width = max(len(ids) for ids in lists)
            ids = torch.tensor([row + [pad] * (width - len(row)) for row in lists], dtype=torch.long)
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in lists], dtype=torch.long)
            return ids, mask

        input_ids, attention_mask = padded(rows["input_ids"])
        labels, label_mask = padded(rows["labels"])
        return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                    decoder_input_ids=shift_labels(model, labels), decoder_attention_mask=label_mask)

    batch = dict(inputs)
    for key in ("input_ids",) + tuple(k for k in ("decoder_input_ids", "labels") if k in batch):
        t = batch[key]
        if not isinstance(t, Tensor) or t.dim() != 2 or t.is_floating_point() or 0 in t.shape:
            raise LayerInputError(f"{key} must be a non-empty (batch, tokens) integer tensor; tokenize with "
                                  "return_tensors='pt'.")
    if "input_ids" not in batch:
        raise LayerInputError("the batch needs the source: input_ids (and attention_mask for padded sources).")
    labels = batch.get("labels")
    if labels is not None:
        real = labels != -100  # the usual ignore index of training batches; padding with the pad id counts too
        real &= labels != pad
        labels = torch.where(real, labels, torch.full_like(labels, pad))
        batch["labels"] = labels
        if "decoder_input_ids" not in batch:
            batch["decoder_input_ids"] = shift_labels(model, labels)
            batch.setdefault("decoder_attention_mask", real.long())
    decoder_ids = batch["decoder_input_ids"]
    if labels is not None and labels.shape != decoder_ids.shape:
        raise LayerInputError(f"labels {tuple(labels.shape)} and decoder_input_ids {tuple(decoder_ids.shape)} must "
                              "have one shape (row i predicts labels[i]).")
    if batch.get("attention_mask") is None:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if batch.get("decoder_attention_mask") is None:
        batch["decoder_attention_mask"] = torch.ones_like(decoder_ids)
    for key, ids in (("attention_mask", batch["input_ids"]), ("decoder_attention_mask", decoder_ids)):
        if not isinstance(batch[key], Tensor) or batch[key].shape != ids.shape:
            raise LayerInputError(f"{key} must be a tensor shaped like its ids {tuple(ids.shape)}.")
    if batch["input_ids"].shape[0] != decoder_ids.shape[0]:
        raise LayerInputError(f"{batch['input_ids'].shape[0]} source(s) but {decoder_ids.shape[0]} target(s) in the batch.")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels")
            if batch.get(k) is not None}


def _decoder_methods(methods, placement: str) -> tuple[tuple[str, ...], tuple[str, ...], bool, bool]:
    """(self-attention methods, cross methods, whether the whole decoder layer is asked for, whether ALTI+ is) of a
    decoder request; ALTI+ brings the per-layer alti and cross_alti it rolls out."""
    from .seq2seq import CROSS_ALTI, check_decoder_methods

    names = (methods,) if isinstance(methods, str) else methods
    every = isinstance(names, (list, tuple)) and all(isinstance(m, str) for m in names)
    asked = {m.strip().lower() for m in names} if every else set()
    whole, plus = WHOLE_DECODER_LAYER in asked, ALTI_PLUS in asked
    if whole or plus:
        names = [m for m in names if m.strip().lower() not in (WHOLE_DECODER_LAYER, ALTI_PLUS)]
        if plus:
            names = list(dict.fromkeys(names + ["alti", CROSS_ALTI]))
        if not names:  # the whole layer alone
            return (), (), whole, plus
        methods = names
    return (*check_decoder_methods(methods, placement), whole, plus)


def _self_value_norms(layer) -> Tensor:
    """(B, H, T) ||f^h(x_k)|| of a decoder layer's self-attention (0 on padding), when no self method ran."""
    dtype = torch.float64 if layer.x.dtype == torch.float64 else torch.float32
    norms = head_vectors(layer, slice(None), dtype).norm(dim=-1).transpose(1, 2)  # (B, H, T)
    return (norms * layer.valid[:, None]).to(layer.x.dtype)


def _special_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids word alignment leaves out: the tokenizer's all_special_ids (BOS, EOS, padding, language codes) minus
    its unknown id (an unknown piece stands for a word); without a tokenizer the model config's special ids."""
    if tokenizer is not None and hasattr(tokenizer, "all_special_ids"):
        ids = set(int(i) for i in tokenizer.all_special_ids)
        unk = getattr(tokenizer, "unk_token_id", None)
        ids.discard(unk)
    else:
        config = model.config
        ids = {getattr(config, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                         "decoder_start_token_id", "forced_bos_token_id")}
        ids = {int(i) for i in ids if isinstance(i, int)}
    return tuple(sorted(ids))


def _analyze_pairs(model, inputs, targets, tokenizer, methods, layers, rows, heads, contract, normalize_rows, backend,
                   ig, ig_steps, max_length, progress, verify, encoder_methods) -> Seq2SeqAttribution:
    """analyze() of an encoder-decoder model with teacher forcing (see analyze)."""
    from .core import _relative_error
    from .models import capture_decoder, get_decoder_adapter
    from .decoder_layer import attribute_decoder_layer
    from .seq2seq import DecoderAttribution, attribute_decoder

    decoder = get_decoder_adapter(model)
    if rows is not None or contract is not None or normalize_rows:
        raise LayerInputError("rows=, contract= and normalize_rows= are not available for the decoder of an "
                              "encoder-decoder model: analyze returns its full maps (row-normalise them yourself with "
                              "kobattr.methods.row_normalize).")
    self_methods, cross_methods, whole, plus = _decoder_methods(methods, decoder.placement)
    wanted = _wanted_layers(layers, len(decoder.layer_modules(model)), "decoder layers")
    if plus and list(wanted) != list(range(wanted[0], wanted[0] + len(wanted))):
        raise LayerInputError(f"alti_plus rolls out through consecutive decoder layers (from the first analysed one), "
                              f"got {list(wanted)}.")
    batch = _pair_batch(model, inputs, targets, tokenizer, max_length)
    source_mask, target_mask = batch["attention_mask"].bool(), batch["decoder_attention_mask"].bool()
    _right_padded(source_mask, "the source")
    _right_padded(target_mask, "the target")
    limit = get_adapter(model).max_tokens(model.config)
    for what, ids in (("source", batch["input_ids"]), ("target", batch["decoder_input_ids"])):
        if limit is not None and ids.shape[1] > limit:
            raise LayerInputError(f"the {what} has {ids.shape[1]} tokens but {decoder.family} models take at most "
                                  f"{limit} positions; truncate with max_length={limit} (CLI: --max-length {limit}).")

    skip_encoder = encoder_methods is False or (isinstance(encoder_methods, (list, tuple)) and not encoder_methods)
    if plus:  # the source columns roll out through the encoder's ALTI rollout, over every encoder layer
        if skip_encoder:
            raise LayerInputError("alti_plus rolls the source columns out through the encoder's alti_rollout; do not "
                                  "turn the encoder analysis off (encoder_methods=).")
        encoder_structure = get_adapter(model).structure(model.config)
        given = default_methods(encoder_structure) if encoder_methods is None else (
            (encoder_methods,) if isinstance(encoder_methods, str) else tuple(encoder_methods))
        encoder_methods = list(dict.fromkeys(list(given) + ["alti_rollout"]))
    encoder = None if skip_encoder else analyze(
        model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, tokenizer=tokenizer,
        methods=encoder_methods, heads=heads, backend=backend, ig=ig, ig_steps=ig_steps, progress=progress,
        verify=verify)

    per_layer: list = []
    whole_maps: dict = {}  # decoder layer index -> DecoderLayerAttribution
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(wanted), desc="decoder layers", leave=False)

    def on_layer(index, layer):
        try:
            res = (attribute_decoder(layer, methods=self_methods + cross_methods, heads=heads, backend=backend,
                                     verify=verify, verify_seed=index) if self_methods + cross_methods
                   else DecoderAttribution((), None, None))
            if whole:  # the whole decoder layer: out_i over target-prefix and source columns
                whole_maps[index] = attribute_decoder_layer(layer, ig=ig, ig_steps=ig_steps)
        except (LayerInputError, VerificationError) as err:  # say which layer
            raise type(err)(f"decoder layer {index}: {err}") from None
        valid = layer.self_attn.valid
        # the captured layer as a whole (kobattr's forward from the captured tensors) vs the model's layer output
        errors = [_relative_error(layer.forward()["out"], layer.states["out"].to(layer.x.dtype), valid)]
        errors += [part.model_error for part in (res.self_attn, res.cross) if part is not None]
        value_norms = res.self_attn.value_norms if res.self_attn is not None else _self_value_norms(layer.self_attn)
        per_layer.append((index, res, value_norms, torch.stack([e.float() for e in errors]).amax(0).amax(-1)))
        if bar is not None:
            bar.update()

    try:
        capture_decoder(model, {k: v for k, v in batch.items() if k != "labels"}, on_layer, layers=wanted)
    finally:
        if bar is not None:
            bar.close()

    def stack(get):
        return torch.stack([get(r).cpu() for _, r, _, _ in per_layer])

    first = per_layer[0][1]
    spot_keys = {**(first.self_attn.spot_check if first.self_attn else {}),
                 **(first.cross.spot_check if first.cross else {})}
    backends = []
    for _, r, _, _ in per_layer:
        used = dict(r.self_attn.backends) if r.self_attn is not None else {}
        if r.cross is not None:
            used["cross_maps"] = "torch"
        backends.append(used)
    labels = batch.get("labels")

    def spot(r, m):
        part = r.cross if m in (r.cross.spot_check if r.cross else {}) else r.self_attn
        return part.spot_check[m].double()

    maps = {m: stack(lambda r: r.maps[m]) for m in first.methods}
    ratios = {m: stack(lambda r: r.ratios[m]) for m in first.ratios}
    bias_norms = {m: stack(lambda r: r._merged("bias_norms")[m]) for m in first._merged("bias_norms")}
    completeness = {m: stack(lambda r: r._merged("completeness")[m].amax(-1)) for m in first._merged("completeness")}
    if whole:
        def whole_stack(get):
            return torch.stack([get(whole_maps[i]).cpu() for i, *_ in per_layer])

        maps[WHOLE_DECODER_LAYER] = whole_stack(lambda w: w.map)
        ratios[WHOLE_DECODER_LAYER] = whole_stack(lambda w: w.ratio)
        bias_norms[WHOLE_DECODER_LAYER] = whole_stack(lambda w: w.bias_norm)
        completeness[WHOLE_DECODER_LAYER] = whole_stack(lambda w: w.completeness["out"].amax(-1))
    if plus:
        from .peers import alti_plus_rollout, peer_ratio

        maps[ALTI_PLUS] = alti_plus_rollout(encoder.maps["alti_rollout"][-1], maps["alti"], maps["cross_alti"])
        T = maps[ALTI_PLUS].shape[-2]
        nan_pad = torch.where(target_mask.cpu(), 0.0, float("nan")).to(maps[ALTI_PLUS].dtype)
        ratios[ALTI_PLUS] = torch.stack([peer_ratio(layer, torch.arange(T)) for layer in maps[ALTI_PLUS]]) + nan_pad
    return Seq2SeqAttribution(
        methods=tuple(first.methods) + ((WHOLE_DECODER_LAYER,) if whole else ()) + ((ALTI_PLUS,) if plus else ()),
        layers=tuple(i for i, *_ in per_layer),
        maps=maps, ratios=ratios,
        value_norms=torch.stack([v.cpu() for _, _, v, _ in per_layer]),
        bias_norms=bias_norms, completeness=completeness,
        model_error=torch.stack([e.cpu() for *_, e in per_layer]),
        tokens=_tokens(batch["decoder_input_ids"], tokenizer), attention_mask=target_mask.cpu(),
        structure=decoder.placement, head_maps={m: stack(lambda r: r.head_maps[m]) for m in first.head_maps},
        model_name=getattr(model.config, "_name_or_path", "") or model.config.model_type,
        backends=backends, spot_check={m: stack(lambda r: spot(r, m)) for m in spot_keys},
        source_tokens=_tokens(batch["input_ids"], tokenizer), source_mask=source_mask.cpu(),
        source_ids=batch["input_ids"].cpu(), decoder_input_ids=batch["decoder_input_ids"].cpu(),
        labels=None if labels is None else labels.cpu(),
        label_tokens=None if labels is None else _tokens(labels, tokenizer),
        special_ids=_special_ids(model, tokenizer),
        cross_value_norms=stack(lambda r: r.cross.value_norms) if first.cross is not None else None,
        encoder=encoder,
    )
