"""Hyperparameters chosen on validation data: the train/validation split, the selection rule and
the 95% interval of a test accuracy.

The validation split is carved from the training images (the last ``validation_size`` of the
loaded training set, default VALIDATION_SIZE per dataset: the last 10,000 of MNIST's and
F-MNIST's 60,000; 2,000 of the 20,000 CIFAR-10 images of the CPU-scale runs), so that the test
set is only used for the final numbers.
"""
import math

from torch.utils.data import TensorDataset

# Default number of validation images per dataset (the last ones of the loaded training set).
VALIDATION_SIZE = {"mnist": 10000, "fmnist": 10000, "cifar10": 2000, "cifar100": 5000,
                   "svhn": 5000, "digits": 200}


def split_validation(dataset, size):
    """(train, validation) of a TensorDataset of (x [N, ...], y [N]): train holds examples
    0..N-size-1 and validation the last `size` (N-size..N-1), so the two are disjoint, cover the
    set, and the split depends on nothing but N and `size`. Both are TensorDatasets sharing the
    original storage. Raises ValueError unless 0 < size < N."""
    x, y = dataset.tensors
    n = len(y)
    if not 0 < size < n:
        raise ValueError(f"validation size must be in (0, {n}), got {size}")
    return TensorDataset(x[:n - size], y[:n - size]), TensorDataset(x[n - size:], y[n - size:])


def select_candidate(candidates, key, tolerances):
    """The index of the chosen hyperparameter candidate and the rule that chose it.

    candidates: list of dicts, each holding `key` (the validation objective: higher is better,
    e.g. the mask JI, or minus the 2-class RPs ratio) and, for each name in `tolerances`
    ({name: largest allowed loss, a fraction}), f"{name}_loss": the validation accuracy the
    candidate loses against the base model (a fraction; negative when it is above the base).
    Chosen: the candidate with the highest `key` among those whose every loss is within its
    tolerance (ties: the first); when none is, the one whose worst loss-to-tolerance ratio is
    smallest. Returns (index, rule) with rule a sentence for the run's record."""
    if not candidates:
        raise ValueError("no candidates to select from")

    def excess(i):
        return max(candidates[i][f"{name}_loss"] / tol for name, tol in tolerances.items())

    ok = [i for i in range(len(candidates)) if excess(i) <= 1]
    limits = ", ".join(f"{name} loss <= {100 * tol:g} points" for name, tol in tolerances.items())
    if ok:
        best = max(ok, key=lambda i: (candidates[i][key], -i))
        return best, f"highest validation {key} with {limits} ({len(ok)} of {len(candidates)} " \
                     f"candidates qualified)"
    best = min(range(len(candidates)), key=excess)
    return best, f"no candidate had {limits}; chose the smallest worst loss/tolerance ratio"


def wilson_interval(correct, n, z=1.96):
    """95% Wilson score interval (low, high) of an accuracy `correct` / `n` (n > 0)."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
