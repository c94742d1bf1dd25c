"""Gradient importance of attention (Clark et al. 2019, section 3.2, Fig. 3; spec clark2019.md section 1).

For every analysed layer l, head h and visible (query i, key j) pair of one example, G = |dL/d alpha_ij| with
alpha the post-softmax weights that multiply V and L the loss of that example alone:

- masked LMs: the mean cross-entropy over the example's masked positions, BERT's create_pretraining_data
  recipe (round(mask_prob * T) positions, T counting the specials, at least 1 and at most 20, drawn uniformly
  among the non-special tokens; of them replace_probs = (mask, random, keep) go to [MASK], to a uniformly
  random vocabulary id, or stay as they are), seeded per (seed, text index, draw) so that an example's
  masking does not depend on the batch it sits in;
- causal LMs: the mean next-token cross-entropy over the text;
- ``objective=callable(outputs) -> scalar``: any loss of one text's outputs (each text runs alone and
  unmasked); such results are tagged as not Clark's measure.

Beside G: alpha dL/d alpha (grad x input, the first-order effect of deleting the term) and its absolute value,
alpha itself, and ||f^h(x_j)|| (the norm of the head's transformed value, x_j from the same forward pass).

Per (layer, key category), categories from the unmasked text (heads.token_categories: [CLS]/BOS, [SEP]/EOS,
"." and ",", other): agg="mean" pools every visible (query, key in the category) pair of every example and
head (every query row counts, masked and special ones included); agg="mass" is the mean over visible query
rows of the sum over the row's keys in the category (rows without such a key count 0). ||f|| is averaged over
the key tokens of the category. Padded positions and keys a query cannot see (causal, windows) never count.

How alpha is reached with the model as loaded (SDPA, flash, ...): for the duration of one call the model's
configs name the attention function registered here (transformers' AttentionInterface), which runs the
model's own eager_attention_forward, keeps its alpha in the autograd graph and records it; the previous
attention implementation is restored in a ``finally``. dL/d alpha is the total derivative through every later
layer (torch.autograd.grad of the loss with respect to the recorded alphas).

Shape vocabulary: L analysed layers, B batch, H heads, N padded tokens, n tokens of one text, C categories.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..layer import LayerInputError, visible
from .heads import CATEGORIES, CATEGORY_LABELS, token_categories

MEASURE = "Clark et al. 2019 gradient importance"
CUSTOM_MEASURE = "custom-objective (not Clark 2019)"
MAX_PREDICTIONS = 20  # BERT's max_predictions_per_seq for 128-token examples
ATTN_IMPLEMENTATION = "kobattr_alpha"
QUANTITIES = ("grad_abs", "grad_x_input", "grad_x_input_abs", "alpha")
AGGS = ("mean", "mass")


class MissingMLMHeadError(LayerInputError):
    """The model has no pretrained masked-LM / causal-LM head, so the loss of Clark et al. 2019 is undefined."""


def _refusal(what: str) -> MissingMLMHeadError:
    return MissingMLMHeadError(
        f"{what}, so the masked-LM loss of Clark et al. 2019 cannot be computed; load a checkpoint that has its "
        "pretrained head (kobattr.analyses.gradient.load_with_head(path): AutoModelForMaskedLM or "
        "AutoModelForCausalLM), or pass objective=callable(outputs) -> scalar for a custom loss.")


# ----------------------------------------------------------------------------------------------- loading
def load_with_head(path, **model_kwargs):
    """(model in eval mode, tokenizer) from a local checkpoint with its LM head: AutoModelForMaskedLM, or
    AutoModelForCausalLM when the config is a decoder. Raises MissingMLMHeadError when no head class fits or
    any head weight is missing from the checkpoint (HF would initialise it randomly and only warn)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    config = AutoConfig.from_pretrained(path)
    model_type = config.model_type
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        auto = AutoModelForMaskedLM
    elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        auto = AutoModelForCausalLM
    else:
        raise _refusal(f"model_type {model_type!r} has no masked-LM or causal-LM head class in transformers")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # HF's load report would warn about the missing head: it is checked below
    try:
        model, info = auto.from_pretrained(path, output_loading_info=True, **model_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix = model.base_model_prefix + "."
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(prefix))
    if missing:
        raise _refusal(f"{path} has no pretrained head weights ({', '.join(missing[:3])}"
                       f"{', ...' if len(missing) > 3 else ''} would be random)")
    return model.eval(), AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------- masking
