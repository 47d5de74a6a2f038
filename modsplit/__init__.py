"""modsplit: split a trained classifier into per-class modules and recompose any subset of them.

Pipeline: convert() -> decompose() -> ModuleBank -> bank.compose() -> ComposedModel -> compact()
(CompactModel, modsplit.compact; plain .pt2 / ONNX files via modsplit.plain_export) or export().
Ops live in modsplit.ops (torch.ops.modsplit.*), their pure-PyTorch references in
modsplit.reference, the score-differentiable layers' functions in modsplit.functional, the
backend choice in modsplit.backend. The application layer (CLI, datasets, model zoo, paper
reproduction) is modsplit.app, which this package never imports.
"""
from modsplit import metrics, ops  # noqa: F401
from modsplit._version import __version__
from modsplit.backend import get_backend, set_backend
from modsplit.bank import Grafts, ModuleBank
from modsplit.batching import TensorBatches
from modsplit.compact import CompactModel
from modsplit.compose import ComposedModel
from modsplit.convert import MultiModuleNet, convert
from modsplit.decompose import DecomposeConfig, decompose
from modsplit.errors import (BackendError, BankFileError, CheckpointError, ModsplitError,
                             ModsplitMemoryError)
from modsplit.layers import MaskedConv2d, MaskedLinear

__all__ = ["__version__", "MaskedLinear", "MaskedConv2d", "MultiModuleNet", "convert",
           "decompose", "DecomposeConfig", "Grafts", "ModuleBank", "ComposedModel", "CompactModel",
           "metrics", "TensorBatches",
           "ops", "get_backend", "set_backend", "ModsplitError", "BankFileError",
           "CheckpointError", "ModsplitMemoryError", "BackendError"]
