"""No tensor of N * N * D elements (or more) may exist while the torch backend runs."""

import torch
from random_layers import random_layer
from torch.utils._python_dispatch import TorchDispatchMode

from kobattr.core import attribute
from kobattr.reference import reference


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def test_no_tensor_reaches_n_n_d():
    N, D = 257, 64
    layer = random_layer("bert", N=N, B=1, D=D, F=128, dtype=torch.float32)
    with LargestTensor() as probe:
        attribute(layer, methods="all", heads=True, backend="torch")
    assert probe.largest < N * N * D / 4, f"{probe.op} made a tensor of {probe.largest} elements"


def test_gqa_pre_ln_stays_small_too():
    N, D = 257, 64
    layer = random_layer("llama", N=N, B=1, D=D, F=128, dtype=torch.float32)
    with LargestTensor() as probe:
        attribute(layer, methods="all", backend="torch")
    assert probe.largest < N * N * D / 4, f"{probe.op} made a tensor of {probe.largest} elements"


def test_the_probe_sees_the_reference_materialise():
    N, D = 33, 16
    layer = random_layer("bert", N=N, B=1, D=D, F=32, dtype=torch.float32)
    with LargestTensor() as probe:
        reference(layer, methods=["attnresln_n"])
    assert probe.largest >= N * N * D
