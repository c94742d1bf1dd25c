"""How setup.py builds csrc/ into kobattr._cpu and kobattr._cuda.

kobattr._cpu  csrc/bindings.cpp + csrc/cpu/*.cpp, built on every install with the system C++ compiler,
              with OpenMP where the compiler takes -fopenmp (single-threaded otherwise); the kernel is
              compiled for the x86-64 baseline, AVX2 and AVX-512 and picks the widest at run time.
kobattr._cuda csrc/cuda/attention_pairs.cu (compiled by nvcc, no torch headers) + csrc/cuda/bindings.cpp
              (by the C++ compiler), linked with the static CUDA runtime.
              KOBATTR_BUILD_CUDA=auto (default): built where nvcc is found, and any failure is a
              warning; =1: a missing nvcc or a failed build fails the install; =0: skipped.
              KOBATTR_CUDA_ARCHS (default "80;90") lists the SM versions; the last one is also
              embedded as PTX so that newer GPUs can JIT it. KOBATTR_NVCC names nvcc explicitly
              (otherwise CUDA_HOME/bin, PATH, /usr/local/cuda/bin).

Both bindings take at::Tensor (csrc/tensor_args.h checks them), so they compile against the torch of the
build environment, with its bundled pybind11, and link the libraries every torch build has (c10, torch,
torch_cpu, torch_python; no CUDA library of torch, so a CPU torch builds kobattr._cuda too). pyproject.toml
pins that torch to the minor version setup.py requires at run time: the C++ ABI changes between minors.
A build where torch cannot be imported records why and skips both, like any other failure.

What was built, for which archs, and why something was not, is written to kobattr/_build_info.json
(read by kobattr/build_info.py for `kobattr info`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from setuptools import Extension
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
DEFAULT_CUDA_ARCHS = "80;90"
SHARED_HEADERS = [f"{CSRC}/attention_pairs_args.h", f"{CSRC}/pair_rules.h", f"{CSRC}/tensor_args.h"]
CPU_HEADERS = SHARED_HEADERS + [f"{CSRC}/cpu/attention_pairs.h", f"{CSRC}/cpu/attention_pairs_kernel.h"]
# the kernel (attention_pairs_kernel.h) for the x86-64 baseline with the dispatch, then for AVX2 and AVX-512
CPU_SOURCES = [f"{CSRC}/cpu/attention_pairs.cpp", f"{CSRC}/cpu/attention_pairs_x86_64_v3.cpp",
               f"{CSRC}/cpu/attention_pairs_x86_64_v4.cpp"]
CUDA_SOURCE = f"{CSRC}/cuda/attention_pairs.cu"
CUDA_BINDINGS = f"{CSRC}/cuda/bindings.cpp"
CUDA_HEADERS = SHARED_HEADERS + [f"{CSRC}/cuda/attention_pairs.h"]
HOST_FLAGS = ["-O3", "-fvisibility=hidden"]


def ext_modules() -> list[Extension]:
    extensions = [
        Extension("kobattr._cpu", sources=[f"{CSRC}/bindings.cpp", *CPU_SOURCES],
                  include_dirs=[CSRC], depends=CPU_HEADERS, language="c++", optional=True),
    ]
    if _cuda_mode() != "0":
        extensions.append(Extension("kobattr._cuda", sources=[CUDA_BINDINGS], include_dirs=[CSRC],
                                    depends=CUDA_HEADERS + [CUDA_SOURCE], language="c++", optional=True))
    return extensions


def _cuda_mode() -> str:
    mode = os.environ.get("KOBATTR_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise ValueError(f"KOBATTR_BUILD_CUDA must be auto, 1 or 0, got {mode!r}.")
    return mode


def find_nvcc() -> tuple[str | None, str]:
    """(path to nvcc or None, where it was looked for)."""
    explicit = os.environ.get("KOBATTR_NVCC")
    if explicit:
        found = shutil.which(explicit)
        return found, f"KOBATTR_NVCC={explicit}"
    candidates = [Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append(shutil.which("nvcc"))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate), "CUDA_HOME/bin, CUDA_PATH/bin, PATH, /usr/local/cuda/bin"
    return None, "CUDA_HOME/bin, CUDA_PATH/bin, PATH, /usr/local/cuda/bin"


def cuda_archs() -> list[str]:
    archs = [a.strip().replace("sm_", "").replace(".", "")
             for a in re.split(r"[;, ]+", os.environ.get("KOBATTR_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)) if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"KOBATTR_CUDA_ARCHS must list SM versions such as '80;90', got "
                         f"{os.environ.get('KOBATTR_CUDA_ARCHS')!r}.")
    return archs


def nvcc_compile_command(nvcc: str, source: str, output: str, archs: list[str], extra: list[str] = ()) -> list[str]:
    """The nvcc command that compiles ``source`` for the SM versions ``archs`` (also used by the tests)."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return [nvcc, "-c", source, "-o", output, "-O3", "-std=c++17", f"-I{CSRC}", "-Xcompiler", "-fPIC",
            "-Xcompiler", "-fvisibility=hidden", *gencode, *extra]


def torch_build_settings() -> dict:
    """include_dirs, library_dirs, libraries and extra_compile_args of a binding that takes at::Tensor,
    from the torch of this interpreter (ImportError without one; also used by the tests)."""
    import torch
    from torch.utils import cpp_extension

    return dict(include_dirs=cpp_extension.include_paths(), library_dirs=cpp_extension.library_paths(),
                libraries=["c10", "torch", "torch_cpu", "torch_python"],
                extra_compile_args=["-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"])


