"""Backend selection: which implementation the modsplit.ops wrappers and modsplit.functional call.

Backends:
  "auto"   (default) the torch.ops.modsplit op of the tensor's device: C++ on CPU, CUDA on CUDA;
           on a device the compiled extension has no kernels for (MPS, XPU, CUDA on a build
           without CUDA kernels, any device when modsplit._C is missing) the "torch" backend,
           with one warning.
  "cpu"    the C++ CPU kernels (torch.ops.modsplit); tensors must be on the CPU.
  "cuda"   the CUDA kernels (torch.ops.modsplit); tensors must be on a CUDA device.
  "torch"  pure-PyTorch composites on any device (modsplit.torch_backend).
  "triton" the Triton kernels (torch.ops.modsplit_triton, package modsplit.triton_kernels, whose
           source is the repository's top-level triton_kernels/ folder) for CUDA tensors, and for
           CPU tensors only when the kernels run under the Triton interpreter (TRITON_INTERPRET=1
           set before the package is first imported).

The choice is, in order: set_backend(name) / the use(name) context manager, else the environment
variable MODSPLIT_BACKEND, else "auto". The op namespaces (and the torch backend's module) have
the same op names and signatures, so callers write ``ops_for(x).masked_linear(...)``.
"""
import contextlib
import importlib
import importlib.util
import os
import sys
import warnings

import torch

from modsplit import _extension, torch_backend
from modsplit.errors import BackendError

BACKENDS = ("auto", "cpu", "cuda", "torch", "triton")
ENV_VAR = "MODSPLIT_BACKEND"
TRITON_PACKAGE = "modsplit.triton_kernels"
_TRITON_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "triton_kernels")
_warned = set()  # device types "auto" already warned about
_triton = None  # modsplit.triton_kernels once loaded (a global, so torch.compile traces no import)

_selected = None  # set by set_backend; None = environment variable or "auto"


def _check(name, source):
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"modsplit: unknown backend {name!r} (from {source}); choose one of "
                         f"{', '.join(BACKENDS)}")
    return name.lower()


def set_backend(name):
    """Select the backend for all later op calls; None returns to $MODSPLIT_BACKEND or "auto"."""
    global _selected
    _selected = None if name is None else _check(name, "set_backend")


def get_backend() -> str:
    """The backend in force: set_backend's choice, else $MODSPLIT_BACKEND, else "auto"."""
    if _selected is not None:
        return _selected
    env = os.environ.get(ENV_VAR, "").strip()
    return _check(env, f"${ENV_VAR}") if env else "auto"


@contextlib.contextmanager
def use(name):
    """Run a block with another backend, restoring the previous choice after it."""
    global _selected
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        _selected = previous


def _import_triton_package():
    """modsplit.triton_kernels. In a source checkout (setup.py beside the package) it is loaded
    from the checkout's top-level triton_kernels/ folder, whatever is installed elsewhere;
    otherwise it is the installed subpackage (setup.py's package_dir maps that folder to it)."""
    if TRITON_PACKAGE in sys.modules:
        return sys.modules[TRITON_PACKAGE]
    checkout = os.path.dirname(_TRITON_SOURCE)
    if not (os.path.isfile(os.path.join(checkout, "setup.py"))
            and os.path.isfile(os.path.join(_TRITON_SOURCE, "__init__.py"))):
        return importlib.import_module(TRITON_PACKAGE)
    spec = importlib.util.spec_from_file_location(
        TRITON_PACKAGE, os.path.join(_TRITON_SOURCE, "__init__.py"),
        submodule_search_locations=[_TRITON_SOURCE])
    module = importlib.util.module_from_spec(spec)
    sys.modules[TRITON_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(TRITON_PACKAGE, None)
        raise
    return module


def load_triton(interpret=None):
    """Imports modsplit.triton_kernels, which registers torch.ops.modsplit_triton, and returns it.

    interpret=True builds the kernels for the Triton interpreter (CPU tensors) and False for a GPU,
    setting TRITON_INTERPRET only during the import; None follows the environment. The choice is
    fixed by the first import: a later call asking for the other one raises a RuntimeError.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    if interpret is not None:
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        triton_kernels = _import_triton_package()
    except ImportError as exc:
        raise BackendError(f"modsplit: backend 'triton' needs the triton package ({exc})") from exc
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    global _triton
    _triton = triton_kernels
    if interpret is not None and triton_kernels.INTERPRET != interpret:
        raise BackendError("modsplit: triton_kernels was already imported with TRITON_INTERPRET="
                           f"{int(triton_kernels.INTERPRET)}")
    return triton_kernels


def _triton_ops(device: torch.device):
    triton_kernels = _triton if _triton is not None else load_triton()
    if device.type == "cuda" and not triton_kernels.INTERPRET:
        return torch.ops.modsplit_triton
    if device.type == "cpu" and triton_kernels.INTERPRET:
        return torch.ops.modsplit_triton
    if device.type == "cuda":
        raise BackendError("modsplit: backend 'triton' cannot run CUDA tensors while the Triton "
                           "kernels were built for the interpreter (TRITON_INTERPRET=1)")
    raise BackendError(f"modsplit: backend 'triton' cannot run {device.type} tensors: Triton "
                       "needs a CUDA device, or TRITON_INTERPRET=1 (set before triton_kernels is "
                       "imported) to interpret the kernels on the CPU")


def _auto_ops(device: torch.device):
    """The compiled kernels of the device, else the torch backend (warning once per device)."""
    if _extension.has_kernels(device.type):
        return torch.ops.modsplit
    if device.type not in _warned:
        _warned.add(device.type)
        why = (_extension.LOAD_ERROR if _extension.LOAD_ERROR is not None else
               f"this build of modsplit._C has no {device.type} kernels")
        warnings.warn(f"modsplit: {why}; running the pure-PyTorch 'torch' backend on "
                      f"{device.type} (set_backend('torch') silences this)", stacklevel=3)
    return torch_backend


_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)


def uses_cpu_kernel(tensor: torch.Tensor) -> bool:
    """Whether an op whose compiled kernel runs on the CPU only (the fused score updates,
    module_batch_norm) runs it for `tensor`: a float32 / float64 CPU tensor, a CPU build, and
    the "auto" or "cpu" backend; elsewhere those ops run their torch-backend twins."""
    return (tensor.device.type == "cpu" and tensor.dtype in _CPU_KERNEL_DTYPES
            and _extension.has_kernels("cpu") and get_backend() in ("auto", "cpu"))


def ops_for(tensor: torch.Tensor):
    """The op namespace (torch.ops.modsplit, torch.ops.modsplit_triton, or the torch backend's
    module) that runs `tensor` under the selected backend; raises a BackendError if that backend
    cannot run its device."""
    name = get_backend()
    device = tensor.device
    if name == "auto":
        return _auto_ops(device)
    if name == "torch":
        return torch_backend
    if name == "triton":
        return _triton_ops(device)
    if device.type != name:
        raise BackendError(f"modsplit: backend {name!r} cannot run a tensor on {device}")
    if not _extension.has_kernels(name):
        raise BackendError(f"modsplit: backend {name!r} has no kernels: "
                           + (_extension.LOAD_ERROR or f"modsplit._C was built without {name} "
                              "kernels (rebuild with MODSPLIT_CUDA=1)"))
    return torch.ops.modsplit
