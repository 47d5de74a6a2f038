import os

import pytest
import torch

import modsplit  # noqa: F401  (registers the ops)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")


def shared_path(*parts):
    """A file under the shared data folder (../shared next to the repository)."""
    return os.path.normpath(os.path.join(os.environ.get("MODSPLIT_SHARED", SHARED), *parts))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
