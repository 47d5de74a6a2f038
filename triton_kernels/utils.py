"""Launch helpers shared by the Triton kernels (no kernels here)."""
import os

import torch
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor
from torch.library import custom_op, triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

# Captured when triton_kernels is first imported: TRITON_INTERPRET decides, at decoration time,
# whether @triton.jit returns a GPU kernel or an interpreted one that runs on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET != isinstance(tl.sum, InterpretedFunction):
    # triton.language's own @jit functions were decorated when triton was first imported.
    raise RuntimeError(
        f"triton_kernels: TRITON_INTERPRET={int(INTERPRET)} now, but triton was first imported "
        f"with TRITON_INTERPRET={int(not INTERPRET)}: set it before anything imports triton")
if INTERPRET:
    # The interpreter imports gluon lazily at the first launch, and gluon's import asserts
    # TRITON_INTERPRET: import it now, so that launches work after the variable is unset.
    import triton.experimental.gluon  # noqa: F401


def autotune_configs(gpu_configs, interpreter_config):
    """Autotuning with several configs needs a GPU driver: one (large-tile) config when
    interpreting, where cost grows with programs x loop iterations."""
    return [interpreter_config] if INTERPRET else gpu_configs


def dot_precision() -> str:
    """tl.dot input precision of fp32 operands, following torch's matmul setting."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def register_op(name, schema):
    """Decorator registering a wrapper as the op `name` with `schema`: a triton_op, so that
    torch.compile sees into its kernels; under the interpreter, whose kernels cannot be traced,
    an opaque custom_op whose fake impl is the wrapper itself with its launches skipped."""
    def decorator(fn):
        if not INTERPRET:
            return triton_op(name, fn, mutates_args=(), schema=schema)
        op = custom_op(name, fn, mutates_args=(), schema=schema)
        op.register_fake(fn)
        return op
    return decorator


class _InterpretedLaunch:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not any(isinstance(a, FakeTensor) for a in args):
                self.kernel[grid](*args, **kwargs)
        return launch


def launcher(kernel):
    """wrap_triton(kernel), to be launched as launcher(kernel)[grid](...); under the interpreter
    the kernel itself, skipped when given fake tensors (shape propagation, see register_op)."""
    return _InterpretedLaunch(kernel) if INTERPRET else wrap_triton(kernel)
