import os

import torch

# Triton runs its kernels through the interpreter only where there is no GPU (the GPU tests need the real one).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