def _cuda_library_dirs(nvcc: str) -> list[str]:
    """Where nvcc itself links libcudart_static from (its -L directories, read off a dry run)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.cu"
        probe.write_text("int main() { return 0; }\n")
        dry = subprocess.run([nvcc, "-dryrun", str(probe), "-o", str(Path(tmp) / "probe")],
                             capture_output=True, text=True)
    dirs = re.findall(r'-L"?([^"\s]+)"?', dry.stdout + dry.stderr)
    return [d for d in dict.fromkeys(dirs) if not d.endswith("stubs")]


class BuildExt(build_ext):
    def build_extensions(self):
        self.report: dict[str, dict] = {}
        super().build_extensions()
        self._write_report()

    def build_extension(self, ext):
        try:
            torch_settings = torch_build_settings()
        except ImportError as error:
            reason = f"torch cannot be imported at build time ({error}); its headers are needed"
            if ext.name == "kobattr._cuda":
                self._cuda_not_built(_cuda_mode(), reason, error=error)
            else:
                warnings.warn(f"kobattr: skipping {ext.name}: {reason}")
                self.report[ext.name.split(".")[-1]] = {"built": False, "reason": reason}
            return
        for key, values in torch_settings.items():
            getattr(ext, key).extend(values)
        import torch

        self.torch_version = torch.__version__
        if ext.name == "kobattr._cpu":
            self._build_cpu(ext)
        elif ext.name == "kobattr._cuda":
            self._build_cuda(ext)
        else:
            super().build_extension(ext)

    def _build_cpu(self, ext):
        # -Wno-psabi: the vector types pass through always-inline helpers only, never across an ABI.
        flags = [*HOST_FLAGS, "-fno-math-errno", "-Wno-psabi"]
        openmp = self._compiler_supports_openmp()
        if openmp:
            flags.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        ext.extra_compile_args.extend(flags)
        try:
            super().build_extension(ext)
        except Exception as error:
            warnings.warn(f"kobattr: building the C++ CPU extension kobattr._cpu failed ({error}); the 'cpu' "
                          "backend will be unavailable and kobattr falls back to the torch backend.")
            self.report["_cpu"] = {"built": False, "openmp": openmp, "reason": f"compilation failed: {error}"}
            return
        self.report["_cpu"] = {"built": True, "openmp": openmp, "compiler": self.compiler.compiler_type,
                               "torch": self.torch_version,
                               "reason": None if openmp else "built without OpenMP: the compiler rejects -fopenmp"}

    def _compiler_supports_openmp(self) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "openmp_probe.cpp"
            probe.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
            try:
                objects = self.compiler.compile([str(probe)], output_dir=tmp, extra_postargs=["-fopenmp"])
                self.compiler.link_executable(objects, "openmp_probe", output_dir=tmp, extra_postargs=["-fopenmp"])
            except Exception:  # noqa: BLE001 - any failure means: build without OpenMP
                return False
        return True

    def _build_cuda(self, ext):
        mode = _cuda_mode()
        nvcc, looked = find_nvcc()
        if nvcc is None:
            self._cuda_not_built(mode, f"nvcc was not found (looked in {looked})", error=None)
            return
        try:
            archs = cuda_archs()
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
            release = re.search(r"release ([\d.]+)", version)
            obj = Path(self.build_temp) / "cuda" / "attention_pairs.o"
            obj.parent.mkdir(parents=True, exist_ok=True)
            compiled = subprocess.run(nvcc_compile_command(nvcc, CUDA_SOURCE, str(obj), archs),
                                      capture_output=True, text=True)
            if compiled.returncode != 0:
                raise RuntimeError(f"nvcc failed on {CUDA_SOURCE}:\n{compiled.stderr.strip()}")
            ext.extra_objects.append(str(obj))
            ext.library_dirs.extend(_cuda_library_dirs(nvcc))
            ext.libraries.extend(["cudart_static", "rt", "pthread", "dl"])
            ext.extra_compile_args.extend(HOST_FLAGS)
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - any failure is a warning on auto
            self._cuda_not_built(mode, f"the CUDA build failed: {error}", error=error)
            return
        self.report["_cuda"] = {"built": True, "archs": [f"sm_{a}" for a in archs], "ptx": f"compute_{archs[-1]}",
                                "nvcc": nvcc, "cuda_version": release.group(1) if release else None,
                                "torch": self.torch_version, "reason": None}

    def _cuda_not_built(self, mode: str, reason: str, error: Exception | None):
        if mode == "1":
            raise RuntimeError(f"KOBATTR_BUILD_CUDA=1 but kobattr._cuda cannot be built: {reason}") from error
        if error is not None:
            warnings.warn(f"kobattr: skipping the CUDA extension kobattr._cuda: {reason}")
        self.report["_cuda"] = {"built": False, "archs": [], "reason": reason}

    def _report_path(self) -> Path:
        return Path(self.build_lib) / "kobattr" / "_build_info.json"

    def _write_report(self):
        if _cuda_mode() == "0":
            self.report["_cuda"] = {"built": False, "archs": [], "reason": "skipped: KOBATTR_BUILD_CUDA=0"}
        path = self._report_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report, indent=2) + "\n")

    def copy_extensions_to_source(self):
        # --inplace and editable installs: the build record goes next to the extensions it describes.
        super().copy_extensions_to_source()
        package_dir = self.get_finalized_command("build_py").get_package_dir("kobattr")
        self.copy_file(str(self._report_path()), os.path.join(package_dir, "_build_info.json"), level=self.verbose)
