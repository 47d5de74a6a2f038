"""Fast iteration over in-memory datasets in (x, y) batches, shared by decompose and metrics."""
import torch
from torch.utils.data import DataLoader, TensorDataset


class TensorBatches:
    """A re-iterable loader over a TensorDataset that slices its tensors batch by batch (no
    per-example collation, which dominates a DataLoader's cost on small models).

    dataset: TensorDataset of tensors with a common first dimension n; batch_size: rows per
    batch (the last batch may be smaller). With shuffle=True every iteration draws a fresh
    permutation from ``generator``, or from torch's global RNG when it is None (decompose seeds
    that RNG per epoch, so its data order stays a function of its seed). len() is the number of
    batches; ``dataset`` and ``batch_size`` are exposed like a DataLoader's.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, generator=None):
        if not isinstance(dataset, TensorDataset):
            raise TypeError(f"modsplit: TensorBatches needs a TensorDataset, got "
                            f"{type(dataset).__name__}")
        if int(batch_size) < 1:
            raise ValueError(f"modsplit: batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.generator = bool(shuffle), generator

    def __len__(self):
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(0, n, self.batch_size):
            end = i + self.batch_size
            idx = order[i:end] if order is not None else slice(i, end)
            yield tuple(t[idx] for t in self.dataset.tensors)


def batches(dataset, batch_size, generator=None):
    """Yield (x, y) batches of ``dataset``, shuffled with ``generator`` when one is given.

    A ``TensorDataset`` is sliced directly (TensorBatches); other datasets go through a
    DataLoader with the same generator.
    """
    if isinstance(dataset, TensorDataset):
        yield from TensorBatches(dataset, batch_size, shuffle=generator is not None,
                                 generator=generator)
    else:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None,
                              generator=generator)
