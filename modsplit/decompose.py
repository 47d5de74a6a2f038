"""decompose(): module co-training with module stemming (the paper's Algorithm 1 and Eq. 1)."""
import os

import torch
from tqdm.auto import tqdm

from modsplit import checkpoint, files, memory, metrics
from modsplit.backend import uses_cpu_kernel
from modsplit.bank import Grafts, ModuleBank
from modsplit.chain_step import rows_in_slots
from modsplit.convert import convert
from modsplit.decompose_config import SCHEDULES, DecomposeConfig
from modsplit.errors import CheckpointError
from modsplit.functional import raw_score_grad
from modsplit.score_update import CoTrainSGD, stem_coefficient
from modsplit.distributed import shard_for
from modsplit.batching import batches
from modsplit.module_norm import load_norm_statistics, norm_statistics
from modsplit.ops import graft as graft_ops

_EVAL_BATCH = 512


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


def _balance_weights(counts: torch.Tensor, classes: torch.Tensor, balance: bool = True):
    """Per-module weights (positive [K], negative [K]) n / (2 n_c) and n / (2 (n - n_c)): the
    weighted loss is an unbiased estimate of the 1:1 balanced loss. balance=False: all ones."""
    n, pos = counts.sum().double(), counts[classes].double()
    if (pos == 0).any() or (pos == n).any():
        bad = classes[(pos == 0) | (pos == n)].tolist()
        raise ValueError(f"modsplit: classes {bad} need both positive and negative training "
                         "samples")
    if not balance:
        return torch.ones(len(pos)), torch.ones(len(pos))
    return (n / (2 * pos)).float(), (n / (2 * (n - pos))).float()


def _stem_loss(scores, anchors, p: float, per_module: int) -> torch.Tensor:
    """Eq. 1's stemming term of every module: float [K], entry k = sum over layers of
    |S_k - S_avg|^p divided by the number of score entries of one module (L x M x N)."""
    total = 0
    for s, a in zip(scores, anchors):
        d = (s - a).abs()
        total = total + (d if p == 1 else d.pow(p)).flatten(1).sum(1)
    return total / per_module


def _new_sums(k: int, device) -> dict:
    """Zeroed per-module running sums of an epoch: ce, stem [K]; hits (true positives, true
    negatives) and seen (positives, negatives) [K, 2]; all float64."""
    z = dict(dtype=torch.float64, device=device)
    return {"ce": torch.zeros(k, **z), "stem": torch.zeros(k, **z),
            "hits": torch.zeros(k, 2, **z), "seen": torch.zeros(k, 2, **z)}


def _epoch_record(sums: dict, steps: int, alpha: float) -> dict:
    """The epoch's mean loss, cross-entropy, stemming term (per module) and balanced training
    accuracy, from the per-module sums of ALL modules (so any sharding gives the same numbers)."""
    ce, stem = sums["ce"] / steps, sums["stem"] / steps
    acc = (0.5 * (sums["hits"] / sums["seen"].clamp(min=1)).sum(1)).mean().item()
    return {"loss": (ce + alpha * stem).mean().item(), "ce": ce.mean().item(),
            "stem": stem.mean().item(), "module_acc": acc}


