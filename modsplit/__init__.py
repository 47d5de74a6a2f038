"""modsplit: split a trained classifier into per-class modules and recompose any subset of them.

Ops live in modsplit.ops (torch.ops.modsplit.*), their pure-PyTorch references in
modsplit.reference, the score-differentiable layers' functions in modsplit.functional.
"""
from modsplit import ops, reference  # noqa: F401
from modsplit.backend import get_backend, set_backend  # noqa: F401

__version__ = "0.1.0"
