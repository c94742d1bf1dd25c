"""Capture complete :class:`~kobattr.layer.Layer` objects from unmodified Hugging Face transformers models.

How it works, without forcing eager attention:

* Two attention functions, ``kobattr_sdpa`` and ``kobattr_eager``, are registered in transformers'
  ``AttentionInterface`` (and the matching mask builders in ``AttentionMaskInterface``, so the model builds
  exactly the masks SDPA / eager would get). Each records query and key (after RoPE and any q/k norms), value
  (before GQA repetition), the mask, the scale and the options that change the attention weights (sliding
  window, logit soft-capping, position biases, sinks), then calls the real SDPA / eager function, so the
  model's output is unchanged. ``config._attn_implementation`` points at them only while a capture runs.
* A forward pre-hook on each layer module records its input x; a forward hook builds the Layer as soon as
  the layer has run, checks that the attention the model computed is the one the Layer describes (the mask
  equals key_valid, causal, window and radius; the soft-cap equals the Layer's; no additive biases), hands
  it to ``on_layer`` and forgets it, so peak memory is one layer's activations.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..layer import Layer, LayerInputError
from .adapters import Adapter, get_adapter


class CaptureError(RuntimeError):
    """What the model computed differs from what the captured Layer says (mask, window, attention calls)."""


OnLayer = Callable[[int, Layer], None]


# ----------------------------------------------------------------------------- attention interface
@dataclass
class _AttentionCall:
    q: Tensor  # (batch, head, query, Dh)
    k: Tensor  # (batch, kv_head, key, Dh)
    v: Tensor
    mask: Optional[Tensor]  # bool (SDPA) or additive float (eager), (batch|1, 1, query, key), or None
    scale: float
    inner: str  # "sdpa" or "eager": decides what a missing mask means
    module_causal: bool  # SDPA's is_causal fallback when the mask is None
    sliding_window: Optional[int]  # the flash-attention window argument, if the module passes one
    softcap: Optional[float]  # logit soft-capping the module asks for (Gemma 2), None for none
    position_bias: Optional[Tensor]  # an additive logit bias (T5-style), which no Layer describes
    sinks: Optional[Tensor]  # attention sinks (s_aux, gpt-oss), which change the softmax's denominator
    output: Optional[Tensor] = None  # (batch, head, query, Dh): sum_j alpha v_j as the model computed it


_active_recorder: ContextVar[Optional["_Recorder"]] = ContextVar("kobattr_active_recorder", default=None)


def _eager_attention(module: nn.Module) -> Callable:
    # Each modeling file defines its own eager_attention_forward (GQA repetition, defaults); use the module's.
    return sys.modules[type(module).__module__].eager_attention_forward


def _recording_attention(inner: str) -> Callable:
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        recorder = _active_recorder.get()
        if recorder is not None:
            # SDPA's own rule: an explicit is_causal argument wins over the module attribute.
            is_causal = kwargs.get("is_causal")
            call = _AttentionCall(
                q=query,
                k=key,
                v=value,
                mask=attention_mask,
                scale=float(scaling) if scaling is not None else query.shape[-1] ** -0.5,
                inner=inner,
                module_causal=bool(getattr(module, "is_causal", True) if is_causal is None else is_causal),
                sliding_window=kwargs.get("sliding_window"),
                softcap=kwargs.get("softcap"),
                position_bias=kwargs.get("position_bias"),
                sinks=kwargs.get("s_aux"),
            )
            recorder.record_attention(module, call)
        real = sdpa_attention_forward if inner == "sdpa" else _eager_attention(module)
        output = real(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if recorder is not None:
            # (batch, query, head, Dh) from both functions; kept as a view, so that the row pass needs no N^2 work
            attn_output = output[0] if isinstance(output, tuple) else output
            if attn_output.dim() == 4 and attn_output.shape[1] == query.shape[2] and attn_output.shape[2] == query.shape[1]:
                call.output = attn_output.transpose(1, 2)
        return output

    return attention


_RECORDING_IMPLEMENTATIONS = {"sdpa": "kobattr_sdpa", "eager": "kobattr_eager"}
for _inner, _mask_builder in (("sdpa", sdpa_mask), ("eager", eager_mask)):
    AttentionInterface.register(_RECORDING_IMPLEMENTATIONS[_inner], _recording_attention(_inner))
    AttentionMaskInterface.register(_RECORDING_IMPLEMENTATIONS[_inner], _mask_builder)


@contextmanager
def _recording_attention_implementation(config, adapter: Adapter):
    """Point the model at the recording twin of its attention implementation for the duration of the block.

    Eager models keep eager; every other implementation (SDPA, flash, flex) is recorded through SDPA, which
    computes the same attention up to rounding, except with logit soft-capping, which transformers' SDPA
    function refuses: those run eager."""
    original = config._attn_implementation
    eager = original == "eager" or adapter.softcap(config) != 0
    config._attn_implementation = _RECORDING_IMPLEMENTATIONS["eager" if eager else "sdpa"]
    try:
        yield
    finally:
        config._attn_implementation = original


# ----------------------------------------------------------------------------- recording
class _Recorder:
    """Collects one layer at a time and hands each finished Layer to ``on_layer``."""

    def __init__(self, model: nn.Module, adapter: Adapter, wanted: list[int], on_layer: OnLayer, key_valid):
        self.adapter = adapter
        self.config = model.config
        self.layer_modules = adapter.layer_modules(model)
        self.wanted = set(wanted)
        self.last = max(wanted)
        self.on_layer = on_layer
        self.key_valid = key_valid
        self.layer_of_attention = {adapter.attention_module(m): i for i, m in enumerate(self.layer_modules)}
        self.inputs: dict[int, Tensor] = {}
        self.calls: dict[int, _AttentionCall] = {}

    def record_attention(self, module: nn.Module, call: _AttentionCall) -> None:
        index = self.layer_of_attention.get(module)
        if index not in self.wanted:
            return
        if index in self.calls:
            raise CaptureError(f"layer {index} called its attention twice in one forward; kobattr captures one self-attention per layer.")
        self.calls[index] = call

    @contextmanager
    def hooks(self):
        handles = []
        for index in sorted(self.wanted):
            module = self.layer_modules[index]
            handles.append(module.register_forward_pre_hook(self._input_hook(index), with_kwargs=True))
            handles.append(module.register_forward_hook(self._output_hook(index)))
        with recording(self, handles):
            yield

    def _input_hook(self, index: int):
        def hook(module, args, kwargs):
            self.inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _output_hook(self, index: int):
        def hook(module, args, output):
            layer = self._build(index, module, self.inputs.pop(index), self.calls.pop(index, None))
            self.on_layer(index, layer)
            if index == self.last:
                raise _AllLayersCaptured

        return hook

    def _build(self, index: int, module: nn.Module, x: Tensor, call: Optional[_AttentionCall]) -> Layer:
        if call is None:
            raise CaptureError(
                f"layer {index} ran without calling transformers' attention interface, so its q, k and v were not seen; "
                "the model's attention module bypasses AttentionInterface."
            )
        device = call.q.device
        w_o, b_o = self.adapter.out_projection(module, call.q.shape[1])
        if w_o.is_meta:
            raise CaptureError(
                f"layer {index}'s weights are offloaded (on the meta device) once the layer has run; "
                "capture reads them then, so load the model without CPU/disk offload."
            )
        _check_call(index, call)
        adapter, config = self.adapter, self.config
        layer = Layer(
            q=call.q,
            k=call.k,
            v=call.v,
            w_o=w_o,
            b_o=b_o,
            x=x.to(device),  # with a device_map the layer input may still be on the previous layer's device
            **adapter.norms(module),  # ln1, ln2, attn_out_norm, ffn_out_norm (None where the layer has none)
            ffn=adapter.feed_forward(module, config),
            placement=adapter.placement_for(config),
            scale=call.scale,
            key_valid=None if self.key_valid is None else self.key_valid.to(device),
            causal=adapter.is_causal(config),
            window=adapter.window(config, index),
            radius=adapter.radius(config, index),
            softcap=adapter.softcap(config),
            head_outputs=_real_rows(call.output, self.key_valid),
        )
        try:
            layer.validate()
        except LayerInputError as err:
            raise LayerInputError(f"layer {index}: {err}") from None
        _check_mask(index, layer, call)
        return layer


def _real_rows(output: Optional[Tensor], key_valid: Optional[Tensor]) -> Optional[Tensor]:
    """The attention output with padding query rows zeroed: a padding row that sees no key may be NaN, and
    no map row of a padding token is ever attributed."""
    if output is None or key_valid is None:
        return output
    return torch.where(key_valid.to(output.device)[:, None, :, None], output, 0.0)


@contextmanager
def recording(recorder, handles: list):
    """``recorder`` receives the attention calls for the duration of the block; the hook ``handles`` are removed
    at its end, however it ends."""
    token = _active_recorder.set(recorder)
    try:
        yield
    finally:
        _active_recorder.reset(token)
        for handle in handles:
            handle.remove()


class _AllLayersCaptured(Exception):
    """Raised from the last requested layer's hook: the rest of the forward pass is not needed."""