def special_ids(tokenizer) -> set:
    """The ids never chosen for masking: the tokenizer's special ids except [UNK] (a word like any other)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return ids


def mask_tokens(ids: Sequence[int], tokenizer, rng: np.random.Generator, mask_prob: float = 0.15,
                replace_probs: Sequence[float] = (0.8, 0.1, 0.1), vocab_size: Optional[int] = None) -> tuple:
    """BERT's masking of one text: (masked ids, positions, kinds), kinds[k] in {"mask", "random", "keep"} for
    positions[k]. Raises LayerInputError when the text has no non-special token."""
    candidates = [p for p, t in enumerate(ids) if int(t) not in special_ids(tokenizer)]
    if not candidates:
        raise LayerInputError("a text has no token to mask besides its special tokens; give non-empty texts.")
    count = min(MAX_PREDICTIONS, max(1, int(round(len(ids) * mask_prob))), len(candidates))
    positions = sorted(int(p) for p in rng.choice(candidates, size=count, replace=False))
    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    p_mask, p_random, _ = replace_probs
    masked, kinds = [int(t) for t in ids], []
    for p in positions:
        u = rng.random()
        if u < p_mask:
            masked[p], kind = int(tokenizer.mask_token_id), "mask"
        elif u < p_mask + p_random:
            masked[p], kind = int(rng.integers(0, vocab)), "random"
        else:
            kind = "keep"
        kinds.append(kind)
    return masked, positions, kinds


def _rng(seed: int, text: int, draw: int) -> np.random.Generator:
    return np.random.default_rng([seed, text, draw])


# ----------------------------------------------------------------------------------------------- recording
class _Recording:
    """The alphas (in the graph) and values (detached) of the watched attention modules, keyed by layer."""

    def __init__(self, targets: dict):
        self.targets = targets  # id(attention module) -> layer index
        self.alpha: dict = {}
        self.value: dict = {}


_ACTIVE: list = []  # the recording of the call in progress (a stack, so nested calls each keep their own)


def _generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """BERT's eager attention with grouped K/V repeated, for a modeling file without eager_attention_forward."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = (query @ key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask[..., :key.shape[-2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own eager attention; in a recording, the alpha it returns (the tensor multiplied into V)
    is kept for the watched modules."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None) or _generic_eager
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    rec = _ACTIVE[-1] if _ACTIVE else None
    if rec is not None and id(module) in rec.targets:
        layer = rec.targets[id(module)]
        rec.alpha[layer] = weights
        rec.value[layer] = value.detach()
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if ATTN_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, _recording_attention)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)  # additive float masks, as eager reads


def _configs(model) -> list:
    """Every config the model's modules read _attn_implementation from (the model's, its modules', their
    sub-configs), each once."""
    from transformers import PretrainedConfig

    found, stack = {}, [model.config] + [m.config for m in model.modules()
                                         if isinstance(getattr(m, "config", None), PretrainedConfig)]
    while stack:
        config = stack.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        stack += [c for c in (getattr(config, k, None) for k in getattr(config, "sub_configs", {}))
                  if isinstance(c, PretrainedConfig)]
    return list(found.values())


@contextlib.contextmanager
def recording(model, layers: Sequence[int]):
    """Within the block, the model runs the recording attention (eager math, alpha in the autograd graph, eval
    mode, gradients on) and the returned _Recording fills with the alphas of ``layers``; on exit the model's
    attention implementation, training flag and grad mode are as before."""
    from ..models import get_adapter

    _register()
    adapter = get_adapter(model)
    layer_modules = adapter.layer_modules(model)
    rec = _Recording({id(adapter.attention_module(layer_modules[i])): i for i in layers})
    configs = _configs(model)
    saved = [c._attn_implementation_internal for c in configs]
    training = model.training
    # alpha must be in the graph even where the weights are frozen: a zero that requires grad is added to the
    # input embeddings (x + 0 is x exactly)
    anchor = torch.zeros((), requires_grad=True)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out + anchor.to(out.dtype))
    try:
        for c in configs:  # the internal attribute: the public setter would recurse with its own rules
            c._attn_implementation_internal = ATTN_IMPLEMENTATION
        model.eval()
        _ACTIVE.append(rec)
        with torch.enable_grad():
            yield rec
    finally:
        if _ACTIVE and _ACTIVE[-1] is rec:
            _ACTIVE.pop()
        handle.remove()
        for c, value in zip(configs, saved):
            c._attn_implementation_internal = value
        model.train(training)


