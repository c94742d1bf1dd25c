"""Capture kobattr Layers from Hugging Face transformers models (the families in adapters.ADAPTERS: BERT, RoBERTa,
XLM-RoBERTa, ELECTRA, DistilBERT, GPT-2, Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, GPT-NeoX / Pythia, Gemma 2,
Gemma 3, OLMo 2, ModernBERT)."""

from .adapters import SUPPORTED_FAMILIES, Adapter, UnsupportedModelError, get_adapter
from .recording import CaptureError, capture, residual_stream
from .default import default_model_path, load_default_model

__all__ = [
    "Adapter",
    "CaptureError",
    "SUPPORTED_FAMILIES",
    "UnsupportedModelError",
    "capture",
    "default_model_path",
    "get_adapter",
    "load_default_model",
    "residual_stream",
]
