"""csrc/cuda compiles with nvcc for sm_80 and sm_90, and kobattr._cuda builds and checks its tensors.

No GPU needed; skipped only where nvcc is absent. The kernels (csrc/cuda/attention_pairs.cu) include no
torch header and are compiled by nvcc alone; the binding (csrc/cuda/bindings.cpp) is compiled against
torch by the host compiler, so the last test builds the whole extension the way an install does.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc"))
from build_extensions import CSRC, CUDA_SOURCE, find_nvcc, nvcc_compile_command  # noqa: E402

NVCC, _ = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (KOBATTR_NVCC, CUDA_HOME/bin, PATH)")
WARNINGS_AS_ERRORS = ["-Werror", "all-warnings"]


@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernels_compile_to_a_cubin(arch, tmp_path):
    cubin = tmp_path / f"attention_pairs.sm_{arch}.cubin"
    command = [NVCC, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", f"-I{CSRC}", CUDA_SOURCE, "-o", str(cubin),
               *WARNINGS_AS_ERRORS]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert cubin.read_bytes()[:4] == b"\x7fELF"


def test_the_install_command_builds_an_object(tmp_path):
    obj = tmp_path / "attention_pairs.o"
    command = nvcc_compile_command(NVCC, CUDA_SOURCE, str(obj), ["80", "90"], extra=WARNINGS_AS_ERRORS)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert obj.stat().st_size > 0


CHECK_BUILT_MODULE = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("kobattr._cuda", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
q = torch.zeros(1, 2, 3, 4)
try:
    module.attention_maps(q=q, k=q, valid=torch.ones(1, 3, dtype=torch.bool), grams=torch.zeros(1, 3, 1, 3, 3),
                          row_scale=torch.ones(1, 3, 1), rows=None, weights=None, out=torch.empty(1, 1, 3, 3),
                          alpha=None, causal=False, window=0, radius=0, scale=1.0, softcap=0.0, normalize_rows=False,
                          stream=0)
except ValueError as error:
    print(module.device_type, error)
try:
    module.row_lse(q=q, k=q, valid=torch.ones(1, 3, dtype=torch.bool), lse=torch.empty(1, 2, 3), causal=False,
                   window=0, radius=0, scale=1.0, softcap=0.0, stream=0)
except ValueError as error:
    print(error)
"""


def test_the_extension_builds_and_checks_tensors_before_any_launch(tmp_path):
    """KOBATTR_BUILD_CUDA=1 (a failure is an error) builds kobattr._cuda; it imports without a GPU and
    rejects CPU tensors with a sentence, before touching the CUDA runtime."""
    lib, temp = tmp_path / "lib", tmp_path / "temp"
    env = dict(os.environ, KOBATTR_BUILD_CUDA="1", KOBATTR_NVCC=NVCC)
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp",
                           str(temp)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((lib / "kobattr" / "_build_info.json").read_text())
    assert report["_cuda"]["built"] is True and report["_cuda"]["archs"] == ["sm_80", "sm_90"]
    built = next((lib / "kobattr").glob("_cuda*.so"))
    shown = subprocess.run([sys.executable, "-c", CHECK_BUILT_MODULE, str(built)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("cuda attention_maps: this extension runs on cuda tensors, but q is a contiguous "
                                   "float32 tensor of shape [1, 2, 3, 4] on cpu."), shown.stdout
    assert ("\nrow_lse: this extension runs on cuda tensors, but q is a contiguous float32 tensor of shape "
            "[1, 2, 3, 4] on cpu.") in shown.stdout, shown.stdout
