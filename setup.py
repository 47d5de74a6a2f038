"""Build modsplit._C: C++ CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

Metadata, dependencies and extras are in pyproject.toml; this file adds the extension and maps the
top-level triton_kernels/ folder to the subpackage modsplit.triton_kernels.

Environment:
  MODSPLIT_CUDA=1 forces the CUDA sources (fails if no toolkit), MODSPLIT_CUDA=0 skips them.
  CUDA_HOME points at the toolkit root (the folder whose lib64 holds libcudart); when unset it is
  searched among the usual places and nvcc's own folder.
  TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" when no GPU is visible.
  MODSPLIT_CPU_FLAGS replaces the default x86-64 SIMD flags (-mavx2 -mfma).
"""
import glob
import os
import platform
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_root():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        with open(nvcc, "rb") as f:  # wrapper scripts exec the real nvcc: read its path
            head = f.read(4096)
        for token in head.decode("utf-8", "ignore").split():
            if token.endswith("/bin/nvcc"):
                candidates.append(os.path.dirname(os.path.dirname(token)))
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and glob.glob(os.path.join(root, "lib64", "libcudart.so*")):
            return root
    return None


_requested = os.environ.get("MODSPLIT_CUDA", "").strip()
_root = _cuda_root()
if _root and _requested != "0":
    os.environ["CUDA_HOME"] = _root  # must be set before cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    if _requested == "0":
        return False
    available = torch.version.cuda is not None and _root is not None
    if _requested == "1":
        if not available:
            raise RuntimeError(
                "MODSPLIT_CUDA=1 but no CUDA build is possible: "
                f"torch.version.cuda={torch.version.cuda}, CUDA toolkit root={_root} "
                "(set CUDA_HOME to the folder whose lib64 holds libcudart)")
        return True
    return available


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        cxx += os.environ.get("MODSPLIT_CPU_FLAGS", "-mavx2 -mfma").split()
    link = ["-fopenmp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if _want_cuda() and cuda_sources:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension("modsplit._C", sources + cuda_sources,
                             extra_compile_args={"cxx": cxx + ["-DMODSPLIT_WITH_CUDA"], "nvcc": nvcc},
                             extra_link_args=link)
    return CppExtension("modsplit._C", sources, extra_compile_args={"cxx": cxx},
                        extra_link_args=link)


setup(
    packages=find_packages(include=["modsplit", "modsplit.*"]) + ["modsplit.triton_kernels"],
    package_dir={"modsplit.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
