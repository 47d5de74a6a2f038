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


# The data: $MODSPLIT_DATA (one sub-folder per dataset) when set, else the project's shared data
# folder beside the repository, ../shared/data; modsplit.app.data reads the same variable.
os.environ.setdefault("MODSPLIT_DATA", os.path.normpath(os.path.join(_REPO, "..", "shared", "data")))


def data_path(*parts):
    """A file under $MODSPLIT_DATA."""
    return os.path.join(os.environ["MODSPLIT_DATA"], *parts)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def digits_fc1():
    """(FC1 trained 3 epochs on the digits training set, its first 320 examples)."""
    from torch.utils.data import TensorDataset

    from modsplit.app.data import load_dataset
    from modsplit.app.models import FC1
    from modsplit.app.train import train_classifier

    train = load_dataset("digits", "train")
    small = TensorDataset(*(t[:320] for t in train.tensors))
    model = train_classifier(FC1(64, 10), train, epochs=3, lr=0.05, batch_size=32, seed=0,
                             progress=False)
    return model, small
