"""Capture the decoder layers of encoder-decoder models (Marian, BART, M2M-100 / NLLB, mBART) with teacher forcing.

Each decoder layer calls transformers' attention interface twice: its causal self-attention and its cross-attention
over the encoder output. Both calls are recorded through the recording attention functions of
kobattr.models.recording (the ContextVar recorder), mapped to (layer index, "self" | "cross") by their modules;
forward hooks on the layer record its input x and output, and hooks on its three norms record the hidden states
between the blocks (the stream p entering the cross block among them). When a layer has run, its
:class:`~kobattr.seq2seq.DecoderLayer` is built, its two masks are checked against kobattr's rules (self-attention:
causal + target padding; cross-attention: source padding only, every target row) and it is handed to ``on_layer``.

The encoders of these families are captured by kobattr.models.capture with the encoder adapters of adapters.ADAPTERS
(they run the encoder alone). T5-style models add learned relative position biases to the attention logits and are
refused with that reason.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ..layer import Layer, LayerInputError
from ..seq2seq import CrossAttention, DecoderLayer
from .adapters import Adapter, UnsupportedModelError, _additive_bias, get_adapter
from .recording import (CaptureError, _AllLayersCaptured, _AttentionCall, _check_call, _check_mask,
                        _eval_mode, _layer_indices, _model_visibility, _real_rows, _recording_attention_implementation,
                        recording)

OnDecoderLayer = Callable[[int, DecoderLayer], None]


@dataclass(frozen=True)
class DecoderAdapter:
    """Where an encoder-decoder family keeps the pieces of a decoder layer: paths inside one decoder layer module,
    except ``layers`` (the ModuleList of decoder layers, inside ``model.base_model``)."""

    family: str
    model_types: tuple[str, ...]
    placement: str  # "post" (Marian, BART) or "pre" (M2M-100, NLLB, mBART)
    layers: str = "decoder.layers"
    self_attn: str = "self_attn"
    self_out: str = "self_attn.out_proj"
    cross_attn: str = "encoder_attn"
    cross_out: str = "encoder_attn.out_proj"
    ln_self: str = "self_attn_layer_norm"  # LN_s
    ln_cross: str = "encoder_attn_layer_norm"  # LN_c
    ln_ffn: str = "final_layer_norm"  # LN_f
    ffn_in: str = "fc1"
    ffn_out: str = "fc2"
    activation_key: str = "activation_function"

    @property
    def self_adapter(self) -> Adapter:
        """An Adapter describing the self-attention block as a kobattr Layer (see DecoderLayer.self_attn for its ln2)."""
        return Adapter(self.family, self.model_types, layers=self.layers, attention=self.self_attn, out_proj=self.self_out,
                       ln1=self.ln_self, ln2=self.ln_ffn if self.placement == "post" else self.ln_cross,
                       ffn_in=self.ffn_in, ffn_out=self.ffn_out, placement=self.placement,
                       activation_key=self.activation_key, causal=True)

    @property
    def cross_adapter(self) -> Adapter:
        """An Adapter whose out_projection is the cross-attention's (for its weight helpers)."""
        return Adapter(self.family, self.model_types, layers=self.layers, attention=self.cross_attn,
                       out_proj=self.cross_out, ln1=None, ln2=None, ffn_in=self.ffn_in, ffn_out=self.ffn_out,
                       activation_key=self.activation_key)

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.get_submodule(self.layers)

    def probes(self, layer_module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
        """{state: (module, "input" | "output")} for the hidden states of DecoderLayer.states between the blocks."""
        get = layer_module.get_submodule
        if self.placement == "post":
            return dict(self_y=(get(self.ln_self), "input"), self_mid=(get(self.ln_self), "output"),
                        p=(get(self.ln_self), "output"), cross_y=(get(self.ln_cross), "input"),
                        cross_g=(get(self.ln_cross), "output"))
        return dict(self_y=(get(self.ln_cross), "input"), self_mid=(get(self.ln_cross), "output"),
                    p=(get(self.ln_cross), "input"), cross_y=(get(self.ln_ffn), "input"),
                    cross_g=(get(self.ln_ffn), "output"))


DECODER_ADAPTERS = (
    DecoderAdapter("BART", ("bart",), "post"),
    DecoderAdapter("Marian", ("marian",), "post"),
    DecoderAdapter("M2M-100", ("m2m_100",), "pre"),
    DecoderAdapter("mBART", ("mbart",), "pre"),
)
SEQ2SEQ_FAMILIES = tuple(a.family for a in DECODER_ADAPTERS)
_BY_MODEL_TYPE = {t: a for a in DECODER_ADAPTERS for t in a.model_types}


def get_decoder_adapter(model: nn.Module) -> DecoderAdapter:
    """The decoder adapter of an encoder-decoder model, by ``config.model_type``; UnsupportedModelError otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        bias = _additive_bias(config, model_type)
        reason = (f": it adds {bias} to the attention logits, which kobattr does not support (its attention weights "
                  f"come from q, k and a visibility mask only)" if bias else "")
        supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in DECODER_ADAPTERS)
        raise UnsupportedModelError(f"kobattr cannot capture the decoder of model_type {model_type!r} "
                                    f"({type(model).__name__}){reason}; supported encoder-decoder families: {supported}.")
    return _BY_MODEL_TYPE[model_type]


# ----------------------------------------------------------------------------- recording
class _DecoderRecorder:
    """Collects one decoder layer at a time (two attention calls, its input, output and the states between its
    blocks) and hands each finished DecoderLayer to ``on_layer``."""

    def __init__(self, model: nn.Module, adapter: DecoderAdapter, wanted: list[int], on_layer: OnDecoderLayer,
                 source_valid: Optional[Tensor], target_valid: Optional[Tensor]):
        self.adapter = adapter
        self.self_adapter, self.cross_adapter = adapter.self_adapter, adapter.cross_adapter
        self.config = model.config
        self.layer_modules = adapter.layer_modules(model)
        self.wanted = set(wanted)
        self.last = max(wanted)
        self.on_layer = on_layer
        self.source_valid, self.target_valid = source_valid, target_valid
        self.role = {}
        for index, module in enumerate(self.layer_modules):
            self.role[module.get_submodule(adapter.self_attn)] = (index, "self")
            self.role[module.get_submodule(adapter.cross_attn)] = (index, "cross")
        self.calls: dict[tuple[int, str], _AttentionCall] = {}
        self.inputs: dict[int, Tensor] = {}
        self.states: dict[int, dict] = {}

    def record_attention(self, module: nn.Module, call: _AttentionCall) -> None:
        key = self.role.get(module)
        if key is None or key[0] not in self.wanted:
            return  # the encoder's layers, or a decoder layer not asked for
        if key in self.calls:
            raise CaptureError(f"decoder layer {key[0]} called its {key[1]}-attention twice in one forward.")
        self.calls[key] = call

    @contextmanager
    def hooks(self):
        handles = []
        for index in sorted(self.wanted):
            module = self.layer_modules[index]
            handles.append(module.register_forward_pre_hook(self._input_hook(index), with_kwargs=True))
            for state, (probe, which) in self.adapter.probes(module).items():
                handles.append(probe.register_forward_hook(self._state_hook(index, state, which)))
            handles.append(module.register_forward_hook(self._output_hook(index)))
        with recording(self, handles):
            yield

    def _input_hook(self, index: int):
        def hook(module, args, kwargs):
            self.inputs[index] = args[0] if args else kwargs["hidden_states"]
            self.states[index] = {}

        return hook

    def _state_hook(self, index: int, state: str, which: str):
        def hook(module, args, output):
            self.states[index][state] = args[0] if which == "input" else output

        return hook

    def _output_hook(self, index: int):
        def hook(module, args, output):
            states = self.states.pop(index)
            states["out"] = output[0] if isinstance(output, tuple) else output
            layer = self._build(index, module, self.inputs.pop(index), self.calls.pop((index, "self"), None),
                                self.calls.pop((index, "cross"), None), states)
            self.on_layer(index, layer)
            if index == self.last:
                raise _AllLayersCaptured

        return hook

    def _build(self, index: int, module: nn.Module, x: Tensor, self_call: Optional[_AttentionCall],
               cross_call: Optional[_AttentionCall], states: dict) -> DecoderLayer:
        for role, call in (("self", self_call), ("cross", cross_call)):
            if call is None:
                raise CaptureError(f"decoder layer {index} ran without calling transformers' attention interface for its "
                                   f"{role}-attention, so its q, k and v were not seen (did the model get encoder outputs?).")
            try:
                _check_call(index, call)
            except CaptureError as err:
                raise CaptureError(f"decoder {err}") from None
            if call.softcap or call.sliding_window is not None:
                raise CaptureError(f"decoder layer {index}'s {role}-attention passes softcap={call.softcap} / "
                                   f"sliding_window={call.sliding_window}, which kobattr's decoder layers do not describe.")
        device = self_call.q.device
        adapter, config = self.self_adapter, self.config
        w_o, b_o = adapter.out_projection(module, self_call.q.shape[1])
        if w_o.is_meta:
            raise CaptureError(f"decoder layer {index}'s weights are offloaded (on the meta device); load the model "
                               "without CPU/disk offload.")
        target_valid = None if self.target_valid is None else self.target_valid.to(device)
        source_valid = None if self.source_valid is None else self.source_valid.to(device)
        norms = adapter.norms(module)
        ffn = adapter.feed_forward(module, config)
        self_layer = Layer(q=self_call.q, k=self_call.k, v=self_call.v, w_o=w_o, b_o=b_o, x=x.to(device),
                           ln1=norms["ln1"], ln2=norms["ln2"], ffn=ffn, placement=self.adapter.placement,
                           scale=self_call.scale, key_valid=target_valid, causal=True,
                           head_outputs=_real_rows(self_call.output, target_valid))
        get = module.get_submodule
        ln_self, ln_cross, ln_ffn = (adapter._norm(get(path)) for path in
                                     (self.adapter.ln_self, self.adapter.ln_cross, self.adapter.ln_ffn))
        cw_o, cb_o = self.cross_adapter.out_projection(module, cross_call.q.shape[1])
        cross = CrossAttention(q=cross_call.q, k=cross_call.k, v=cross_call.v, w_o=cw_o, b_o=cb_o, p=states["p"],
                               norm=ln_cross if self.adapter.placement == "post" else ln_ffn, scale=cross_call.scale,
                               source_valid=source_valid, target_valid=target_valid,
                               head_outputs=_real_rows(cross_call.output, target_valid))
        layer = DecoderLayer(self_attn=self_layer, cross=cross, ffn=ffn, ln_self=ln_self, ln_cross=ln_cross,
                             ln_ffn=ln_ffn, placement=self.adapter.placement, states=states)
        try:
            layer.validate()
        except LayerInputError as err:
            raise LayerInputError(f"decoder layer {index}: {err}") from None
        try:
            _check_mask(index, self_layer, self_call)
        except CaptureError as err:
            raise CaptureError(f"decoder {err} (self-attention: causal, target padding from decoder_attention_mask)") from None
        _check_cross_mask(index, cross, cross_call)
        return layer


def _check_cross_mask(index: int, cross: CrossAttention, call: _AttentionCall) -> None:
    """CaptureError unless every real target row of the model's cross-attention sees exactly the real source tokens."""
    used = _model_visibility(call, cross.batch, cross.target_len, cross.source_len) & cross.targets[:, :, None]
    wrong = (used != cross.visible()).nonzero()
    if len(wrong):
        b, i, j = wrong[0].tolist()
        raise CaptureError(
            f"decoder layer {index}: the model's cross-attention mask differs from kobattr's (every real target position "
            f"sees every real source token; source padding from attention_mask) at {len(wrong)} places, first at batch {b}, "
            f"target {i}, source {j} (model: {'visible' if used[b, i, j] else 'masked'}).")


# ----------------------------------------------------------------------------- public API
_SEQ2SEQ_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", "encoder_outputs", "decoder_input_ids",
                   "decoder_attention_mask", "decoder_inputs_embeds")


