"""Capture kobattr Layers from Hugging Face transformers models (the families in adapters.ADAPTERS: BERT, RoBERTa,
XLM-RoBERTa, ELECTRA, DistilBERT, GPT-2, Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, GPT-NeoX / Pythia, Gemma 2,
Gemma 3, OLMo 2, ModernBERT, and the encoders of BART, Marian, M2M-100 and mBART); the decoders of encoder-decoder
models through capture_decoder (kobattr.models.seq2seq)."""

from .adapters import SUPPORTED_FAMILIES, Adapter, UnsupportedModelError, get_adapter
from .recording import CaptureError, capture, residual_stream
from .default import default_model_path, load_default_model
from .seq2seq import SEQ2SEQ_FAMILIES, capture_decoder, get_decoder_adapter

__all__ = [
    "Adapter",
    "CaptureError",
    "SEQ2SEQ_FAMILIES",
    "SUPPORTED_FAMILIES",
    "UnsupportedModelError",
    "capture",
    "capture_decoder",
    "default_model_path",
    "get_adapter",
    "get_decoder_adapter",
    "load_default_model",
    "residual_stream",
]
