"""batches(): fast iteration over a dataset in (x, y) batches, shared by decompose and metrics."""
import torch
from torch.utils.data import DataLoader, TensorDataset


def batches(dataset, batch_size, generator=None):
    """Yield (x, y) batches of ``dataset``, shuffled with ``generator`` when one is given.

    A ``TensorDataset`` is sliced directly (much faster than per-example collation); other
    datasets go through a DataLoader with the same generator.
    """
    if isinstance(dataset, TensorDataset):
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
            yield tuple(t[idx] for t in dataset.tensors)
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None,
                              generator=generator)
