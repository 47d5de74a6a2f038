import os

import pytest
import torch

import modsplit  # noqa: F401  (registers the ops)
from modsplit.backend import load_triton

if not torch.cuda.is_available():
    # With no GPU the Triton kernels run under the interpreter, which must be chosen before
    # anything (torchvision, inductor) imports triton: import them first, in interpreter mode.
    load_triton(interpret=True)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel tests are parametrized over every device present: the CUDA twin of each CPU test runs
# wherever a GPU is visible, from the same test function.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def shared_path(*parts):
    """A file under the project's shared data folder: $MODSPLIT_SHARED, ../shared next to the
    repository, or /work/shared."""
    for root in (os.environ.get("MODSPLIT_SHARED"), os.path.join(_REPO, "..", "shared"),
                 "/work/shared"):
        if root and os.path.isdir(root):
            return os.path.normpath(os.path.join(root, *parts))
    raise FileNotFoundError("shared data folder not found: set MODSPLIT_SHARED")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