# ----------------------------------------------------------------------------- mask verification
def _model_visibility(call: _AttentionCall, batch: int, n: int, n_keys: Optional[int] = None) -> Tensor:
    """(batch, query, key) bool: which keys the model's attention call let each query see (n queries, n_keys keys:
    n unless given, as for cross-attention)."""
    m = n if n_keys is None else n_keys
    mask = call.mask
    if mask is None:
        # SDPA falls back to its is_causal flag (only for more than one query); eager adds nothing.
        causal = call.inner == "sdpa" and call.module_causal and n > 1
        seen = torch.ones(n, m, dtype=torch.bool, device=call.q.device)
        return (seen.tril() if causal else seen).expand(batch, n, m)
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != (n, m):
        raise CaptureError(f"the model's attention mask has shape {tuple(mask.shape)}; kobattr expects (batch, 1, {n}, {m}), one mask shared by all heads.")
    mask = mask[:, 0]
    if mask.dtype == torch.bool:
        return mask.expand(batch, n, m)
    seen = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min
    if not (seen | blocked).all():
        raise CaptureError("the model's additive attention mask carries values other than 0 and -inf, i.e. biases on the "
                           "attention logits (as ALiBi or T5's relative positions add), which kobattr does not support.")
    return seen.expand(batch, n, m)


