"""Experiment (not a library feature): does co-training learn on a conv net once every module's
BatchNorm uses its own statistics? (docs/RESULTS.md, "Figure 4 at CPU scale, stop 12".)

decompose() keeps the base model's BatchNorm in eval mode. Here its converted copy has every
BatchNorm2d replaced by a per-module one (same frozen affine parameters): with gradients on (a
training step) it normalises each module's rows of the folded batch [K*B, C, H, W] with their own
batch statistics and updates per-module running statistics [K, C]; without gradients
(evaluation, recomposition) it uses those running statistics, of the active modules. The run
is then decompose()'s own loop, unchanged, and the bank is measured in this process (the
per-module statistics are not part of a bank file: nothing here is saved).

Option --score-init magnitude starts every module from each layer's top-|W| mask (a
magnitude-pruned subnetwork) instead of a Kaiming draw.

Run: python benchmarks/exp_module_bn.py --model vgg16_quarter --base <base.pt> \
         --out docs/runs/cifar10/module_bn_vgg16_quarter [--per-module-bn 0|1]
         [--score-init kaiming|magnitude]
"""
import argparse
import functools
import json
import math
import os
import platform
import sys
import time
import weakref

import torch
import torch.nn as nn

import modsplit
import modsplit.layers
from modsplit.app.data import load_dataset
from modsplit.app.figure4 import CONV_MODELS


class ModuleBatchNorm2d(nn.Module):
    """BatchNorm2d with per-module statistics over a module-folded batch (see the docstring)."""

    def __init__(self, bn, net, momentum=0.1):
        super().__init__()
        k = net.n_modules
        self.net, self.eps, self.momentum = weakref.ref(net), bn.eps, momentum
        self.register_buffer("weight", bn.weight.detach().clone())
        self.register_buffer("bias", bn.bias.detach().clone())
        self.register_buffer("running_mean", bn.running_mean.detach().expand(k, -1).clone())
        self.register_buffer("running_var", bn.running_var.detach().expand(k, -1).clone())

    def forward(self, x):
        active = self.net().active
        idx = torch.arange(self.running_mean.shape[0]) if active is None else torch.tensor(active)
        k = len(idx)
        xk = x.view(k, x.shape[0] // k, *x.shape[1:])
        if torch.is_grad_enabled():
            mean = xk.mean((1, 3, 4))
            var = xk.var((1, 3, 4), unbiased=False)
            with torch.no_grad():
                n = xk[0].numel() // xk.shape[2]
                self.running_mean[idx] = ((1 - self.momentum) * self.running_mean[idx]
                                          + self.momentum * mean)
                self.running_var[idx] = ((1 - self.momentum) * self.running_var[idx]
                                         + self.momentum * var * n / max(n - 1, 1))
        else:
            mean, var = self.running_mean[idx], self.running_var[idx]
        scale = self.weight / torch.sqrt(var + self.eps)  # [k, C]
        y = (xk - mean[:, None, :, None, None]) * scale[:, None, :, None, None]
        return (y + self.bias[None, None, :, None, None]).view_as(x)


def magnitude_scores(weight, n_modules, shared_init=True, generator=None):
    """|W| rescaled to the Kaiming score scale plus 1% of a Kaiming draw: the initial masks are
    (close to) each layer's top |W|, a magnitude-pruned subnetwork."""
    noise = modsplit.layers.init_scores(weight, n_modules, shared_init, generator)
    w = weight.detach().abs()
    std = math.sqrt(2.0) / math.sqrt(weight[0].numel())
    return (w / w.std().clamp_min(1e-12) * std).unsqueeze(0) + 0.01 * noise


def convert_with_module_bn(model, *args, magnitude=False, per_module_bn=True, **kwargs):
    """modsplit.convert, then (magnitude) scores from |W| and (per_module_bn) every BatchNorm2d
    replaced by a ModuleBatchNorm2d."""
    net = modsplit.convert(model, *args, **kwargs)
    if magnitude:  # the layers drew their scores before the trained weights were copied in
        with torch.no_grad():
            for layer in net.masked_layers().values():
                layer.scores.copy_(magnitude_scores(layer.weight, layer.scores.shape[0]))
    for name, m in list(net.net.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            parent, _, attr = name.rpartition(".")
            if per_module_bn:
                setattr(net.net.get_submodule(parent), attr, ModuleBatchNorm2d(m, net))
    return net


@torch.no_grad()
def pair_accuracy(bank, x, y, pair):
    keep = (y == pair[0]) | (y == pair[1])
    return float((bank.compose(list(pair)).predict(x[keep]) == y[keep]).float().mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg16_quarter")
    p.add_argument("--base", required=True)
    p.add_argument("--per-module-bn", type=int, default=1)
    p.add_argument("--score-init", choices=["kaiming", "magnitude"], default="kaiming")
    p.add_argument("--train", type=int, default=4000, help="first N training images")
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CONV_MODELS[args.model](10)
    model.load_state_dict(torch.load(args.base, map_location="cpu"))
    model.eval()
    x, y = load_dataset("cifar10", "train", args.data_dir).tensors
    xt, yt = load_dataset("cifar10", "test", args.data_dir).tensors
    xt, yt = xt[:args.test], yt[:args.test]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:args.train], y[:args.train]), batch_size=32,
        shuffle=True, generator=torch.Generator().manual_seed(0))
    # decompose() builds its network through this name (the module, not the function that
    # modsplit exports under the same name)
    sys.modules["modsplit.decompose"].convert = functools.partial(
        convert_with_module_bn, magnitude=args.score_init == "magnitude",
        per_module_bn=bool(args.per_module_bn))
    start = time.time()
    bank = modsplit.decompose(model, loader, 10, density=0.1, alpha=args.alpha,
                              epochs=args.epochs, progress=False, seed=0,
                              eval_set=torch.utils.data.TensorDataset(xt, yt))
    wall = time.time() - start
    with torch.no_grad():
        acc10 = float((bank.compose(list(range(10))).predict(xt) == yt).float().mean())
        base10 = float((model(xt).argmax(1) == yt).float().mean())
    hist = [{k: v for k, v in h.items() if k in ("epoch", "ce", "module_acc", "ji", "rps_pair",
                                                "eval_module_acc")} for h in bank.history]
    result = {"settings": vars(args), "machine": f"{platform.machine()}, torch {torch.__version__}",
              "wall_s": round(wall, 1), "history": hist, "acc10": acc10, "base_acc10": base10,
              "acc2_3_7": pair_accuracy(bank, xt, yt, (3, 7))}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
