"""Loads the compiled extension modsplit._C, whose import registers the torch.ops.modsplit ops."""
import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    from modsplit import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "modsplit's compiled extension modsplit._C is missing or failed to load "
        f"({exc}). Build it with `pip install --no-build-isolation -e .` (or "
        "`python setup.py build_ext --inplace`) from the repository root.") from exc
