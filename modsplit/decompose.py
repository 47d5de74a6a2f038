"""decompose(): module co-training with module stemming (the paper's Algorithm 1 and Eq. 1)."""
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modsplit import files, metrics
from modsplit.bank import Grafts, ModuleBank
from modsplit.convert import convert


def _label_counts(loader, num_classes: int) -> torch.Tensor:
    """int64 [N] class frequencies of the training set (read from the dataset's label tensor
    when it exposes one, else by one pass over the loader)."""
    ds = getattr(loader, "dataset", None)
    labels = getattr(ds, "targets", None)
    if labels is None and hasattr(ds, "tensors"):
        labels = ds.tensors[-1]
    if labels is None:
        labels = torch.cat([y for _, y in loader])
    return torch.bincount(torch.as_tensor(labels).long().flatten(), minlength=num_classes)


def _balance_weights(counts: torch.Tensor, classes: torch.Tensor):
    """Per-module weights (positive [K], negative [K]) n / (2 n_c) and n / (2 (n - n_c)): the
    weighted loss is an unbiased estimate of the 1:1 balanced loss."""
    n, pos = counts.sum().double(), counts[classes].double()
    if (pos == 0).any() or (pos == n).any():
        bad = classes[(pos == 0) | (pos == n)].tolist()
        raise ValueError(f"modsplit: classes {bad} need both positive and negative training "
                         "samples")
    return (n / (2 * pos)).float(), (n / (2 * (n - pos))).float()


def _stem_loss(scores, anchors, p: float, per_module: int) -> torch.Tensor:
    """Eq. 1's stemming term of every module: float [K], entry k = sum over layers of
    |S_k - S_avg|^p divided by the number of score entries of one module (L x M x N)."""
    total = 0
    for s, a in zip(scores, anchors):
        d = (s - a).abs()
        total = total + (d if p == 1 else d.pow(p)).flatten(1).sum(1)
    return total / per_module


def _run_epoch(net, grafts, opt, loader, classes, weights, alpha, p, anchors, device, bar):
    """One pass over the loader training all K modules together. Returns the epoch's mean
    loss, cross-entropy, stemming term (per module) and balanced training accuracy."""
    scores = net.score_parameters()
    per_module = sum(s[0].numel() for s in scores)
    w_pos, w_neg = weights
    sums = torch.zeros(3, dtype=torch.float64)
    hits = torch.zeros(2, len(classes), dtype=torch.float64)  # true positives, true negatives
    seen = torch.zeros(2, len(classes), dtype=torch.float64)
    steps = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        positive = y.unsqueeze(0) == classes.unsqueeze(1)  # [K, B]
        out = grafts(net(x))  # [K, B, 2]; output 0 = "is c", 1 = "is not c"
        ce = F.cross_entropy(out.flatten(0, 1), (~positive).long().flatten(),
                             reduction="none").view_as(positive)
        ce = (torch.where(positive, w_pos[:, None], w_neg[:, None]) * ce).mean(1)  # [K]
        stem = (_stem_loss(scores, anchors, p, per_module) if anchors is not None
                else torch.zeros_like(ce))
        loss = (ce + alpha * stem).sum()  # module k's gradient is that of its own Eq. 1 loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            said = out[..., 0] > out[..., 1]
            hits += torch.stack([(said & positive).sum(1), (~said & ~positive).sum(1)]).cpu()
            seen += torch.stack([positive.sum(1), (~positive).sum(1)]).cpu()
            sums += torch.stack([loss / len(classes), ce.mean(), stem.mean()]).double().cpu()
        steps += 1
        bar.update(1)
    if not steps:
        raise ValueError("modsplit: the training loader yielded no batch")
    acc = (0.5 * (hits / seen.clamp(min=1)).sum(0)).mean().item()
    loss, ce, stem = (sums / steps).tolist()
    return {"loss": loss, "ce": ce, "stem": stem, "module_acc": acc}


