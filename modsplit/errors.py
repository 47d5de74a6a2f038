"""modsplit's exceptions: every error modsplit raises on purpose derives from ModsplitError.

Each one also derives from the built-in exception a caller would catch without knowing modsplit
(ValueError for bad files and arguments, MemoryError for a decomposition that does not fit), so
``except ValueError`` keeps working.
"""


class ModsplitError(Exception):
    """Base class of modsplit's errors."""


class BankFileError(ModsplitError, ValueError):
    """A bank/checkpoint/composed-model file that cannot be read: truncated, corrupt, foreign or
    of an unknown format version."""


class CheckpointError(BankFileError):
    """A checkpoint that cannot be resumed from: unreadable, or from another model or config."""


class ModsplitMemoryError(ModsplitError, MemoryError):
    """A decomposition would not fit in memory. `needed` and `available` are in bytes."""

    def __init__(self, message, needed, available):
        super().__init__(message)
        self.needed = needed
        self.available = available


class BackendError(ModsplitError, RuntimeError):
    """A backend that cannot run the given tensors (wrong device, kernels not built)."""