def _value_norms(adapter, layer_module, value: Tensor, n_heads: int) -> Tensor:
    """(B, H, N) ||f^h(x_j)|| = ||v^h_j W_O^h|| from the values the attention function received."""
    w_o, _ = adapter.out_projection(layer_module, n_heads)  # (H, Dh, D)
    v = value.float().repeat_interleave(n_heads // value.shape[1], 1)
    return torch.einsum("bhnd,hde->bhne", v, w_o.float().to(v.device)).norm(dim=-1)


def attention_gradients(model, inputs: dict, labels: Optional[Tensor] = None, objective: Optional[Callable] = None,
                        layers: Optional[Sequence[int]] = None) -> dict:
    """dL/d alpha of one batch, L the sum of the per-example losses (so each example's gradient is that of its
    own loss): labels (B, N) with -100 where no target (the mean cross-entropy over each example's targets;
    causal LMs: labels[t] is the target of logits[t]), or objective(outputs) -> scalar.

    Returns {"layers", "alpha" and "grad": (L, B, H, N, N) float32 (float64 for a float64 model), "value_norms": (L, B, H, N), "loss": (B,)
    or a 0-d tensor for an objective}."""
    from ..models import get_adapter

    adapter = get_adapter(model)
    layer_modules = adapter.layer_modules(model)
    analysed = list(range(len(layer_modules))) if layers is None else [i % len(layer_modules) for i in layers]
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with recording(model, analysed) as rec:
        outputs = model(**inputs)
        if objective is not None:
            loss = objective(outputs)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise LayerInputError(f"objective must return a scalar tensor, got {type(loss).__name__}.")
            total = loss.reshape(())
        else:
            logits = outputs.logits.float()
            labels = labels.to(device)
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            count = (labels != -100).sum(1)
            if (count == 0).any():
                raise LayerInputError("an example has no target token for the loss (a one-token text has no next token).")
            loss = ce.sum(1) / count
            total = loss.sum()
        unseen = [i for i in analysed if i not in rec.alpha]
        if unseen:
            raise LayerInputError(f"layer {unseen[0]} did not run its attention through transformers' AttentionInterface, "
                                  "so its attention weights cannot be differentiated.")
        alphas = [rec.alpha[i] for i in analysed]
        grads = torch.autograd.grad(total, alphas)  # raises if some alpha does not reach the loss
    H = alphas[0].shape[1]
    wide = lambda t: t if t.dtype == torch.float64 else t.float()  # noqa: E731  (float64 models keep float64)
    return {"layers": analysed, "alpha": torch.stack([wide(a.detach()) for a in alphas]),
            "grad": torch.stack([wide(g) for g in grads]),
            "value_norms": torch.stack([_value_norms(adapter, layer_modules[i], rec.value[i], H).detach()
                                        for i in analysed]),
            "loss": loss.detach()}


# ----------------------------------------------------------------------------------------------- examples
def _examples(model, tokenizer, texts, causal: bool, masked: bool, n_draws: int, seed: int, mask_prob: float,
              replace_probs, max_length: Optional[int]) -> list[dict]:
    """Every (text, draw) as model inputs and loss targets, unpadded."""
    vocab = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    trunc = {"truncation": max_length is not None, "max_length": max_length}
    out = []
    for t, text in enumerate(texts):
        enc = tokenizer(text, **trunc)
        ids = [int(i) for i in enc["input_ids"]]
        if not ids:
            raise LayerInputError(f"text {t} ({text[:40]!r}) has no tokens after tokenization; give non-empty text.")
        cats = token_categories(ids, tokenizer.convert_ids_to_tokens(ids), tokenizer)
        types = list(enc["token_type_ids"]) if "token_type_ids" in enc else None
        for d in range(n_draws if masked else 1):
            item = {"text": t, "draw": d, "ids": ids, "categories": cats, "token_type_ids": types, "labels": None}
            if masked:
                item["ids"], positions, kinds = mask_tokens(ids, tokenizer, _rng(seed, t, d), mask_prob,
                                                            replace_probs, vocab)
                item["labels"] = [ids[p] if p in positions else -100 for p in range(len(ids))]
                item["kinds"] = kinds
            elif causal:
                if len(ids) < 2:
                    raise LayerInputError(f"text {t} ({text[:40]!r}) has one token, so it has no next-token loss.")
                item["labels"] = ids[1:] + [-100]
            out.append(item)
    return out


def _batch(items: list[dict], pad_id: int) -> tuple[dict, Optional[Tensor]]:
    """Right padding whatever the tokenizer's side: with causal attention the real tokens then keep positions
    0..n-1 and never see a pad, exactly as the text alone."""
    width = max(len(it["ids"]) for it in items)
    pad = lambda v, fill: list(v) + [fill] * (width - len(v))  # noqa: E731
    batch = {"input_ids": torch.tensor([pad(it["ids"], pad_id) for it in items]),
             "attention_mask": torch.tensor([pad([1] * len(it["ids"]), 0) for it in items])}
    if all(it["token_type_ids"] is not None for it in items):
        batch["token_type_ids"] = torch.tensor([pad(it["token_type_ids"], 0) for it in items])
    labels = None
    if items[0]["labels"] is not None:
        labels = torch.tensor([pad(it["labels"], -100) for it in items])
    return batch, labels


# ----------------------------------------------------------------------------------------------- driver
class _Sums:
    """Running float64 sums per (layer, head, category) of every quantity, and their denominators."""

    def __init__(self, L: int, H: int, windows: list, radii: list, causal: bool):
        C = len(CATEGORIES)
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.sums = {q: z(L, H, C) for q in QUANTITIES}
        self.pairs, self.rows, self.fx, self.keys = z(L, C), z(L), z(L, H, C), z(C)
        self.windows, self.radii, self.causal = windows, radii, causal

    def state(self) -> dict:
        """The sums as a batch state of kobattr.analyses.parts."""
        return {"sums": self.sums, "pairs": self.pairs, "rows": self.rows, "fx": self.fx, "keys": self.keys}

    def load(self, state: dict) -> "_Sums":
        """These sums replaced by ``state`` (a sum of state()s); returns self."""
        for name in ("sums", "pairs", "rows", "fx", "keys"):
            setattr(self, name, state[name])
        return self

    def add(self, out: dict, b: int, n: int, categories: list) -> None:
        """Example b of a batch (right padded: its real tokens are 0..n-1); reduced where the maps are."""
        dev = out["alpha"].device
        pos = torch.arange(n, device=dev)
        vis = torch.stack([visible(pos, pos, torch.ones(1, n, dtype=torch.bool, device=dev), self.causal, w, r)[0]
                           for w, r in zip(self.windows, self.radii)]).double()  # (L, n, n)
        onehot = torch.nn.functional.one_hot(torch.tensor(categories, device=dev), len(CATEGORIES)).double()  # (n, C)
        a = out["alpha"][:, b, :, :n, :n].double()
        g = out["grad"][:, b, :, :n, :n].double()
        values = {"grad_abs": g.abs(), "grad_x_input": a * g, "grad_x_input_abs": (a * g).abs(), "alpha": a}
        for q, v in values.items():
            self.sums[q] += ((v * vis[:, None]) @ onehot).sum(2).cpu()
        self.pairs += (vis @ onehot).sum(1).cpu()
        self.rows += n
        self.fx += (out["value_norms"][:, b, :, :n].double() @ onehot).cpu()
        self.keys += onehot.sum(0).cpu()

    def means(self, agg: str) -> dict:
        """{quantity: (L, H, C)} and fx_norm; NaN where a category never occurs."""
        denom = self.pairs[:, None] if agg == "mean" else self.rows[:, None, None]
        out = {q: s / denom for q, s in self.sums.items()}
        if agg == "mass":  # a category no key belongs to has no mass to report
            out = {q: torch.where(self.pairs[:, None] > 0, v, float("nan")) for q, v in out.items()}
        out["fx_norm"] = self.fx / self.keys
        return out


def _list(t: Tensor) -> list:
    return [None if not math.isfinite(v) else v for v in t.tolist()] if t.dim() == 1 else [_list(r) for r in t]


def _check(texts, mask_prob, replace_probs, n_draws, agg, batch_size) -> None:
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise LayerInputError("texts must be a non-empty list of strings.")
    if not 0 < mask_prob <= 1:
        raise LayerInputError(f"mask_prob must be in (0, 1], got {mask_prob!r}.")
    if len(replace_probs) != 3 or min(replace_probs) < 0 or abs(sum(replace_probs) - 1) > 1e-9:
        raise LayerInputError(f"replace_probs must be three probabilities (mask, random, keep) summing to 1, got {replace_probs!r}.")
    for name, value in (("n_draws", n_draws), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayerInputError(f"{name} must be a positive int, got {value!r}.")
    if agg not in AGGS:
        raise LayerInputError(f"agg must be one of {', '.join(AGGS)}, got {agg!r}.")


def gradient_importance(model, tokenizer, texts: Sequence[str], layers: Optional[Sequence[int]] = None,
                        mask_prob: float = 0.15, replace_probs: Sequence[float] = (0.8, 0.1, 0.1), n_draws: int = 1,
                        seed: int = 0, objective: Optional[Callable] = None, agg: str = "mean", batch_size: int = 8,
                        max_length: Optional[int] = None, progress: bool = False,
                        parts: Optional[Path] = None) -> Optional[dict]:
    """Mean |dL/d alpha|, alpha dL/d alpha, |alpha dL/d alpha|, alpha and ||f^h(x_j)|| per analysed layer (and
    head) and key category over ``texts`` (JSON types; see the module docstring for L, the masking and the
    pooling). layers: model layer indices (default all); n_draws: maskings per text (masked LMs).

    Every batch's sums start from zero and are summed along kobattr.analyses.parts' fixed tree. parts: a
    directory all ranks can write; under torchrun the ranks then share the batches (contiguous blocks; the
    masking is drawn per text index, so it is the same), and rank 0 returns the result (identical to a
    single-process run's), the other ranks None."""
    from .parts import batch_sum

    from ..api import _pad_id
    from ..models import get_adapter
    from ..reproduce import _model_name

    _check(texts, mask_prob, replace_probs, n_draws, agg, batch_size)
    adapter = get_adapter(model)
    causal = adapter.is_causal(model.config)
    n_layers = len(adapter.layer_modules(model))
    analysed = list(range(n_layers)) if layers is None else [int(i) % n_layers for i in layers]
    if objective is None:
        if model.get_output_embeddings() is None:
            raise _refusal(f"{type(model).__name__} has no language-model head")
        if not causal and tokenizer.mask_token is None:
            raise _refusal("the tokenizer has no mask token")
    masked = objective is None and not causal
    items = _examples(model, tokenizer, texts, causal and objective is None, masked, n_draws, seed, mask_prob, replace_probs, max_length)
    # a custom objective sees one text's outputs, so each text runs alone
    size = 1 if objective is not None else batch_size
    chunks = [items[k:k + size] for k in range(0, len(items), size)]
    pad_id = _pad_id(tokenizer)
    windows = [adapter.window(model.config, i) for i in analysed]
    radii = [adapter.radius(model.config, i) for i in analysed]

    def leaf(k: int) -> dict:
        batch, labels = _batch(chunks[k], pad_id)
        out = attention_gradients(model, batch, labels=labels, objective=objective, layers=analysed)
        sums = _Sums(len(analysed), out["alpha"].shape[2], windows, radii, causal)
        for b, it in enumerate(chunks[k]):
            sums.add(out, b, len(it["ids"]), it["categories"])
        return {**sums.state(), "losses": out["loss"].reshape(-1).tolist()}

    summed = batch_sum(len(chunks), leaf, parts=parts, name="gradient", progress=progress, desc="gradient: batches")
    if summed is None:  # another rank than 0 of a shared run
        return None
    sums = _Sums(len(analysed), 1, windows, radii, causal).load(summed)
    losses = summed["losses"]
    means = sums.means(agg)
    result = {
        "measure": CUSTOM_MEASURE if objective is not None else MEASURE,
        "objective": "custom" if objective is not None else ("masked-LM loss" if masked else "next-token loss"),
        "model": {"name": _model_name(model), "family": adapter.family, "causal": causal},
        "layers": [i + 1 for i in analysed],
        "heads": int(sums.sums["alpha"].shape[1]),
        "texts": len(texts),
        "examples": len(items),
        "tokens": int(sum(len(it["ids"]) for it in items)),
        "agg": agg,
        "loss_mean": sum(losses) / len(losses),
        "categories": list(CATEGORIES),
        "pairs": {c: [int(v) for v in sums.pairs[:, ci].tolist()] for ci, c in enumerate(CATEGORIES)},
        "key_tokens": {c: int(sums.keys[ci]) for ci, c in enumerate(CATEGORIES)},
    }
    if masked:
        kinds = [k for it in items for k in it["kinds"]]
        result["masking"] = {"mask_prob": mask_prob, "replace_probs": list(replace_probs), "n_draws": n_draws,
                             "seed": seed, "max_predictions": MAX_PREDICTIONS, "masked_positions": len(kinds),
                             **{k: kinds.count(k) for k in ("mask", "random", "keep")}}
    for q, v in means.items():
        # the layer value pools the heads: a plain mean over heads, as every head sees the same pairs
        result[q] = {c: _list(v[:, :, ci].mean(1)) for ci, c in enumerate(CATEGORIES)}
    result["per_head"] = {q: {c: _list(v[:, :, ci]) for ci, c in enumerate(CATEGORIES)} for q, v in means.items()}
    return result


# ----------------------------------------------------------------------------------------------- output
def summary_lines(result: dict) -> list[str]:
    """A few lines for the terminal: the measure, the data, and mean |dL/d alpha| per category and layer."""
    head = (f"gradient importance ({result['measure']}; {result['objective']}, agg={result['agg']}) of "
            f"{result['model']['name']}: {result['examples']} examples of {result['texts']} texts, mean loss {result['loss_mean']:.3f}")
    if "masking" in result:
        head += f", {result['masking']['masked_positions']} masked positions"
    lines = [head, f"mean |dL/d alpha| per layer {result['layers'][0]}..{result['layers'][-1]}:"]
    for c in ("sep_eos", "punct", "other", "cls_bos"):
        shown = " ".join("n/a" if v is None else f"{v:.2e}" for v in result["grad_abs"][c])
        lines.append(f"  {CATEGORY_LABELS[c]:>12}: {shown}")
    return lines


def plot(result: dict, path) -> None:
    """The paper's Fig. 3: mean |dL/d alpha| per layer, one line per key category, written atomically as PNG."""
    from pathlib import Path

    from matplotlib.figure import Figure

    from .heads import _save

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    layers = result["layers"]
    for c in ("sep_eos", "punct", "other", "cls_bos"):
        values = [float("nan") if v is None else v for v in result["grad_abs"][c]]
        ax.plot(layers, values, marker="o", label=CATEGORY_LABELS[c], linestyle="--" if c == "cls_bos" else "-")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean |dL / d alpha|")
    ax.set_xticks(layers)
    ax.set_title(f"{result['measure']} ({result['objective']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, Path(path))


def figures(result: dict, out) -> dict:
    """gradient_importance.png (Fig. 3) in ``out``; returns {"gradient": file name}."""
    from pathlib import Path

    plot(result, Path(out) / "gradient_importance.png")
    return {"gradient": "gradient_importance.png"}


def report_lines(result: dict, written: dict) -> list[str]:
    """The report.md section: the figure and the summary lines."""
    lines = ["## Gradient importance of attention (Clark et al. 2019, section 3.2, Fig. 3)", ""]
    if "gradient" in written:
        lines += [f"![gradient importance]({written['gradient']})", ""]
    return lines + ["```", *summary_lines(result), "```", ""]
