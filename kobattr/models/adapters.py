"""Declarative per-family adapters: where each piece of a transformer layer lives in a Hugging Face model.

An adapter is data, in the TransformerLens spirit: module paths relative to one layer module, the norm
kind, the LN placement, how projection weights are stored, which config key names the activation, and
the masking rules (causal, sliding window). Everything model-specific that capture needs is here; the
capture machinery itself is family-agnostic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..layer import FeedForward, Norm

# Hugging Face activation names -> kobattr element-wise activation. "gelu_new" (GPT-2) and
# "gelu_pytorch_tanh" are both the tanh approximation; "gelu" is the exact erf form.
ACTIVATION_NAMES = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# The gated form of each element-wise activation (the activation acts on the gate).
GATED_NAMES = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}


class UnsupportedModelError(ValueError):
    """The model's family, activation or configuration is not one kobattr can capture exactly."""


def _no_window(config, layer_index: int) -> int:
    return 0


def _mistral_window(config, layer_index: int) -> int:
    # transformers masks key j from query i unless i - j < sliding_window (masking_utils.sliding_window_overlay:
    # kv_idx > q_idx - sliding_window), which is exactly Layer.window.
    return config.sliding_window or 0


def _qwen2_window(config, layer_index: int) -> int:
    # Qwen2Config (and Qwen3Config) turns sliding_window into None unless use_sliding_window, and marks the
    # windowed layers (index >= max_window_layers) in layer_types; the others attend fully.
    if config.layer_types[layer_index] == "sliding_attention":
        return config.sliding_window
    return 0


