"""Metrics of a ModuleBank: mask overlap (JI, RPs) and module / recomposition accuracy.

Mask metrics work on {layer name: packed int32 [K, O, ceil(R/32)]} dicts (bank.masks(), or a
MultiModuleNet's masks during decomposition) and count over every maskable weight of every
masked layer. Accuracies are fractions in [0, 1].
"""
import itertools

import torch

from modsplit import ops
from modsplit.batching import batches

_BATCH = 512
_BYTE_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits of an int32 tensor (a packed mask of any shape)."""
    as_bytes = packed.contiguous().view(torch.uint8).long().cpu()
    return int(_BYTE_POPCOUNT[as_bytes].sum())


def union_mask(packed: torch.Tensor, modules=None) -> torch.Tensor:
    """Bitwise union of modules' masks: int32 [K, O, W] -> int32 [O, W] (modules: indices,
    default all)."""
    if modules is not None:
        packed = packed[torch.as_tensor(list(modules), dtype=torch.long, device=packed.device)]
    out = packed[0].clone()
    for m in packed[1:]:
        out.bitwise_or_(m)
    return out


def union_count(packed: torch.Tensor, modules=None) -> int:
    """Weights kept by at least one of the modules: popcount(union_mask(packed, modules))."""
    return popcount(union_mask(packed, modules))


def intersections(masks: dict) -> torch.Tensor:
    """int64 [K, K]: entry (i, j) = weights kept by both module i and module j (diagonal: each
    module's own count), summed over the layers."""
    total = None
    for packed in masks.values():
        k, o, w = packed.shape
        bits = ops.unpack_mask(packed, (k, o, 32 * w))
        rows = max(1, 2 ** 23 // (32 * w))  # float32 counts stay exact below 2**24
        for chunk in bits.split(rows, dim=1):
            flat = chunk.reshape(k, -1).float()
            gram = (flat @ flat.T).round().long().cpu()
            total = gram if total is None else total + gram
    return total


def mask_jaccard(masks: dict) -> float:
    """Average over module pairs i < j of |M_i ∩ M_j| / |M_i ∪ M_j| (1.0 for a single module)."""
    g = intersections(masks)
    k = g.shape[0]
    pairs = list(itertools.combinations(range(k), 2))
    if not pairs:
        return 1.0
    return sum(g[i, j].item() / (g[i, i] + g[j, j] - g[i, j]).item() for i, j in pairs) / len(pairs)


def maskable_count(masks: dict, shapes: dict) -> int:
    """Number of maskable weights: sum of the layers' weight numels ({name: weight shape})."""
    return sum(torch.Size(shapes[name]).numel() for name in masks)


def mean_pair_union_ratio(masks: dict, total: int) -> float:
    """Average over module pairs of |M_i ∪ M_j| / total: the paper's RPs of two-class
    recompositions (Figure 3). A single module gives its own ratio."""
    g = intersections(masks)
    k = g.shape[0]
    pairs = list(itertools.combinations(range(k), 2)) or [(0, 0)]
    return sum((g[i, i] + g[j, j] - g[i, j]).item() for i, j in pairs) / len(pairs) / total


def jaccard_index(bank) -> float:
    """Average pairwise Jaccard index of the bank's module masks, over all maskable weights."""
    return mask_jaccard(bank.masks())


def remaining_params_ratio(bank, classes) -> float:
    """|union of the masks of the modules of `classes`| / number of maskable weights (RPs)."""
    masks, idx = bank.masks(), bank.module_indices(classes)
    kept = sum(union_count(p, idx) for p in masks.values())
    return kept / maskable_count(masks, bank.weight_shapes())


def _module_votes(bank, dataset):
    """(bool [K, n] "module k says its class", int64 [n] labels) over the dataset."""
    votes, labels = [], []
    device = bank.grafts.weight.device
    for x, y in batches(dataset, _BATCH):
        votes.append((bank.confidences(x.to(device)) > 0.5).cpu())
        labels.append(y)
    return torch.cat(votes, 1), torch.cat(labels)


def _balanced(votes: torch.Tensor, labels: torch.Tensor, c: int) -> torch.Tensor:
    """Accuracy on a 1:1 set of class c vs the rest, computed exactly as the mean of the
    accuracy on class-c samples and on all other samples (the expectation over 1:1
    subsamples): votes bool [K, n] -> float [K]."""
    pos = labels == c
    return 0.5 * (votes[:, pos].float().mean(1) + (~votes[:, ~pos]).float().mean(1))


def module_accuracy(bank, dataset, c: int) -> float:
    """Accuracy of the module of class c telling class c from the others on a 1:1 balanced test
    set (see _balanced)."""
    k = bank.module_indices([c])[0]
    votes, labels = _module_votes(bank, dataset)
    return _balanced(votes[k:k + 1], labels, c).item()


def module_class_matrix(bank, dataset) -> torch.Tensor:
    """Table 6: float [K, N], entry (k, j) = accuracy of module k's yes/no answer against "is
    class j" on the 1:1 balanced set of class j vs the rest (NaN for a class absent from the
    dataset)."""
    votes, labels = _module_votes(bank, dataset)
    return torch.stack([_balanced(votes, labels, j) for j in range(bank.num_classes)], 1)


def confidence_accuracies(conf: torch.Tensor, labels: torch.Tensor, classes) -> dict:
    """Accuracies from the positive confidences conf float [K, n] of the modules of `classes`
    (K ids, row k for classes[k]) on n samples with int64 labels [n]: {"module_acc": list of K
    balanced 1:1 accuracies (module_accuracy's definition, "yes" when conf > 0.5), "acc":
    accuracy of the vote argmax_k conf[k] (recomposed_accuracy's) on the samples whose label is
    in `classes`}."""
    ids = torch.as_tensor(list(classes), dtype=torch.long)
    votes = conf > 0.5
    module_acc = [_balanced(votes[k:k + 1], labels, int(c)).item() for k, c in enumerate(ids)]
    keep = torch.isin(labels, ids)
    if not keep.any():
        raise ValueError(f"modsplit: the dataset has no samples of classes {ids.tolist()}")
    acc = (ids[conf[:, keep].argmax(0)] == labels[keep]).double().mean().item()
    return {"module_acc": module_acc, "acc": acc}


def recomposed_accuracy(bank, dataset, classes) -> float:
    """Accuracy of bank.compose(classes) on the samples of `dataset` whose label is in
    `classes`."""
    model = bank.compose(classes)
    device = bank.grafts.weight.device
    allowed = torch.tensor(list(classes))
    correct = n = 0
    for x, y in batches(dataset, _BATCH):
        keep = torch.isin(y, allowed)
        if keep.any():
            correct += (model.predict(x[keep].to(device)).cpu() == y[keep]).sum().item()
            n += int(keep.sum())
    if not n:
        raise ValueError(f"modsplit: the dataset has no samples of classes {list(classes)}")
    return correct / n
