"""Loads the compiled extension modsplit._C, whose import registers the C++/CUDA kernels of the
torch.ops.modsplit ops (their schemas are in modsplit.ops.schemas).

A missing or broken extension is not an import error: the library then runs on the pure-PyTorch
"torch" backend (modsplit.backend), and LOAD_ERROR says why the kernels are absent.
"""
import torch

LOAD_ERROR = None  # None when _C is loaded, else the message of its ImportError
try:
    from modsplit import _C  # noqa: F401
except ImportError as exc:
    LOAD_ERROR = (f"modsplit's compiled extension modsplit._C is missing or failed to load ({exc}); "
                  "build it with `pip install --no-build-isolation -e .` (or `python setup.py "
                  "build_ext --inplace`) from the repository root")


# Device types with compiled kernels, read once at import (so torch.compile traces a dict lookup).
KERNELS = {} if LOAD_ERROR is not None else {
    device_type: torch._C._dispatch_has_kernel_for_dispatch_key("modsplit::masked_linear", key)
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def has_kernels(device_type: str) -> bool:
    """Whether the compiled extension registered kernels of the modsplit ops for `device_type`
    ("cpu", "cuda", ...)."""
    return KERNELS.get(device_type, False)
