import os
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ (installed as kobattr.kernels) would
# shadow Hugging Face's `kernels` package that transformers >= 5.25 imports: test the installed kobattr instead.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import torch  # noqa: E402

# Triton runs its kernels through the interpreter only where there is no GPU (the GPU tests need the real one).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The on-device tuner stays off in the tests whatever the shell says (tests/test_tuner.py turns it on in a
# temporary cache), so that dispatch follows its static rule and nothing is measured unasked.
os.environ["KOBATTR_TUNE"] = "0"