@dataclass(frozen=True)
class Adapter:
    """Where one family keeps its layer pieces. Paths are dotted attribute names inside a layer module,
    except ``layers`` (the ModuleList of layers, inside ``model.base_model``)."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    attention: str  # the module that calls transformers' attention interface
    out_proj: str  # W_O and b_O
    ln1: str
    ln2: str
    ffn_in: str  # projection paths may name a slice of a fused projection: "mlp.gate_up_proj[1/2]"
    ffn_out: str
    ffn_gate: Optional[str] = None
    norm: str = "layernorm"
    placement: str = "post"
    weights_in_out: bool = False  # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)
    activation_key: str = "hidden_act"
    causal: bool = False
    window: Callable[[object, int], int] = _no_window
    # Decoders with left padding need position ids counted from the first real token (as generate() does),
    # otherwise a padded text is positioned differently from the same text alone.
    positions_from_padding: bool = False
    # the most tokens a text may have: learned absolute positions stop there (None: no hard limit, e.g. RoPE)
    max_tokens: Callable[[object], Optional[int]] = lambda config: None
    # added to the norm's stored weight to give its scale: Gemma's RMSNorm multiplies by (1 + weight)
    norm_weight_offset: float = 0.0

    # ------------------------------------------------------------------ modules
    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.get_submodule(self.layers)

    def attention_module(self, layer_module: nn.Module) -> nn.Module:
        return layer_module.get_submodule(self.attention)

    def y_module(self, layer_module: nn.Module) -> nn.Module:
        """The norm whose input is the post-attention residual sum y = x + Attn (LN1 post-LN, LN2 pre-LN)."""
        return layer_module.get_submodule(self.ln1 if self.placement == "post" else self.ln2)

    # ------------------------------------------------------------------ weights
    def activation(self, config) -> str:
        """The kobattr activation of this family's FFN, from the config; unknown names are rejected."""
        name = getattr(config, self.activation_key, None)
        if not isinstance(name, str) or name not in ACTIVATION_NAMES:
            raise UnsupportedModelError(
                f"{self.family} config has {self.activation_key}={name!r}; kobattr supports {sorted(ACTIVATION_NAMES)}."
            )
        activation = ACTIVATION_NAMES[name]
        if self.ffn_gate is None:
            return activation
        if activation not in GATED_NAMES:
            raise UnsupportedModelError(f"{self.family} has a gated FFN with {name!r}, which kobattr cannot gate.")
        return GATED_NAMES[activation]

    def weight(self, linear: nn.Module) -> Tensor:
        """A projection's weight as (in, out), the layout ``x @ W`` uses."""
        w = linear.weight.detach()
        return w if self.weights_in_out else w.T

    def projection(self, layer_module: nn.Module, path: str) -> tuple[Tensor, Optional[Tensor]]:
        """(weight (in, out), bias (out,) or None) of the projection at ``path``. A path ending in ``[i/n]``
        names the i-th of n equal slices of a fused projection's outputs (``chunk(n, dim=-1)[i]`` of its
        output, as Phi-3's gate_up_proj is split)."""
        match = _CHUNK.fullmatch(path)
        module = layer_module.get_submodule(match["path"] if match else path)
        w, b = self.weight(module), _bias(module)
        if match:
            i, n = int(match["i"]), int(match["n"])
            if not 0 <= i < n or w.shape[1] % n:
                raise UnsupportedModelError(f"{self.family}: {path!r} cannot be cut into {n} equal slices of {w.shape[1]} outputs.")
            w = w.chunk(n, dim=1)[i]
            b = None if b is None else b.chunk(n)[i]
        return w, b

    def out_projection(self, layer_module: nn.Module, n_heads: int) -> tuple[Tensor, Optional[Tensor]]:
        """(w_o (H, Dh, D), b_o (D,) or None) from the output projection."""
        w, b = self.projection(layer_module, self.out_proj)
        return w.reshape(n_heads, w.shape[0] // n_heads, w.shape[1]), b

    def norms(self, layer_module: nn.Module) -> tuple[Norm, Norm]:
        return tuple(self._norm(layer_module.get_submodule(path)) for path in (self.ln1, self.ln2))

    def _norm(self, module: nn.Module) -> Norm:
        # nn.LayerNorm and GemmaRMSNorm keep eps; the Llama-style RMSNorms keep variance_epsilon.
        eps = getattr(module, "eps", None)
        if eps is None:
            eps = module.variance_epsilon
        weight = module.weight.detach()
        if self.norm_weight_offset:
            weight = weight + self.norm_weight_offset
        return Norm(self.norm, weight=weight, bias=_bias(module), eps=float(eps))

    def feed_forward(self, layer_module: nn.Module, config) -> FeedForward:
        w_in, b_in = self.projection(layer_module, self.ffn_in)
        w_out, b_out = self.projection(layer_module, self.ffn_out)
        w_gate, b_gate = (None, None) if self.ffn_gate is None else self.projection(layer_module, self.ffn_gate)
        return FeedForward(
            activation=self.activation(config),
            w_in=w_in,
            w_out=w_out,
            b_in=b_in,
            b_out=b_out,
            w_gate=w_gate,
            b_gate=b_gate,
        )


_CHUNK = re.compile(r"(?P<path>.+)\[(?P<i>\d+)/(?P<n>\d+)\]")


def _bias(module: nn.Module) -> Optional[Tensor]:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


_ENCODER_PATHS = dict(
    layers="encoder.layer",
    attention="attention.self",
    out_proj="attention.output.dense",
    ln1="attention.output.LayerNorm",
    ln2="output.LayerNorm",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
)
_LLAMA_PATHS = dict(
    layers="layers",
    attention="self_attn",
    out_proj="self_attn.o_proj",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    ffn_in="mlp.up_proj",
    ffn_gate="mlp.gate_proj",
    ffn_out="mlp.down_proj",
    norm="rmsnorm",
    placement="pre",
    causal=True,
    positions_from_padding=True,
)


def _learned_positions(config) -> int:
    return config.max_position_embeddings


def _positions_after_padding(config) -> int:
    # RoBERTa-style positions start after the padding index
    return config.max_position_embeddings - config.pad_token_id - 1


ADAPTERS = (
    Adapter("BERT", ("bert",), **_ENCODER_PATHS, max_tokens=_learned_positions),
    Adapter("RoBERTa", ("roberta",), **_ENCODER_PATHS, max_tokens=_positions_after_padding),
    Adapter("XLM-RoBERTa", ("xlm-roberta",), **_ENCODER_PATHS, max_tokens=_positions_after_padding),
    # ELECTRA's optional embeddings_project (embedding_size != hidden_size) runs before layer 0, outside capture
    Adapter("ELECTRA", ("electra",), **_ENCODER_PATHS, max_tokens=_learned_positions),
    Adapter(
        "DistilBERT",
        ("distilbert",),
        layers="transformer.layer",
        attention="attention",
        out_proj="attention.out_lin",
        ln1="sa_layer_norm",
        ln2="output_layer_norm",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        activation_key="activation",
        max_tokens=_learned_positions,
    ),
    Adapter(
        "GPT-2",
        ("gpt2",),
        layers="h",
        attention="attn",
        out_proj="attn.c_proj",
        ln1="ln_1",
        ln2="ln_2",
        ffn_in="mlp.c_fc",
        ffn_out="mlp.c_proj",
        placement="pre",
        weights_in_out=True,
        activation_key="activation_function",
        causal=True,
        positions_from_padding=True,
        max_tokens=lambda config: config.n_positions,
    ),
    Adapter("Llama", ("llama",), **_LLAMA_PATHS),
    Adapter("Mistral", ("mistral",), **_LLAMA_PATHS, window=_mistral_window),
    Adapter("Qwen2", ("qwen2",), **_LLAMA_PATHS, window=_qwen2_window),
    # Qwen3 adds per-head q/k RMSNorms inside the attention; q and k are recorded after them (and after RoPE)
    Adapter("Qwen3", ("qwen3",), **_LLAMA_PATHS, window=_qwen2_window),
    # Phi-3 fuses q/k/v (read from the attention call, so qkv_proj is never needed) and gate/up:
    # Phi3MLP does gate, up = gate_up_proj(x).chunk(2, dim=-1), so the gate is the first half
    Adapter("Phi-3", ("phi3",), **{**_LLAMA_PATHS, "ffn_in": "mlp.gate_up_proj[1/2]", "ffn_gate": "mlp.gate_up_proj[0/2]"},
            window=_mistral_window),
    # Gemma: GemmaRMSNorm scales by (1 + weight) (computed in float32, eps inside the root), GeGLU with tanh
    # GELU (GemmaConfig turns a legacy hidden_act="gelu" into gelu_pytorch_tanh); the sqrt(hidden) embedding
    # scale is before layer 0, and the attention scale (head_dim ** -0.5) is read from the attention call
    Adapter("Gemma", ("gemma",), **_LLAMA_PATHS, norm_weight_offset=1.0),
)
SUPPORTED_FAMILIES = tuple(adapter.family for adapter in ADAPTERS)
_BY_MODEL_TYPE = {model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types}


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a Hugging Face model, chosen by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
        raise UnsupportedModelError(
            f"kobattr cannot capture model_type {model_type!r} ({type(model).__name__}); supported families: {supported}."
        )
    return _BY_MODEL_TYPE[model_type]