def _check_call(index: int, call: _AttentionCall) -> None:
    """Refuse attention options that change the weights in a way no Layer describes."""
    if call.position_bias is not None:
        raise CaptureError(f"layer {index} adds a position bias to its attention logits (T5-style relative positions or "
                           "ALiBi), which kobattr does not support: its attention weights come from q, k and a mask only.")
    if call.sinks is not None:
        raise CaptureError(f"layer {index} uses attention sinks (s_aux), which kobattr does not support: they take a share "
                           "of each softmax that no token receives.")


def _check_mask(index: int, layer: Layer, call: _AttentionCall) -> None:
    """Raise CaptureError unless the model's mask equals the structured one on every real query row, and the
    soft-cap and window arguments of its attention call are the Layer's."""
    softcap = float(call.softcap or 0.0)
    if softcap != layer.softcap:
        raise CaptureError(f"layer {index} attends with softcap={call.softcap} but the adapter says softcap={layer.softcap}.")
    if call.sliding_window is not None:
        # the flash-attention argument: the causal window itself, or for a symmetric window its exclusive bound
        # (ModernBERT passes local_attention // 2 + 1 for |i - j| <= local_attention // 2)
        expected_window = layer.window or (layer.radius + 1 if layer.radius else None)
        if call.sliding_window != expected_window:
            raise CaptureError(f"layer {index} attends with sliding_window={call.sliding_window} but the adapter says "
                               f"window={layer.window}, radius={layer.radius}.")
    expected = layer.visible()
    used = _model_visibility(call, layer.batch, layer.seq_len) & layer.valid[:, :, None]  # padding rows are never attributed
    wrong = (used != expected).nonzero()
    if len(wrong):
        b, i, j = wrong[0].tolist()
        raise CaptureError(
            f"layer {index}: the model's attention mask differs from kobattr's (causal={layer.causal}, window={layer.window}, "
            f"radius={layer.radius}, "
            f"padding from attention_mask) at {len(wrong)} places, first at batch {b}, query {i}, key {j} "
            f"(model: {'visible' if used[b, i, j] else 'masked'}); the model does not mask the way its family adapter says."
        )


