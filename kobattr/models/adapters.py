"""Declarative per-family adapters: where each piece of a transformer layer lives in a Hugging Face model.

An adapter is data, in the TransformerLens spirit: module paths relative to one layer module (the norms a
block has before and after attention and the FFN, absent ones as None), the norm kind, the placement (pre,
post or parallel, possibly chosen by a config flag), how projection weights are stored, which config key
names the activation, and the attention rules (causal, causal sliding window, symmetric window radius,
logit soft-capping) as functions of the config and the layer index. Everything model-specific that capture
needs is here; the capture machinery itself is family-agnostic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..layer import NORM_FIELDS, FeedForward, Norm

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
    # windowed layers (index >= max_window_layers) in layer_types; the others attend fully. Gemma 2 and 3
    # alternate local ("sliding_attention") and global layers the same way, with the Mistral mask rule.
    if config.layer_types[layer_index] == "sliding_attention":
        return config.sliding_window
    return 0


def _bidirectional(config) -> bool:
    return bool(getattr(config, "use_bidirectional_attention", False))


def _gemma3_window(config, layer_index: int) -> int:
    # the causal local layers; with use_bidirectional_attention (EmbeddingGemma) they are symmetric: _gemma3_radius
    return 0 if _bidirectional(config) else _qwen2_window(config, layer_index)


def _gemma3_radius(config, layer_index: int) -> int:
    # Gemma3TextModel with use_bidirectional_attention ORs the causal local mask with |i - j| < sliding_window
    # (_bidirectional_window_overlay: an exclusive bound), i.e. |i - j| <= sliding_window - 1; its full layers
    # see every key. (Gemma3TextConfig has already turned the configured window w into w // 2 + 1.)
    if _bidirectional(config) and config.layer_types[layer_index] == "sliding_attention":
        return config.sliding_window - 1
    return 0


def _modernbert_radius(config, layer_index: int) -> int:
    # ModernBERT's local layers get create_bidirectional_sliding_window_mask: |q_idx - kv_idx| <= sliding_window
    # (masking_utils.sliding_window_bidirectional_overlay), where ModernBertConfig.sliding_window is
    # local_attention // 2; layer i is local unless i % global_attn_every_n_layers == 0 (config.layer_types).
    if config.layer_types[layer_index] == "sliding_attention":
        return config.sliding_window
    return 0


def _no_softcap(config) -> float:
    return 0.0


def _gemma2_softcap(config) -> float:
    # Gemma2Attention passes softcap=config.attn_logit_softcapping to the attention function (None: no capping).
    # Gemma 3 keeps the config key but never passes it, so its adapter has no softcap.
    return float(config.attn_logit_softcapping or 0.0)


@dataclass(frozen=True)
class Adapter:
    """Where one family keeps its layer pieces. Paths are dotted attribute names inside a layer module,
    except ``layers`` (the ModuleList of layers, inside ``model.base_model``).

    Norm paths (``ln1``, ``ln2``, ``attn_out_norm``, ``ffn_out_norm``) follow :class:`~kobattr.layer.Layer`:
    None where the family has no such norm, and a module that is ``nn.Identity`` also means none there
    (ModernBERT's layer 0 has no norm before attention)."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    attention: str  # the module that calls transformers' attention interface
    out_proj: str  # W_O and b_O
    ln1: Optional[str]  # post: after the attention residual; pre / parallel: before attention
    ln2: Optional[str]  # post: after the FFN residual; pre / parallel: before the FFN
    ffn_in: str  # projection paths may name a slice of a fused projection: "mlp.gate_up_proj[1/2]"
    ffn_out: str
    ffn_gate: Optional[str] = None
    attn_out_norm: Optional[str] = None  # after attention, before its residual add (Gemma 2/3, OLMo 2)
    ffn_out_norm: Optional[str] = None  # after the FFN, before its residual add
    norm: str = "layernorm"
    placement: str = "post"
    # a config flag choosing between placement "parallel" (true) and "pre" (false): GPT-NeoX's use_parallel_residual
    parallel_key: Optional[str] = None
    weights_in_out: bool = False  # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)
    activation_key: str = "hidden_act"
    causal: bool = False
    # a config flag that makes a causal family attend both ways (Gemma 3's use_bidirectional_attention)
    bidirectional_key: Optional[str] = None
    window: Callable[[object, int], int] = _no_window  # causal sliding window per layer (Layer.window)
    radius: Callable[[object, int], int] = _no_window  # symmetric window per layer (Layer.radius)
    softcap: Callable[[object], float] = _no_softcap  # attention logit soft-capping (Layer.softcap)
    # Decoders with left padding need position ids counted from the first real token (as generate() does),
    # otherwise a padded text is positioned differently from the same text alone.
    positions_from_padding: bool = False
    # the most tokens a text may have: learned absolute positions stop there (None: no hard limit, e.g. RoPE)
    max_tokens: Callable[[object], Optional[int]] = lambda config: None
    # added to the norm's stored weight to give its scale: Gemma's RMSNorm multiplies by (1 + weight)
    norm_weight_offset: float = 0.0
    # the submodule of model.base_model that capture runs (None: the base model itself). Encoder-decoder models
    # run their encoder alone ("encoder"), with the encoder's inputs only, so no decoder inputs are needed
    runs: Optional[str] = None

    # ------------------------------------------------------------------ modules
    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.get_submodule(self.layers)

    def attention_module(self, layer_module: nn.Module) -> nn.Module:
        return layer_module.get_submodule(self.attention)

    def placement_for(self, config) -> str:
        """The Layer placement of this model: ``placement``, or chosen by the config flag ``parallel_key``."""
        if self.parallel_key is None:
            return self.placement
        return "parallel" if getattr(config, self.parallel_key) else "pre"

    def structure(self, config) -> str:
        """The block structure (kobattr.layer.STRUCTURE_NAMES) of this model's layers, as Layer.structure derives it."""
        if self.attn_out_norm is not None and self.ffn_out_norm is not None:
            return "post_only" if self.ln1 is None and self.ln2 is None else "sandwich"
        return self.placement_for(config)

    def is_causal(self, config) -> bool:
        if self.bidirectional_key is not None and getattr(config, self.bidirectional_key, False):
            return False
        return self.causal

    def probes(self, layer_module: nn.Module, config) -> dict[str, tuple[nn.Module, str]]:
        """Modules whose input or output is one of the hidden states of :meth:`Layer.stream`, for checking a
        captured layer against the model: {state: (module, "input" | "output")}. attn: what attention adds
        to the stream (after attn_out_norm); y: x + attn, where a module reads it (none in a parallel block);
        mid: the FFN input; ffn_out: what the FFN adds (after ffn_out_norm)."""
        get = layer_module.get_submodule
        # the FFN block reads mid; where the FFN has no block of its own (BART's fc1 / fc2 sit in the layer), its
        # input projection does
        parent, _, name = _module_path(self.ffn_in).rpartition(".")
        ffn = get(parent or name)
        probes = {
            "attn": (get(self.attn_out_norm), "output") if self.attn_out_norm else (get(self.out_proj), "output"),
            "mid": (ffn, "input"),
            "ffn_out": (get(self.ffn_out_norm), "output") if self.ffn_out_norm else (get(_module_path(self.ffn_out)), "output"),
        }
        structure = self.structure(config)
        if structure == "post":
            probes["y"] = (get(self.ln1), "input")
        elif structure in ("pre", "sandwich"):
            probes["y"] = (get(self.ln2), "input")
        elif structure == "post_only":
            probes["y"] = (ffn, "input")
        return probes

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

    def norms(self, layer_module: nn.Module) -> dict[str, Optional[Norm]]:
        """{ln1, ln2, attn_out_norm, ffn_out_norm: Norm, or None where the layer has none (no path, or nn.Identity)}."""
        norms = {}
        for name in NORM_FIELDS:
            path = getattr(self, name)
            module = None if path is None else layer_module.get_submodule(path)
            norms[name] = None if module is None or isinstance(module, nn.Identity) else self._norm(module)
        return norms

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


def _module_path(path: str) -> str:
    """The module a projection path names, without a slice suffix ``[i/n]``."""
    match = _CHUNK.fullmatch(path)
    return match["path"] if match else path


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


def _no_position_limit(config) -> None:
    return None


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
    # GPT-NeoX / Pythia: out = x + Attn(LN1(x)) + FF(LN2(x)) with use_parallel_residual (the default), else pre-LN.
    # q, k and v come fused from query_key_value (read from the attention call); partial rotary (the first
    # rotary_pct of each head) is already applied to the recorded q and k
    Adapter(
        "GPT-NeoX",
        ("gpt_neox",),
        layers="layers",
        attention="attention",
        out_proj="attention.dense",
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        ffn_in="mlp.dense_h_to_4h",
        ffn_out="mlp.dense_4h_to_h",
        placement="parallel",
        parallel_key="use_parallel_residual",
        causal=True,
        positions_from_padding=True,
    ),
    # Gemma 2: sandwich norms (input_layernorm and pre_feedforward_layernorm before, post_attention_layernorm and
    # post_feedforward_layernorm after attention / the FFN), all (1 + weight) RMSNorms; logit soft-capping; local
    # (sliding) and global layers alternate (config.layer_types); scale query_pre_attn_scalar ** -0.5, read from
    # the attention call. transformers refuses SDPA for Gemma 2 (softcap), so it runs and is recorded eager.
    Adapter(
        "Gemma 2",
        ("gemma2",),
        **{**_LLAMA_PATHS, "ln2": "pre_feedforward_layernorm"},
        attn_out_norm="post_attention_layernorm",
        ffn_out_norm="post_feedforward_layernorm",
        norm_weight_offset=1.0,
        activation_key="hidden_activation",
        window=_qwen2_window,
        softcap=_gemma2_softcap,
    ),
    # Gemma 3 (text): Gemma 2's blocks with per-head q/k norms (q and k are recorded after them and after the
    # local or global RoPE), no soft-capping; EmbeddingGemma-style use_bidirectional_attention is non-causal
    # with symmetric local windows
    Adapter(
        "Gemma 3",
        ("gemma3_text",),
        **{**_LLAMA_PATHS, "ln2": "pre_feedforward_layernorm"},
        attn_out_norm="post_attention_layernorm",
        ffn_out_norm="post_feedforward_layernorm",
        norm_weight_offset=1.0,
        activation_key="hidden_activation",
        bidirectional_key="use_bidirectional_attention",
        window=_gemma3_window,
        radius=_gemma3_radius,
    ),
    # OLMo 2: norms after attention and after the FFN only (post_only); its q/k RMSNorms over the whole
    # projection act inside the attention, before RoPE, so the recorded q and k include them
    Adapter(
        "OLMo 2",
        ("olmo2",),
        **{**_LLAMA_PATHS, "ln1": None, "ln2": None},
        attn_out_norm="post_attention_layernorm",
        ffn_out_norm="post_feedforward_layernorm",
    ),
    # ModernBERT: a pre-LN encoder (layer 0's attn_norm is nn.Identity: the embeddings end in a LayerNorm), norms
    # without bias unless norm_bias; GeGLU from the fused Wi: ModernBertMLP does input, gate = Wi(x).chunk(2) and
    # act(input) * gate, so the activated half (kobattr's gate) is the first; symmetric local windows
    Adapter(
        "ModernBERT",
        ("modernbert",),
        layers="layers",
        attention="attn",
        out_proj="attn.Wo",
        ln1="attn_norm",
        ln2="mlp_norm",
        ffn_in="mlp.Wi[1/2]",
        ffn_gate="mlp.Wi[0/2]",
        ffn_out="mlp.Wo",
        placement="pre",
        activation_key="hidden_activation",
        radius=_modernbert_radius,
    ),
)
# The encoders of encoder-decoder models (their decoders: kobattr.models.seq2seq): run alone (``runs``), so
# kobattr.analyze attributes the encoder layers of a translation or summarisation model from its source text.
# Embedding scale (sqrt(d_model) with scale_embedding), positions and BART's / mBART's layernorm_embedding act
# before layer 0; M2M-100's and mBART's final encoder layer_norm acts after the last layer.
_SEQ2SEQ_ENCODER_PATHS = dict(
    layers="encoder.layers",
    attention="self_attn",
    out_proj="self_attn.out_proj",
    ln1="self_attn_layer_norm",
    ln2="final_layer_norm",
    ffn_in="fc1",
    ffn_out="fc2",
    activation_key="activation_function",
    runs="encoder",
)
ADAPTERS += (
    # post-LN; learned positions (BartLearnedPositionalEmbedding: max_position_embeddings rows after an offset of 2)
    Adapter("BART", ("bart",), **_SEQ2SEQ_ENCODER_PATHS, max_tokens=_learned_positions),
    # post-LN; fixed sinusoidal positions, a table of max_position_embeddings rows
    Adapter("Marian", ("marian",), **_SEQ2SEQ_ENCODER_PATHS, max_tokens=_learned_positions),
    # pre-LN (NLLB's dense models are M2M-100 too); sinusoidal positions counted from the first non-padding token and
    # grown on demand: no limit
    Adapter("M2M-100", ("m2m_100",), **_SEQ2SEQ_ENCODER_PATHS, placement="pre", max_tokens=_no_position_limit),
    # pre-LN; learned positions as BART's
    Adapter("mBART", ("mbart",), **_SEQ2SEQ_ENCODER_PATHS, placement="pre", max_tokens=_learned_positions),
)
SUPPORTED_FAMILIES = tuple(adapter.family for adapter in ADAPTERS)
_BY_MODEL_TYPE = {model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types}


