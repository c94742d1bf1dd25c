"""The Gram preparation (kobattr.core _Prepared.grams) in key blocks of gram_keys: the same maps whatever the
block, against the float64 reference, and few blocks on a GPU."""

import pytest
import torch

from kobattr import core
from kobattr.backends.torch_backend import CUDA_PARTS_SHARE
from kobattr.reference import reference
from kobattr.testing import random_layer
from kobattr.verify import row_errors

METHODS = ["attn_n", "attnres_n", "attnresln_n"]


@pytest.mark.parametrize("kind", ["bert", "llama"])  # post-LN; pre-norm with GQA (KV heads repeated per block)
def test_maps_are_the_same_for_every_key_block(kind, monkeypatch):
    layer = random_layer(kind, N=13, B=2, pad=3, dtype=torch.float64)
    ref = reference(layer, methods=METHODS)["maps"]
    results = []
    for keys in (1, 5, 13):  # one key per block (a loop of 13), blocks crossing N, one block of every key
        monkeypatch.setattr(core, "gram_keys", lambda *args, keys=keys: keys)
        results.append(core.attribute(layer, methods=METHODS, backend="torch", verify=0).maps)
    for m in METHODS:
        assert row_errors(results[-1][m], ref[m]).max() <= 1e-10
        for other in results[:-1]:
            torch.testing.assert_close(other[m], results[-1][m], rtol=1e-13, atol=0)


def test_a_gpu_takes_the_keys_of_a_long_input_in_a_few_blocks(monkeypatch):
    """Llama-7B (H = 32, D = 4096) at N = 16k with 40 GB free: 4 blocks of batched GEMMs (not 529), each holding at most
    CUDA_PARTS_SHARE of the free memory in its three (B, C, H + 1, D) float32 temporaries; the CPU keeps blocks
    of 2^22 elements of head rows (31 keys here)."""
    free = 40 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    keys = core.gram_keys(torch.device("cuda"), 1, 32, 4096, 4)
    assert -(-16384 // keys) == 4
    assert 3 * keys * 33 * 4096 * 4 <= CUDA_PARTS_SHARE * free
    cpu = core.gram_keys(torch.device("cpu"), 1, 32, 4096, 4)
    assert cpu == 31 and cpu * 33 * 4096 <= core.GRAM_BLOCK