# ----------------------------------------------------------------------------- public API
def capture(model: nn.Module, inputs: dict, on_layer: OnLayer, layers: Optional[Iterable[int]] = None) -> None:
    """Run ``model`` on ``inputs`` and call ``on_layer(index, layer)`` for each requested layer, in order.

    ``inputs`` is a tokenizer batch (input_ids, attention_mask, ...). ``on_layer`` runs inside the layer's
    forward hook, right after the layer has run, so a caller that computes its attributions there and keeps
    only the results holds one layer's activations at a time. ``layers`` selects layer indices (negative ones
    count from the end; None = all); the forward pass stops after the last requested layer. The model runs
    under torch.no_grad() in eval mode (its training flags are restored afterwards); every tensor of a Layer
    lives on that layer's device.
    """
    adapter = get_adapter(model)
    adapter.activation(model.config)  # reject an unknown activation before running anything
    wanted = _layer_indices(layers, len(adapter.layer_modules(model)))
    if not wanted:
        return
    mask = inputs.get("attention_mask")
    recorder = _Recorder(model, adapter, wanted, on_layer, key_valid=None if mask is None else mask.bool())
    with torch.no_grad(), _eval_mode(model), _recording_attention_implementation(model.config, adapter), recorder.hooks():
        try:
            _run(model, adapter, inputs)
        except _AllLayersCaptured:
            pass


def residual_stream(model: nn.Module, inputs: dict) -> list[Tensor]:
    """The model's own residual stream, from plain forward hooks under its current attention implementation:
    entry 0 is the input of layer 0 and entry l + 1 the output of layer l (before any final norm).
    Inputs are prepared as :func:`capture` prepares them. Meant for checking captured layers."""
    adapter = get_adapter(model)
    layer_modules = adapter.layer_modules(model)
    stream: list[Tensor] = []

    def keep_input(module, args, kwargs):
        stream.append(args[0] if args else kwargs["hidden_states"])

    def keep_output(module, args, output):
        stream.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer_modules[0].register_forward_pre_hook(keep_input, with_kwargs=True)]
    handles += [m.register_forward_hook(keep_output) for m in layer_modules]
    try:
        with torch.no_grad(), _eval_mode(model):
            _run(model, adapter, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return stream


def _layer_indices(layers: Optional[Iterable[int]], n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    indices = []
    for index in layers:
        if not isinstance(index, int) or not -n_layers <= index < n_layers:
            raise IndexError(f"layer index {index!r} is out of range for a model with {n_layers} layers.")
        indices.append(index % n_layers)
    return sorted(set(indices))


# what an encoder of an encoder-decoder model takes (a batch may also hold labels or decoder inputs)
_ENCODER_INPUTS = ("input_ids", "attention_mask", "inputs_embeds")


def _run(model: nn.Module, adapter: Adapter, inputs: dict):
    """The forward pass capture needs: the base model, or the submodule ``adapter.runs`` of it (an encoder-decoder
    model's encoder, on the encoder's inputs only)."""
    if adapter.runs is None:
        return model.base_model(**_model_inputs(adapter, inputs))
    module = model.base_model.get_submodule(adapter.runs)
    return module(**{key: value for key, value in inputs.items() if key in _ENCODER_INPUTS})


def _model_inputs(adapter: Adapter, inputs: dict) -> dict:
    """The keyword arguments for the base model: no KV cache, and for decoders position ids that start at each
    text's first real token (what generate() does), so left padding does not shift positions."""
    kwargs = dict(inputs, use_cache=False)
    mask = inputs.get("attention_mask")
    if adapter.positions_from_padding and mask is not None and "position_ids" not in inputs:
        positions = mask.long().cumsum(-1) - 1
        kwargs["position_ids"] = positions.masked_fill(mask == 0, 1)
    return kwargs


@contextmanager
def _eval_mode(model: nn.Module):
    training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in training.items():
            module.training = flag
