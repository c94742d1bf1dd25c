"""pytest-benchmark suite: each available backend vs the materialising reference on the same input.

    pytest benchmarks/test_bench.py --benchmark-group-by=param:method,param:N --benchmark-columns=mean,stddev,rounds

Each group holds the reference and every backend for one (method, N), so the table's ratio column
compares them directly. Not part of the CI test command: speed is measured, never asserted.
"""

import pytest
import torch
from run import build_layer

from kobattr.backends import AUTO_ORDER, availability
from kobattr.core import attribute
from kobattr.reference import reference

USABLE = [b for b in AUTO_ORDER["cuda" if torch.cuda.is_available() else "cpu"] if availability()[b] is None]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=[128, 256])
def layer(request):
    return request.param, build_layer(request.param, DEVICE)


@pytest.mark.parametrize("method", ["attnresln_n", "atbffresln"])
@pytest.mark.parametrize("impl", ["reference", "sdpa"] + USABLE)
def test_attribution_speed(benchmark, layer, impl, method):
    """Each group also holds torch SDPA forward of the same q, k, v: the attention side's speed of light."""
    N, built = layer
    benchmark.extra_info.update(N=N, method=method, impl=impl)
    if impl == "sdpa":
        benchmark(torch.nn.functional.scaled_dot_product_attention, built.q, built.k, built.v)
    elif impl == "reference":
        benchmark.pedantic(reference, args=(built, [method]), kwargs=dict(dtype=torch.float32), rounds=2)
    else:
        benchmark.pedantic(attribute, args=(built,), kwargs=dict(methods=[method], backend=impl, verify=0), rounds=2)


def test_sgemm_rate(benchmark):
    """This machine's sgemm rate (a 2048^3 fp32 matmul), the FF side's anchor: the FF scopes do
    N^2 (2 d_ff d + 2 (H+1) d_ff) useful flops per layer."""
    a = torch.randn(2048, 2048, device=DEVICE)
    benchmark(torch.matmul, a, a)
    benchmark.extra_info["gflops"] = 2 * 2048 ** 3 / benchmark.stats.stats.mean / 1e9
