"""Building kobattr where nvcc is missing: the CPU extension is built, CUDA is reported unavailable.

One real `setup.py build_ext` into a temporary directory with nvcc hidden (KOBATTR_NVCC names a missing
file, CUDA_HOME/CUDA_PATH unset, PATH without CUDA), then the KOBATTR_BUILD_CUDA modes in-process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools import Distribution

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "csrc"))
import build_extensions  # noqa: E402


def env_without_nvcc(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "KOBATTR_BUILD_CUDA")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "cuda" not in p.lower())
    env["KOBATTR_NVCC"] = str(tmp_path / "no-such-nvcc")
    env.update(extra)
    return env


def test_build_without_nvcc_builds_cpu_and_reports_cuda_missing(tmp_path):
    lib, temp = tmp_path / "lib", tmp_path / "temp"
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp", str(temp)],
                          cwd=ROOT, env=env_without_nvcc(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list((lib / "kobattr").glob("_cpu*.so")), "kobattr._cpu was not built"
    assert not list((lib / "kobattr").glob("_cuda*"))
    report = json.loads((lib / "kobattr" / "_build_info.json").read_text())
    assert report["_cpu"]["built"] is True
    assert report["_cuda"]["built"] is False
    assert "nvcc was not found" in report["_cuda"]["reason"]
    # The record is what `kobattr info` shows through build_info.extension_report.
    probe = ("import json, kobattr.build_info as b; from pathlib import Path; "
             f"b.BUILD_INFO = Path({str(lib / 'kobattr' / '_build_info.json')!r}); print(json.dumps(b.extension_report()))")
    shown = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert shown["_cuda"]["built"] is False and "nvcc was not found" in shown["_cuda"]["reason"]


def cuda_command(tmp_path):
    extension = next(e for e in build_extensions.ext_modules() if e.name == "kobattr._cuda")
    command = build_extensions.BuildExt(Distribution({"name": "kobattr", "ext_modules": [extension]}))
    command.ensure_finalized()
    command.report = {}
    return command, extension


def test_cuda_mode_1_without_nvcc_fails_loudly(tmp_path, monkeypatch):
    for name, value in env_without_nvcc(tmp_path, KOBATTR_BUILD_CUDA="1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    command, extension = cuda_command(tmp_path)
    with pytest.raises(RuntimeError, match="KOBATTR_BUILD_CUDA=1 but kobattr._cuda cannot be built: nvcc was not found"):
        command.build_extension(extension)


def test_cuda_mode_0_skips_the_extension(monkeypatch):
    monkeypatch.setenv("KOBATTR_BUILD_CUDA", "0")
    assert [e.name for e in build_extensions.ext_modules()] == ["kobattr._cpu"]


def test_cuda_mode_auto_without_nvcc_records_the_reason(tmp_path, monkeypatch):
    for name, value in env_without_nvcc(tmp_path).items():
        monkeypatch.setenv(name, value)
    command, extension = cuda_command(tmp_path)
    command.build_extension(extension)
    assert command.report["_cuda"]["built"] is False
    assert "KOBATTR_NVCC=" in command.report["_cuda"]["reason"]


def test_bad_arch_list_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KOBATTR_CUDA_ARCHS", "80;hopper")
    with pytest.raises(ValueError, match="KOBATTR_CUDA_ARCHS must list SM versions"):
        build_extensions.cuda_archs()
