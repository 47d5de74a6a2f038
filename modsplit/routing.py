"""Which path a masked product takes on a GPU backend, and how much scratch it may use.

Two paths compute y = x (W*M_k)^T (and grad_x = g (W*M_k)) for a bank of K modules:
  fused     one kernel reads W and the packed bits and never writes W*M (the CUDA small-batch
            kernel, the Triton fused kernels). Bytes moved ~ (s + K/8) per weight for a dtype of
            s bytes: the cheapest for the few rows of inference, where the product is bound by
            reading W.
  expanded  a bit-expansion kernel writes W*M_k in the input's dtype into a scratch buffer,
            chunked over modules, then the vendor library (cuBLAS matmul, cuDNN grouped
            convolution) does the arithmetic on tensor cores. Bytes ~ (s + 2s) per weight and
            module for the expansion: negligible against the GEMM once rows are many, and the
            only way to reach the tensor-core rate.

The crossover, by design (to be measured on a GPU, see benchmarks/gpu_check.py): a fused SIMT
kernel does 2*M*K flops per weight read; an H100/H200 issues ~67 TFLOP/s of fp32 FMA against
~4.3 TB/s of copy bandwidth, so with bf16 weights (2 bytes) it stays bandwidth-bound up to
M*K ~ 67e12 * 2.125 / (2 * 4.3e12) ~ 16 rows at K = 1. Above that cuBLAS wins. FUSED_MAX_ROWS holds
that row count per dtype; float64 has no fused kernel on CUDA (0: always expanded). The CUDA
extension has the same constants (csrc/cuda/routing.cuh; tests/test_routing.py checks they agree)
and reads the same environment variables.

Environment (read at every call, so a GPU check can move the threshold without a rebuild):
  MODSPLIT_FUSED_MAX_ROWS   one row threshold for every dtype (rows <= it take the fused path)
  MODSPLIT_SCRATCH_BYTES    bound of the expanded-weight scratch buffer, in bytes
Tests use override(), which wins over both.

Convolutions always take the expanded path (one cuDNN call with groups = K*groups): their rows
(batch x output pixels) are many.
"""
import contextlib
import os

import torch

FUSED_MAX_ROWS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 16, torch.float64: 0}
SCRATCH_BYTES = 256 << 20  # expanded W*M per chunk of modules (a 4096^2 bf16 weight: 8 chunks of 1)
ENV_ROWS = "MODSPLIT_FUSED_MAX_ROWS"
ENV_SCRATCH = "MODSPLIT_SCRATCH_BYTES"

_override = {}  # set by override(): "rows", "scratch"


def _env_int(name):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"modsplit: ${name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"modsplit: ${name} must be >= 0, got {value}")
    return value


def fused_max_rows(dtype: torch.dtype) -> int:
    """Largest row count (per module) that takes the fused path for `dtype`."""
    if "rows" in _override:
        return _override["rows"]
    env = _env_int(ENV_ROWS)
    return env if env is not None else FUSED_MAX_ROWS.get(dtype, 0)


def use_fused(rows: int, dtype: torch.dtype) -> bool:
    """True when `rows` rows per module of `dtype` take the fused kernel, False when they take
    expand + vendor GEMM."""
    return rows <= fused_max_rows(dtype)


def scratch_bytes() -> int:
    if "scratch" in _override:
        return _override["scratch"]
    env = _env_int(ENV_SCRATCH)
    return env if env is not None else SCRATCH_BYTES


def module_chunk(k: int, bytes_per_module: int) -> int:
    """Modules per chunk of the expanded path: as many of the k as fit in scratch_bytes(), at
    least 1 (one module's W*M is always allowed)."""
    return max(1, min(k, scratch_bytes() // max(1, bytes_per_module)))


@contextlib.contextmanager
def override(fused_max_rows=None, scratch_bytes=None):
    """Force the thresholds for a block (tests: both sides of each threshold on the CPU)."""
    saved = dict(_override)
    if fused_max_rows is not None:
        _override["rows"] = int(fused_max_rows)
    if scratch_bytes is not None:
        _override["scratch"] = int(scratch_bytes)
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)
