"""kobattr: token-wise attribution analysis of transformers without N x N x d tensors."""

__version__ = "0.1.0"