def decompose(model, train_loader, num_classes: int, density: float = 0.1, alpha: float = 1.0,
              p: float = 1, epochs: int = 10, lr: float = 0.1, graft_lr: float = 0.01,
              momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4,
              shared_init: bool = True, seed: int = 0, device="cpu", callbacks=(),
              progress: bool = True, classes=None) -> ModuleBank:
    """Decompose a trained classifier into one module per class (Algorithm 1).

    model: trained nn.Module, float images [B, ...] -> logits [B, num_classes]; it is copied
    (convert), never modified, and its copy runs in eval mode throughout (BatchNorm uses its
    frozen running statistics, dropout is off). train_loader: iterable of (x float [B, ...],
    y int64 [B]). classes: the class ids to build modules for (default all); module k is
    trained on the binary target y == classes[k].

    Every module is trained at once: one forward/backward of the shared batch through the
    K-module network, the K grafting layers (Grafts, one [K, N, 2] parameter) on its logits,
    and loss = sum over modules k of Eq. 1:
        CE_k + alpha / (L*M*N) * sum |S_k - S_avg|^p,
    where L*M*N is the number of score entries of one module and S_avg the mean over modules
    of the scores at the end of the previous epoch (detached). Epoch 1 has no stemming term.
    Class imbalance (1 : N-1) is handled by class-weighted cross-entropy: positives weigh
    n / (2 n_c) and negatives n / (2 (n - n_c)) (training-set frequencies), so each module's
    CE_k estimates the loss on a 1:1 balanced set.

    Optimiser: SGD with Nesterov momentum, scores at `lr` and grafts at `graft_lr` (two
    parameter groups), both with `weight_decay`. Defaults follow Table 4 (lr 0.1, momentum 0.9;
    use batch size 32 in the loader). The paper's weight decay "5 x 10^-1" is a typo: 5e-4 is
    used. Deterministic for a given seed on CPU: the scores are drawn from `seed` and torch's
    global RNG (the loader's shuffling, unless it has its own generator) is seeded with it
    inside a forked RNG state, so the caller's RNG state is left untouched.

    After every epoch a dict {epoch, loss, ce, stem, module_acc (balanced training accuracy,
    mean over modules), ji (pairwise Jaccard index of the masks), rps_pair (mean over module
    pairs of the union's share of the maskable weights), rps_all (same for all modules)} is
    printed (progress=True, via tqdm), passed to every callback and kept in bank.history.
    Returns a ModuleBank holding packed masks (the scores are dropped) and the grafts.
    """
    classes = tuple(range(num_classes)) if classes is None else tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes) or not all(
            0 <= c < num_classes for c in classes):
        raise ValueError(f"modsplit: classes must be distinct ids in [0, {num_classes}), got "
                         f"{classes}")
    if epochs < 1:
        raise ValueError(f"modsplit: epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    fingerprint = files.model_fingerprint(model)
    class_ids = torch.tensor(classes, device=device)
    weights = tuple(w.to(device) for w in _balance_weights(
        _label_counts(train_loader, num_classes), class_ids.cpu()))
    net = convert(model, len(classes), density, shared_init=shared_init, seed=seed)
    net = net.to(device).eval()
    grafts = Grafts.init_for(classes, num_classes).to(device)
    opt = torch.optim.SGD([{"params": net.score_parameters(), "lr": lr},
                           {"params": grafts.parameters(), "lr": graft_lr}],
                          lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    layers = net.masked_layers()
    total = sum(m.weight.numel() for m in layers.values())
    history, anchors = [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            with tqdm(desc=f"decompose {epoch}/{epochs}", disable=not progress,
                      leave=False) as bar:
                record = {"epoch": epoch, **_run_epoch(net, grafts, opt, train_loader, class_ids,
                                                      weights, alpha, p, anchors, device, bar)}
            anchors = [s.detach().mean(0) for s in net.score_parameters()]
            masks = {name: m.masks() for name, m in layers.items()}
            record.update(ji=metrics.mask_jaccard(masks),
                          rps_pair=metrics.mean_pair_union_ratio(masks, total),
                          rps_all=sum(metrics.union_count(m) for m in masks.values()) / total)
            history.append(record)
            if progress:
                tqdm.write("decompose " + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in record.items()))
            for callback in callbacks:
                callback(record)
    for layer in layers.values():
        layer.freeze_masks()
    return ModuleBank(net, grafts, classes, num_classes, density, alpha, p, fingerprint, history)
