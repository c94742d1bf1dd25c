"""csrc/cuda compiles with nvcc for sm_80 and sm_90 (no GPU needed; skipped only where nvcc is absent)."""

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
