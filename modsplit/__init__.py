"""modsplit: split a trained classifier into per-class modules and recompose any subset of them.

Ops live in modsplit.ops (torch.ops.modsplit.*), their pure-PyTorch references in
modsplit.reference, the score-differentiable layers' functions in modsplit.functional.
Pipeline: convert() -> decompose() -> ModuleBank -> bank.compose() -> ComposedModel -> export().
"""
from modsplit import metrics, ops, reference  # noqa: F401
from modsplit.backend import get_backend, set_backend
from modsplit.bank import Grafts, ModuleBank
from modsplit.compose import ComposedModel
from modsplit.convert import MultiModuleNet, convert
from modsplit.decompose import decompose
from modsplit.files import BankFileError, model_fingerprint
from modsplit.layers import MaskedConv2d, MaskedLinear

__version__ = "0.1.0"

__all__ = ["MaskedLinear", "MaskedConv2d", "MultiModuleNet", "convert", "decompose", "Grafts",
           "ModuleBank", "ComposedModel", "BankFileError", "model_fingerprint", "metrics",
           "get_backend", "set_backend"]