def capture_decoder(model: nn.Module, inputs: dict, on_layer: OnDecoderLayer, layers: Optional[Iterable[int]] = None) -> None:
    """Run an encoder-decoder ``model`` with teacher forcing and call ``on_layer(index, decoder_layer)`` for each
    requested decoder layer, in order.

    ``inputs``: input_ids and attention_mask (the source; or encoder_outputs with the source's attention_mask),
    decoder_input_ids and decoder_attention_mask (the target as the decoder reads it, e.g. the reference translation
    shifted right behind the decoder start token; padding on the right: BART's, Marian's and mBART's decoder positions
    count from 0 whatever the mask says). ``layers``: decoder
    layer indices (negative from the end; None = all); the forward pass stops after the last requested one. The model
    runs under torch.no_grad() in eval mode without a KV cache; each DecoderLayer lives on its layer's device.
    """
    adapter = get_decoder_adapter(model)
    encoder_adapter = get_adapter(model)
    adapter.self_adapter.activation(model.config)  # reject an unknown activation before running anything
    if inputs.get("decoder_input_ids") is None and inputs.get("decoder_inputs_embeds") is None:
        raise LayerInputError("capture_decoder needs the target: decoder_input_ids (teacher forcing), with "
                              "decoder_attention_mask for padded targets.")
    wanted = _layer_indices(layers, len(adapter.layer_modules(model)))
    if not wanted:
        return
    source, target = inputs.get("attention_mask"), inputs.get("decoder_attention_mask")
    recorder = _DecoderRecorder(model, adapter, wanted, on_layer, source_valid=None if source is None else source.bool(),
                                target_valid=None if target is None else target.bool())
    kwargs = {key: value for key, value in inputs.items() if key in _SEQ2SEQ_INPUTS}
    with torch.no_grad(), _eval_mode(model), _recording_attention_implementation(model.config, encoder_adapter), \
            recorder.hooks():
        try:
            model.base_model(**kwargs, use_cache=False)
        except _AllLayersCaptured:
            pass
