"""The CUDA build of modsplit._C: every op in the schema has a CUDA kernel when CUDA was built.

These tests read what the installed extension registered; they never start an nvcc build of their
own (CI builds once, with `pip install --no-build-isolation -e .`). The numerical CUDA tests are
the op tests themselves, run on "cuda" by the `device` fixture wherever a GPU is visible.
"""
import glob
import os
import shutil

import pytest
import torch

import modsplit  # noqa: F401  (registers the ops)
from modsplit.ops.schemas import CPU_ONLY, SCHEMAS

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _schema_ops():
    """Op names defined in modsplit/ops/schemas.py."""
    return list(SCHEMAS)


def _cuda_toolkit():
    """A CUDA toolkit root (with libcudart) as setup.py would find it, or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in roots:
        if root and glob.glob(os.path.join(root, "lib64", "libcudart.so*")):
            return root
    return None


def _has_cuda_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"modsplit::{op}", "CUDA")


def _cuda_build_expected():
    return (torch.version.cuda is not None and os.environ.get("MODSPLIT_CUDA", "").strip() != "0"
            and _cuda_toolkit() is not None and bool(glob.glob(os.path.join(_REPO, "csrc", "cuda", "*.cu"))))


def test_schema_lists_every_op():
    ops = _schema_ops()
    assert len(ops) == 31, ops
    assert set(CPU_ONLY) <= set(ops)
    assert all(hasattr(torch.ops.modsplit, op) for op in ops)


def test_every_op_has_a_cpu_kernel():
    missing = [op for op in _schema_ops()
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"modsplit::{op}", "CPU")]
    assert not missing, f"ops without a CPU kernel: {missing}"


def test_every_op_has_a_cuda_kernel():
    ops = [op for op in _schema_ops() if op not in CPU_ONLY]
    registered = [op for op in ops if _has_cuda_kernel(op)]
    if not registered:
        if _cuda_build_expected():
            pytest.fail(f"a CUDA toolkit ({_cuda_toolkit()}) and a CUDA torch ({torch.version.cuda}) "
                        "are present but modsplit._C registered no CUDA kernel: the CUDA sources "
                        "were not built (rebuild, or MODSPLIT_CUDA=1 to make a failure loud)")
        pytest.skip(f"modsplit._C was built without CUDA (torch.version.cuda={torch.version.cuda}, "
                    f"toolkit={_cuda_toolkit()}, MODSPLIT_CUDA={os.environ.get('MODSPLIT_CUDA')})")
    missing = sorted(set(ops) - set(registered))
    assert not missing, f"ops without a CUDA kernel: {missing}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_runs_on_the_device():
    """Smoke test of the dispatch to CUDA (the op tests cover the numbers)."""
    if not _has_cuda_kernel("masked_linear"):
        pytest.skip("modsplit._C was built without CUDA")
    x = torch.randn(3, 40, device="cuda")
    w = torch.randn(5, 40, device="cuda")
    packed = torch.ops.modsplit.topk_mask(w, 0.5)
    assert packed.device.type == "cuda" and packed.shape == (5, 2)
    y = torch.ops.modsplit.masked_linear(x, w, packed, None)
    mask = torch.ops.modsplit.unpack_mask(packed, [5, 40])
    torch.testing.assert_close(y, x @ (w * mask).T, rtol=1e-4, atol=1e-4)