# Families known to add biases to the attention logits, which a Layer (alpha from q, k, scale, softcap and a
# visibility mask) cannot describe.
ALIBI = "ALiBi position biases"
T5_BIAS = "T5's learned relative position biases"
_ADDITIVE_BIASES = {
    "bloom": ALIBI,
    "mpt": ALIBI,
    "falcon": ALIBI,  # only with config.alibi (see _additive_bias)
    "t5": T5_BIAS,
    "mt5": T5_BIAS,
    "umt5": T5_BIAS,
    "longt5": T5_BIAS,
    "switch_transformers": T5_BIAS,
    "pix2struct": T5_BIAS,
    "pop2piano": T5_BIAS,
    "udop": T5_BIAS,
}


def _additive_bias(config, model_type) -> Optional[str]:
    if model_type == "falcon" and not getattr(config, "alibi", False):
        return None
    return _ADDITIVE_BIASES.get(model_type)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a Hugging Face model, chosen by ``config.model_type``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        supported = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
        bias = _additive_bias(config, model_type)
        reason = (f": it adds {bias} to the attention logits, which kobattr does not support (its attention weights "
                  f"come from q, k and a visibility mask only)" if bias else "")
        raise UnsupportedModelError(
            f"kobattr cannot capture model_type {model_type!r} ({type(model).__name__}){reason}; supported families: {supported}."
        )
    return _BY_MODEL_TYPE[model_type]
