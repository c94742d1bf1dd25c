"""kobattr: token-wise attribution analysis of transformers without N x N x d tensors.

    import kobattr
    result = kobattr.analyze(model, "some text", tokenizer=tokenizer, methods=["attnresln_n"])
    result.maps["attnresln_n"]   # (layer, batch, query, key)

``kobattr.attribute(layer)`` works on one per-layer description (kobattr.Layer) without a model.
"""

__version__ = "0.1.0"

_LAZY = {
    "analyze": "kobattr.api",
    "attribute": "kobattr.core",
    "LayerAttribution": "kobattr.core",
    "Attribution": "kobattr.result",
    "Seq2SeqAttribution": "kobattr.result",
    "Layer": "kobattr.layer",
    "Norm": "kobattr.layer",
    "FeedForward": "kobattr.layer",
    "LayerInputError": "kobattr.layer",
    "BackendUnavailable": "kobattr.backends.base",
    "VerificationError": "kobattr.verify",
    "REGISTRY": "kobattr.methods",
    "attribute_decoder": "kobattr.seq2seq",
    "attribute_cross": "kobattr.seq2seq",
    "cross_reference": "kobattr.seq2seq",
    "DecoderLayer": "kobattr.seq2seq",
    "CrossAttention": "kobattr.seq2seq",
    "CROSS_METHODS": "kobattr.seq2seq",
    "capture_decoder": "kobattr.models.seq2seq",
    "head_statistics": "kobattr.analyses.heads",
    "read_conllu": "kobattr.analyses.heads",
}
__all__ = list(_LAZY)


def __getattr__(name):  # imports on first use: transformers is slow to import and not always needed
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kobattr' has no attribute {name!r}")
