"""One co-training epoch of 10 modules: modsplit.decompose vs a per-module edge-popup loop.

Workload: FC1 (784-49-10) on the first 2000 MNIST training images, density 0.1, batch 32
(63 steps), SGD lr 0.1 / Nesterov 0.9 / weight decay 5e-4, balanced cross-entropy,
epoch 1 (no stemming term in either).

  modsplit   decompose(model, loader, 10, epochs=1): all 10 modules in one folded forward /
             backward per batch (multi_topk_mask + fused multi-module ops), plus its own
             conversion, fingerprint and end-of-epoch metrics (JI, RPs).
  baseline   the straightforward implementation: 10 separate edge-popup models, each with
             its own float scores and optimiser; per batch, for each module: GetSubnet by
             sorting |scores| of every layer, F.linear(x, W * M), graft, loss, backward, step.

Run: python -m pytest benchmarks/bench_cotrain.py --benchmark-only
The ratio baseline median / modsplit median of the same run is printed at the end.
MODSPLIT_BENCH_THREADS sets torch's thread count (default: torch's own).
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from modsplit import Grafts, decompose
from modsplit.app.data import load_dataset
from modsplit.app.models import FC1
from modsplit.app.train import train_classifier

K, DENSITY, BATCH, N_TRAIN = 10, 0.1, 32, 2000
_medians = {}

if os.environ.get("MODSPLIT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MODSPLIT_BENCH_THREADS"]))


class _SortSubnet(torch.autograd.Function):
    """Edge-popup's GetSubnet: 1 for the top `density` share of |scores| (found by a full sort),
    0 elsewhere; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, scores, density):
        flat = scores.flatten()
        order = flat.sort().indices
        mask = torch.zeros_like(flat)
        mask[order[flat.numel() - int(density * flat.numel() + 0.5):]] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _EdgePopupLinear(nn.Module):
    """One module's masked linear layer: F.linear(x, W * GetSubnet(|S|), b), W and b frozen."""

    def __init__(self, dense: nn.Linear, scores: torch.Tensor):
        super().__init__()
        self.weight, self.bias = dense.weight.detach(), dense.bias.detach()
        self.scores = nn.Parameter(scores.clone())

    def forward(self, x):
        return F.linear(x, self.weight * _SortSubnet.apply(self.scores.abs(), DENSITY), self.bias)


def _baseline_epoch(model, train, weights, lr=0.1, graft_lr=0.01):
    """The per-module loop over one epoch (same data order, init and loss as decompose)."""
    torch.manual_seed(0)
    std = (2.0 / 784) ** 0.5, (2.0 / 49) ** 0.5
    layers = [model[1], model[3]]
    init = [torch.randn(l.weight.shape) * s for l, s in zip(layers, std)]
    grafts = Grafts.init_for(range(K), 10)
    modules, opts = [], []
    for k in range(K):
        net = nn.Sequential(nn.Flatten(), _EdgePopupLinear(layers[0], init[0]), nn.ReLU(),
                            _EdgePopupLinear(layers[1], init[1]))
        graft = nn.Linear(10, 2)
        with torch.no_grad():
            graft.weight.copy_(grafts.weight[k].T)
            graft.bias.copy_(grafts.bias[k])
        modules.append((net, graft))
        opts.append(torch.optim.SGD([{"params": [p for p in net.parameters() if p.requires_grad]},
                                     {"params": graft.parameters(), "lr": graft_lr}],
                                    lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4))
    w_pos, w_neg = weights
    loader = DataLoader(train, batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    for x, y in loader:
        for k, ((net, graft), opt) in enumerate(zip(modules, opts)):
            positive = y == k
            ce = F.cross_entropy(graft(net(x)), (~positive).long(), reduction="none")
            loss = (torch.where(positive, w_pos[k], w_neg[k]) * ce).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@pytest.fixture(scope="module")
def setup():
    train = load_dataset("mnist", "train", limit=N_TRAIN)
    model = train_classifier(FC1(784, 10), train, epochs=5, lr=0.05, batch_size=32, seed=0,
                             progress=False)
    counts = torch.bincount(train.tensors[1], minlength=10).float()
    n = counts.sum()
    return model, train, (n / (2 * counts), n / (2 * (n - counts)))


@pytest.fixture(scope="module", autouse=True)
def report(request):
    """Prints the ratio after the module's benchmarks (past pytest's output capture)."""
    yield
    base, ours = _medians.get("baseline"), _medians.get("modsplit")
    if base and ours:
        with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
            print(f"\nco-training epoch, FC1 MNIST[{N_TRAIN}], K={K}, "
                  f"threads={torch.get_num_threads()}: modsplit {ours:.3f} s, per-module loop {base:.3f} s, ratio {base / ours:.2f}x")


@pytest.mark.parametrize("impl", ["modsplit", "baseline"])
def test_cotrain_epoch(benchmark, setup, impl):
    model, train, weights = setup
    if impl == "modsplit":
        def fn():
            loader = DataLoader(train, batch_size=BATCH, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
            decompose(model, loader, K, density=DENSITY, epochs=1, progress=False)
    else:
        def fn():
            _baseline_epoch(model, train, weights)
    benchmark.group = "co-training epoch"
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1 if impl == "modsplit" else 0)
    _medians[impl] = benchmark.stats.stats.median