def sample_rows(y, classes, weights, ratio: float, inclusion, gen, local=None):
    """Sampled negatives: the rows of the batch each module trains on, and their loss weights.

    y int64 [B] (the batch's labels); classes int64 [n] (every module's class, all ranks');
    weights (w_pos [n], w_neg [n]) the class-balance weights; ratio r > 0; inclusion float [n]
    (q_k, below); gen the step's torch.Generator (CPU; the draws are the same on every rank);
    local: indices of this rank's modules (None: all). Returns (idx int64 [K, m] batch rows,
    weight float [K, m], positive bool [K, m]) for the K local modules, rows padded to the
    largest module's count m with weight 0.

    Module k sees its n_k positives of the batch and s_k = max(1, round(r n_k)) negatives drawn
    uniformly with replacement from the batch's B - n_k negatives, each weighing
    w_neg (B - n_k) / s_k; when the batch has no positive of class k, the module takes
    s_k = max(1, round(r)) negatives with probability q_k (else no row), weighing
    w_neg B / (s_k q_k). Given the batch, the expectation over the draws of
    (1/B) sum_rows weight * CE is (1/B) [sum_pos w_pos CE + sum_neg w_neg CE], the full
    class-balanced loss of decompose: the estimator is unbiased, and so is its gradient.
    """
    b = y.shape[0]
    pos = y.unsqueeze(0) == classes.unsqueeze(1)  # [n, B]
    n_pos = pos.sum(1)
    n_neg = b - n_pos
    r = float(ratio)
    take = torch.where(n_pos > 0, (r * n_pos).round().clamp(min=1),
                       torch.full_like(n_pos, max(1, round(r)))).long()
    u = torch.rand(len(classes), int(take.max()), generator=gen)
    keep = torch.rand(len(classes), generator=gen) < inclusion
    take = torch.where((n_pos > 0) | keep, take, torch.zeros_like(take))
    q = torch.where(n_pos > 0, torch.ones_like(inclusion), inclusion)
    if local is not None:
        idx_local = torch.as_tensor(local, dtype=torch.long)
        pos, n_pos, n_neg, take, u, q = (t[idx_local] for t in (pos, n_pos, n_neg, take, u, q))
        w_pos, w_neg = (w[idx_local] for w in weights)
    else:
        w_pos, w_neg = weights
    order = torch.argsort(pos.to(torch.int8), dim=1, stable=True)  # negatives, then positives
    negatives = order.gather(1, (u * n_neg.unsqueeze(1)).long().clamp(max=b - 1))
    positives = order.flip(1)  # positives first (in reverse index order)
    m = max(int((n_pos + take).max()), 1)
    t = torch.arange(m).unsqueeze(0)
    is_pos = t < n_pos.unsqueeze(1)
    is_neg = ~is_pos & (t < (n_pos + take).unsqueeze(1))
    idx = torch.where(is_pos, positives.gather(1, t.clamp(max=b - 1).expand_as(is_pos)),
                      torch.where(is_neg, negatives.gather(
                          1, (t - n_pos.unsqueeze(1)).clamp(0, negatives.shape[1] - 1)), 0))
    w_sampled = w_neg.cpu() * n_neg / (take.clamp(min=1) * q)
    weight = torch.where(is_pos, w_pos.cpu().unsqueeze(1),
                         torch.where(is_neg, w_sampled.unsqueeze(1), torch.zeros(())))
    return idx, weight.float(), is_pos


