"""GPU tests (``pytest -m gpu``): every implementation on CUDA tensors against the reference, with the spot
checks' tolerance table (kobattr.verify.TOLERANCES), and a model analysed on the GPU as on the CPU.
Skipped without a CUDA device; benchmarks/gpu_check.sh runs them."""

import pytest
import torch

from kobattr import selftest
from kobattr.backends import availability

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_implementation_against_the_reference(dtype):
    report = selftest.run(device="cuda", dtypes=(getattr(torch, dtype),))
    assert not report.failed, report.table()
    ran = {(o.implementation, o.primitive) for o in report.outcomes if o.skipped is None}
    assert {("triton", "attention_maps"), ("triton", "ff_maps"), ("torch", "attention_maps"), ("torch", "ff_maps")} <= ran
    if availability()["cuda"] is None:
        assert ("cuda", "attention_maps") in ran
    assert ("triton_gemm", "ff_maps") in ran
    structures = {o.case.split("/")[0] for o in report.outcomes if o.implementation == "triton" and o.skipped is None}
    assert structures == {"post", "pre", "sandwich", "post_only", "parallel"}


def test_a_model_analysed_on_the_gpu_equals_the_cpu_run():
    from test_models import N_TOKENS, tiny_model, token_batch

    import kobattr

    model = tiny_model("llama")
    batch = token_batch("llama", [N_TOKENS, 5], "left")
    on_cpu = kobattr.analyze(model, batch, methods="all", backend="torch")
    on_gpu = kobattr.analyze(model.cuda(), {k: v.cuda() for k, v in batch.items()}, methods="all")
    assert any(p == "triton" for layer in on_gpu.backends for p in layer.values())
    for m in on_cpu.methods:
        torch.testing.assert_close(on_gpu.maps[m].cpu(), on_cpu.maps[m], rtol=1e-4, atol=1e-5)
