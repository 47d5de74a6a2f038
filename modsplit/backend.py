"""Backend selection: which implementation the modsplit.ops wrappers and modsplit.functional call.

Backends:
  "auto"   (default) the torch.ops.modsplit op of the tensor's device: C++ on CPU, CUDA on CUDA.
  "cpu"    the C++ CPU kernels (torch.ops.modsplit); tensors must be on the CPU.
  "cuda"   the CUDA kernels (torch.ops.modsplit); tensors must be on a CUDA device.
  "triton" the Triton kernels (torch.ops.modsplit_triton, package triton_kernels) for CUDA
           tensors, and for CPU tensors only when the kernels run under the Triton interpreter
           (TRITON_INTERPRET=1 set before triton_kernels is first imported).

The choice is, in order: set_backend(name) / the use(name) context manager, else the environment
variable MODSPLIT_BACKEND, else "auto". Both torch op namespaces have the same op names and
schemas, so callers write ``ops_for(x).masked_linear(...)``.
"""
import contextlib
import os

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton")
ENV_VAR = "MODSPLIT_BACKEND"

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


def load_triton(interpret=None):
    """Imports triton_kernels, which registers torch.ops.modsplit_triton, and returns it.

    interpret=True builds the kernels for the Triton interpreter (CPU tensors) and False for a GPU,
    setting TRITON_INTERPRET only during the import; None follows the environment. The choice is
    fixed by the first import: a later call asking for the other one raises a RuntimeError.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    if interpret is not None:
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        import triton_kernels
    except ImportError as exc:
        raise RuntimeError(f"modsplit: backend 'triton' needs the triton package ({exc})") from exc
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    if interpret is not None and triton_kernels.INTERPRET != interpret:
        raise RuntimeError("modsplit: triton_kernels was already imported with TRITON_INTERPRET="
                           f"{int(triton_kernels.INTERPRET)}")
    return triton_kernels


def _triton_ops(device: torch.device):
    triton_kernels = load_triton()
    if device.type == "cuda" and not triton_kernels.INTERPRET:
        return torch.ops.modsplit_triton
    if device.type == "cpu" and triton_kernels.INTERPRET:
        return torch.ops.modsplit_triton
    if device.type == "cuda":
        raise RuntimeError("modsplit: backend 'triton' cannot run CUDA tensors while the Triton "
                           "kernels were built for the interpreter (TRITON_INTERPRET=1)")
    raise RuntimeError(f"modsplit: backend 'triton' cannot run {device.type} tensors: Triton "
                       "needs a CUDA device, or TRITON_INTERPRET=1 (set before triton_kernels is "
                       "imported) to interpret the kernels on the CPU")


def ops_for(tensor: torch.Tensor):
    """The op namespace (torch.ops.modsplit or torch.ops.modsplit_triton) that runs `tensor`
    under the selected backend; raises a RuntimeError if that backend cannot run its device."""
    name = get_backend()
    device = tensor.device
    if name == "triton":
        return _triton_ops(device)
    if name in ("cpu", "cuda") and device.type != name:
        raise RuntimeError(f"modsplit: backend {name!r} cannot run a tensor on {device}")
    return torch.ops.modsplit