def ragged_rows(idx, seen):
    """sample_rows' padded rows as ragged row sets: idx int64 [K, m], seen bool [K, m] (the
    slots that hold a row) -> (offsets int64 [K+1], rows int64 [T], slots int64 [T]): module
    k's rows are rows[offsets[k]:offsets[k+1]], and row t fills slot slots[t] of the flattened
    [K, m] (ops.ragged_masked_linear; the chain step's sampled negatives)."""
    slots = seen.reshape(-1).nonzero().squeeze(1)
    offsets = torch.zeros(seen.shape[0] + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(seen.sum(1), 0, out=offsets[1:])
    return offsets, idx.reshape(-1)[slots], slots


def train_step(net, grafts, opt, x, y, classes, weights, alpha, p, anchors, rows=None,
               fuse_topk=True, direct=True, ragged=True):
    """One co-training step of all K modules on the batch (x, y) (already on the device):
    forward, class-weighted CE + stemming loss (Eq. 1), backward, optimizer step. With a
    CoTrainSGD optimizer (decompose's choice for p = 1) the stemming term is left out of the
    autograd graph and added by its fused step (same arithmetic, same scores).
    rows: None (every module sees the whole batch), or sample_rows()'s (idx [K, m], weight
    [K, m], positive [K, m]): module k runs on x[idx[k]] and its CE is
    sum(weight[k] * CE) / B (sampled negatives).
    fuse_topk: with CoTrainSGD on the CPU kernels, each score update also computes the next
    top-k mask (CoTrainSGD.step's densities), which the layers adopt; False computes it in the
    next forward instead (same masks; for comparisons).
    direct: with CoTrainSGD, a network that is a masked MLP chain (MultiModuleNet.masked_chain)
    computes the step's gradients by direct op calls instead of autograd (the same ops, the
    same values: modsplit.chain_step); False always takes autograd's path (for comparisons).
    ragged: with rows, each module runs on its own rows: a masked MLP through
    ragged_masked_linear on either path (unless a module hook needs the network's own forward),
    other networks through MultiModuleNet.forward_ragged (the ragged linear and conv ops and
    ModuleBatchNorm's ragged statistics). ragged=False (for comparisons), and a masked MLP with
    a module hook, run every module on the rows of the widest ([K, m]).
    Returns (out float [K, R, 2] detached, positive bool [K, R], ce float [K], stem float [K],
    seen bool [K, R]) with R = B, or m with rows (seen: the rows that count)."""
    trained = [m for m in net.masked_layers().values() if m.scores is not None]
    scores = [m.scores for m in trained]  # net.score_parameters()
    per_module = sum(s[0].numel() for s in scores)
    fused = isinstance(opt, CoTrainSGD)
    structure = getattr(net, "masked_chain", lambda: None)()  # a masked MLP, or None
    if rows is not None and not ragged:
        structure = None
    chain = structure if fused and direct and structure is not None and structure.runs(
        x, grafts) else None
    w_pos, w_neg = weights
    if rows is None:
        positive = y.unsqueeze(0) == classes.unsqueeze(1)  # [K, B]
        w = torch.where(positive, w_pos[:, None], w_neg[:, None])
        seen = torch.ones_like(positive)
    else:
        idx, w, positive = (t.to(x.device) for t in rows)
        seen = w > 0
    # grafts (output 0 = "is c", 1 = "is not c") and the class-weighted CE, [K]: the batch mean
    # of w * CE (sampled negatives: their weighted sum over the B rows of the batch)
    if chain is not None:  # the same ops as autograd's path below, called directly
        for group in opt.param_groups:
            for q in group["params"]:
                q.grad = None
        out, ce = chain.gradients(x, True, positive, w.to(x.dtype), grafts, 1.0 / x.shape[0],
                                  opt.grad_buffer,
                                  None if rows is None else ragged_rows(idx, seen))
        stem = torch.zeros_like(ce)
    else:
        with raw_score_grad(fused):  # CoTrainSGD multiplies sgn(S) in itself
            if rows is None:
                logits = net(x)  # [K, B, N]
            elif structure is not None and structure.ragged_runs(x):  # each module on its rows
                logits = structure.ragged_logits(x, ragged_rows(idx, seen), idx.shape)
            elif ragged and structure is None:  # each module on its rows, the network's forward
                offsets, batch_rows, slots = ragged_rows(idx, seen)
                logits = rows_in_slots(net.forward_ragged(x, offsets, batch_rows), slots,
                                       *idx.shape)
            else:  # every module on the rows of the widest, padded
                logits = net.forward_per_module(x[idx])  # [K, m, N]
            out, ce = graft_ops.graft_cross_entropy(logits, grafts.weight, grafts.bias,
                                                    positive, w.to(logits.dtype),
                                                    1.0 / x.shape[0])
        if anchors is not None and not fused:
            stem = _stem_loss(scores, anchors, p, per_module)
            loss = (ce + alpha * stem).sum()  # module k's gradient is that of its own Eq. 1 loss
        else:  # no stemming term, or CoTrainSGD adds its gradient in the update
            stem, loss = torch.zeros_like(ce), ce.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
    if not fused:
        opt.step()
    else:
        # On the CPU kernels the update of each layer's scores also computes their next top-k
        # mask (the one the next forward would compute), which the layer adopts.
        layers = {id(m.scores): m for m in trained}
        params = opt.param_groups[0]["params"]
        densities = ([layers[id(q)].density for q in params]
                     if fuse_topk and scores and all(id(q) in layers for q in params)
                     and uses_cpu_kernel(scores[0])
                     else None)
        sums = opt.step(None if anchors is None else [a.unsqueeze(0) for a in anchors],
                        stem_coefficient(alpha, per_module, scores[0].dtype), raw_grad=True,
                        densities=densities)
        for q, packed in zip(params, opt.next_masks or ()):
            if packed is not None:
                layers[id(q)].cache_masks(packed)
        if anchors is not None:
            stem = (sums / per_module).to(ce.dtype)
    return out.detach(), positive, ce.detach(), stem.detach(), seen


def make_optimizer(net, grafts, cfg: DecomposeConfig):
    """decompose's optimizer: SGD over the scores (lr) and the grafts (graft_lr). For p = 1 and
    momentum > 0, CoTrainSGD (fused score update, same arithmetic); else torch.optim.SGD."""
    scores, others = net.score_parameters(), list(grafts.parameters())
    if cfg.p == 1 and cfg.momentum > 0:
        return CoTrainSGD(scores, others, cfg.lr, cfg.graft_lr, cfg.momentum, cfg.nesterov,
                          cfg.weight_decay)
    return torch.optim.SGD([{"params": scores, "lr": cfg.lr},
                            {"params": others, "lr": cfg.graft_lr}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _step_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the negatives drawn at `step` (0-based) of `epoch`: resume-safe."""
    return (_epoch_seed(seed, epoch) * 1_000_033 + int(step)) % (2 ** 63)


def _run_epoch(net, grafts, opt, batches, classes, weights, alpha, p, anchors, device, bar,
               sums, step, on_step, sampling=None):
    """Train all K modules together on `batches` (the epoch's batches after the first `step`
    ones), adding to the per-module `sums`; on_step(step) runs after every optimizer step.
    sampling: None, or (ratio, inclusion, all classes, all weights, local indices, seed, epoch)
    for sampled negatives (sample_rows). Returns the number of batches of the epoch trained
    so far."""
    for x, y in batches:
        rows = None
        if sampling is not None:
            ratio, inclusion, all_classes, all_weights, local, seed, epoch = sampling
            gen = torch.Generator().manual_seed(_step_seed(seed, epoch, step))
            rows = sample_rows(y.cpu(), all_classes, all_weights, ratio, inclusion, gen, local)
        out, positive, ce, stem, seen = train_step(
            net, grafts, opt, x.to(device), y.to(device), classes, weights, alpha, p, anchors,
            rows)
        with torch.no_grad():
            said = out[..., 0] > out[..., 1]
            pos, neg = positive & seen, ~positive & seen
            sums["hits"] += torch.stack([(said & pos).sum(1), (~said & neg).sum(1)], 1)
            sums["seen"] += torch.stack([pos.sum(1), neg.sum(1)], 1)
            sums["ce"] += ce.double()
            sums["stem"] += stem.double()
        step += 1
        bar.update(1)
        on_step(step)
    return step


@torch.no_grad()
def _evaluate(net, grafts, dataset, classes, shard, device) -> dict:
    """{eval_module_acc, eval_acc} of the current modules (all ranks' modules, in class order)
    on `dataset` (metrics.confidence_accuracies)."""
    conf, labels = [], []
    for x, y in batches(dataset, _EVAL_BATCH):
        conf.append(grafts.confidence(net(x.to(device))).cpu())
        labels.append(y.long())
    scores = metrics.confidence_accuracies(shard.gather(torch.cat(conf, 1)), torch.cat(labels),
                                           classes)
    return {"eval_module_acc": scores["module_acc"], "eval_acc": scores["acc"]}


def _epoch_seed(seed: int, epoch: int) -> int:
    """The RNG seed of an epoch: the data order of epoch e is a function of (seed, e) only."""
    return (int(seed) * 1_000_003 + int(epoch)) % (2 ** 63)


def _epoch_batches(loader, seed: int, epoch: int, skip: int):
    """Iterator over the loader's batches of `epoch`, in an order fixed by (seed, epoch): torch's
    global generator and the generator of the loader or of its samplers (if any) are seeded
    before the loader's iterator is made. The first `skip` batches (done before a resume) are
    drawn and dropped here, before the function returns."""
    torch.manual_seed(_epoch_seed(seed, epoch))
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if isinstance(getattr(owner, "generator", None), torch.Generator):
            owner.generator.manual_seed(_epoch_seed(seed, epoch))
    batches = iter(loader)
    for done in range(skip):
        if next(batches, None) is None:
            raise ValueError(f"modsplit: the loader has {done} batches per epoch; the checkpoint "
                             f"was written after {skip}")
    return batches


def _float_dtype(model) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none): the
    grafts and scores follow it."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _example_shape(loader):
    """Shape of one input example from loader.dataset when that is a sized, indexable dataset of
    (x, y) pairs; None otherwise (the memory estimate then leaves out activations)."""
    try:
        ds = loader.dataset
        return tuple(ds[0][0].shape) if len(ds) else None
    except (AttributeError, TypeError, IndexError, KeyError):
        return None


def _check_memory(model, loader, k: int, momentum: float):
    """Raise ModsplitMemoryError (memory.check_memory) when k modules will not fit."""
    shape = _example_shape(loader)
    est = memory.estimate_decompose_memory(
        model, k, "sgd-momentum" if momentum else "sgd",
        batch_size=getattr(loader, "batch_size", None) or 32, input_shape=shape)
    memory.check_memory(est)


def decompose(model, train_loader, num_classes: int, config: DecomposeConfig = None, *,
              device="cpu", callbacks=(), progress: bool = True, checkpoint_dir=None,
              resume: bool = True, checkpoint_every: int = None, check_memory: bool = True,
              distributed=None, eval_set=None, **settings) -> ModuleBank:
    """Decompose a trained classifier into one module per class (Algorithm 1).

    model: trained nn.Module, float images [B, ...] -> logits [B, num_classes] (any floating
    dtype: scores and grafts follow it); it is copied (convert), never modified, and its copy
    runs in eval mode throughout (dropout is off), except that with batchnorm="module" (the
    default) its BatchNorm layers become per-module ones (modsplit.module_norm) that use each
    module's batch statistics in the training steps and its running statistics elsewhere;
    batchnorm="frozen" keeps the base model's running statistics for every module.
    train_loader: iterable of (x float [B, ...], y int64 [B]).
    config: a DecomposeConfig; **settings: its fields by name (density=0.2, alpha=2, ...), which
    replace the config's. classes: the class ids to build modules for (default all); module k
    is trained on the binary target y == classes[k].

    Every module is trained at once: one forward/backward of the shared batch through the
    K-module network, the K grafting layers (Grafts, one [K, N, 2] parameter) on its logits,
    and loss = sum over modules k of Eq. 1:
        CE_k + alpha / (L*M*N) * sum |S_k - S_avg|^p,
    where L*M*N is the number of score entries of one module and S_avg the mean over modules
    of the scores at the end of the previous epoch (detached). Epoch 1 has no stemming term.
    With balance=True the class imbalance (1 : N-1) is handled by class-weighted
    cross-entropy: positives weigh n / (2 n_c) and negatives n / (2 (n - n_c)) (training-set
    frequencies), so each module's CE_k estimates the loss on a 1:1 balanced set; with
    balance=False every example weighs 1 (the modules then estimate P(c | x) itself).

    Sampled negatives (neg_ratio=r, default None = the loss above): module k trains on its
    positives in the batch plus about r negatives per positive drawn from the batch, weighted
    so that its CE_k is an unbiased estimate of the full class-balanced CE_k (the estimator is
    in sample_rows' docstring); a masked MLP's step (modsplit.chain_step) runs about (1 + r) B
    rows (ragged_masked_linear) instead of K B; other networks run every module on the rows of
    the module that draws the most (padded to [K, m]), still below K B. The
    draws are seeded by (seed, epoch, step), identical on every rank, so a resumed or sharded
    run draws the same negatives. module_acc then counts the rows each module saw.

    Optimiser: SGD with Nesterov momentum, scores at `lr` and grafts at `graft_lr` (two
    parameter groups), both with `weight_decay` (defaults lr 0.1, momentum 0.9, weight decay
    5e-4; use batch size 32 in the loader; docs/RESULTS.md lists where the defaults differ from
    the paper and why). lr_schedule="cosine" scales both rates in epoch e by
    (1 + cos(pi (e - 1) / epochs)) / 2 (a function of the epoch alone, so resuming needs no
    scheduler state); "constant" keeps them fixed.

    Deterministic for a given seed on CPU: the scores are drawn from `seed`, and at the start
    of epoch e torch's global RNG and the loader's sampler generator (if it has one) are
    seeded from (seed, e), inside a forked RNG state (the caller's global RNG state is left
    untouched): an epoch's data order is a function of (seed, e) alone.

    checkpoint_dir: write a checkpoint (modsplit.checkpoint, atomic) there at the end of every
    epoch and, with checkpoint_every=N, after every N steps of an epoch; with resume=True an
    existing checkpoint is loaded first and training goes on from it (the batches of the epoch
    already trained are skipped), ending with the same bank as an uninterrupted run. Resuming
    with a larger `epochs` extends the run; under the cosine schedule the epochs still to come
    then follow the new total's schedule, so the bank equals a straight run of that many epochs
    only when the epochs already done had the same rates (e.g. 1 epoch, then 2).
    check_memory: raise modsplit.ModsplitMemoryError up front when the modules will not
    fit (memory.estimate_decompose_memory / check_memory).
    distributed: None, or "auto"/True to shard the modules over the initialised
    torch.distributed process group (modsplit.distributed); every rank returns the whole bank.

    After every epoch a dict {epoch, lr (the scores' rate in that epoch), loss, ce, stem,
    module_acc (balanced training accuracy, mean over modules), ji (pairwise Jaccard index of
    the masks), rps_pair (mean over module pairs of the union's share of the maskable weights),
    rps_all (same for all modules)} is printed (progress=True, via tqdm), passed to every
    callback and kept in bank.history.
    With eval_set (a dataset of (x, y) pairs, e.g. the test set) the record also holds
    eval_module_acc (list of K balanced 1:1 accuracies of the epoch's modules on it) and
    eval_acc (accuracy of the vote of all K modules on its samples of the K classes).
    Returns a ModuleBank holding packed masks (the scores are dropped) and the grafts.
    """
    cfg = DecomposeConfig.build(config, num_classes, **settings)
    classes, density, alpha, p, epochs = cfg.classes, cfg.density, cfg.alpha, cfg.p, cfg.epochs
    lr, graft_lr, seed = cfg.lr, cfg.graft_lr, cfg.seed
    if checkpoint_every is not None and int(checkpoint_every) < 1:
        raise ValueError(f"modsplit: checkpoint_every must be >= 1, got {checkpoint_every}")
    device = torch.device(device)
    fingerprint = files.model_fingerprint(model)
    shard = shard_for(distributed, len(classes))
    local = tuple(classes[i] for i in shard.local)
    if check_memory:
        _check_memory(model, train_loader, len(local), cfg.momentum)
    class_ids = torch.tensor(local, device=device)
    counts = _label_counts(train_loader, num_classes)
    weights = tuple(w.to(device) for w in _balance_weights(counts, class_ids.cpu(), cfg.balance))
    sampling = None
    if cfg.neg_ratio is not None:  # sampled negatives: the draws cover all ranks' modules
        all_classes = torch.tensor(classes)
        batch = getattr(train_loader, "batch_size", None) or 32
        inclusion = (batch * counts[all_classes].double() / counts.sum()).clamp(max=1).float()
        sampling = (cfg.neg_ratio, inclusion, all_classes,
                    _balance_weights(counts, all_classes, cfg.balance), shard.local, seed)
    net = convert(model, len(local) if cfg.shared_init else len(classes), density,
                  shared_init=cfg.shared_init, seed=seed, batchnorm=cfg.batchnorm,
                  score_init=cfg.score_init)
    if net.n_modules != len(local):  # independent draws: module k gets the draw k of all
        _keep_modules(net, shard.local)
    net = net.to(device).eval()  # ModuleBatchNorms go to training mode for the steps only
    grafts = Grafts.init_for(local, num_classes).to(device, _float_dtype(model))
    opt = make_optimizer(net, grafts, cfg)
    layers = net.masked_layers()
    total = sum(m.weight.numel() for m in layers.values())
    config = cfg.resume_key(num_classes)
    ckpt = checkpoint.path_in(checkpoint_dir) if checkpoint_dir is not None else None
    history, anchors, first, skip = [], None, 1, 0
    sums, resumed = _new_sums(len(local), device), None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if ckpt is not None and resume:
            state = shard.broadcast_object(_read_checkpoint(ckpt, fingerprint, config)
                                           if shard.rank == 0 else None)
            if isinstance(state, Exception):
                raise state
            if state is not None:
                resumed, tensors = state
                anchors, sums = checkpoint.restore(ckpt, tensors, net, grafts, opt, shard.local,
                                                   len(classes), device)
                history, first, skip = resumed["history"], resumed["epoch"], resumed["step"]
                resumed = (resumed, tensors)

        def save(epoch, step):
            state = checkpoint.module_state(net, grafts, opt, anchors, sums, shard)
            if shard.rank == 0:
                checkpoint.save(ckpt, fingerprint, config,
                                {"epoch": epoch, "step": step, "history": history}, state)

        for epoch in range(first, epochs + 1):
            scale = SCHEDULES[cfg.lr_schedule](epoch, epochs)
            for group, base_lr in zip(opt.param_groups, (lr, graft_lr)):
                group["lr"] = base_lr * scale
            batches = _epoch_batches(train_loader, seed, epoch, skip)
            if resumed is not None and skip:
                checkpoint.set_rng_state(*resumed)

            def on_step(step, epoch=epoch):
                if ckpt is not None and checkpoint_every and step % checkpoint_every == 0:
                    save(epoch, step)

            net.train_module_norms(True)
            with tqdm(desc=f"decompose {epoch}/{epochs}", disable=not progress, initial=skip,
                      leave=False) as bar:
                steps = _run_epoch(net, grafts, opt, batches, class_ids, weights, alpha, p,
                                   anchors, device, bar, sums, skip, on_step,
                                   sampling and (*sampling, epoch))
            net.train_module_norms(False)
            if not steps:
                raise ValueError("modsplit: the training loader yielded no batch")
            record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"],
                      **_epoch_record(shard.gather_dict(sums), steps, alpha)}
            anchors = [shard.module_sum(s.detach()) / len(classes)
                       for s in net.score_parameters()]
            masks = shard.gather_dict({name: m.masks() for name, m in layers.items()})
            record.update(ji=metrics.mask_jaccard(masks),
                          rps_pair=metrics.mean_pair_union_ratio(masks, total),
                          rps_all=sum(metrics.union_count(m) for m in masks.values()) / total)
            if eval_set is not None:
                record.update(_evaluate(net, grafts, eval_set, classes, shard, device))
            history.append(record)
            sums, skip = _new_sums(len(local), device), 0
            if ckpt is not None:
                save(epoch + 1, 0)
            if progress:
                tqdm.write("decompose " + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in record.items()))
            for callback in callbacks:
                callback(record)
    if first > epochs:  # resumed from the checkpoint of a finished run
        masks = shard.gather_dict({name: m.masks() for name, m in layers.items()})
    grafts = Grafts(shard.gather(grafts.weight.detach()), shard.gather(grafts.bias.detach()))
    if shard.world > 1:
        stats = shard.gather_dict(norm_statistics(net))
        net = convert(model, len(classes), density, batchnorm=cfg.batchnorm).to(device).eval()
        layers = net.masked_layers()
        load_norm_statistics(net, stats)
    for name, layer in layers.items():
        layer.freeze_masks(masks[name])
    return ModuleBank(net, grafts, classes, num_classes, density, alpha, p, fingerprint, history,
                      cfg.to_dict())


def _read_checkpoint(path, fingerprint, config):
    """(meta, tensors) of the checkpoint at `path`, None when there is none, or the
    CheckpointError raised reading it (returned, so that rank 0 can pass it to every rank)."""
    if not os.path.exists(path):
        return None
    try:
        return checkpoint.load(path, fingerprint, config)
    except CheckpointError as exc:
        return exc


def _keep_modules(net, indices):
    """Keep only the modules `indices` of a converted network (their scores, in that order)."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    for layer in net.masked_layers().values():
        layer.scores = torch.nn.Parameter(layer.scores.detach()[idx].clone())
        layer.n_modules = len(idx)
    for norm in net.module_norms().values():
        norm.running_mean = norm.running_mean[idx].clone()
        norm.running_var = norm.running_var[idx].clone()
        norm.n_modules = len(idx)
    net.n_modules = len(idx)


def decompose_distributed(model, train_loader, num_classes: int, **kwargs):
    """decompose() with the modules sharded over the initialised default process group (every
    rank calls it with the same arguments and gets the complete ModuleBank)."""
    return decompose(model, train_loader, num_classes, distributed=True, **kwargs)
