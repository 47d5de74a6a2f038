"""Experiment: the ablation of per-module BatchNorm statistics and the magnitude start on a conv
net (docs/RESULTS.md, "Figure 4 at CPU scale, stop 12"): decompose() with
batchnorm="module" | "frozen" (--per-module-bn 1 | 0) and score_init="kaiming" | "magnitude"
(--score-init), one alpha, scored in this process (nothing is saved) on the 2,000 validation
images carved from the training set (--eval-on validation, the default: the last 2,000 of the
20,000, never used for decomposition) or on the test images (--eval-on test, stop 12's runs).

Stop 12 ran it before the library had these options: its own per-module BatchNorm class and
magnitude start, patched into decompose() (git history of this file); the library's
modsplit.module_norm and layers.magnitude_scores are that design, tested against nn.BatchNorm.

Run: python benchmarks/exp_module_bn.py --model vgg16_quarter --base <base.pt> \
         --out docs/runs/cifar10/module_bn_vgg16_quarter [--per-module-bn 0|1]
         [--score-init kaiming|magnitude] [--eval-on validation|test]
"""
import argparse
import itertools
import json
import os
import platform
import time

import torch

import modsplit
from modsplit.app.data import load_dataset
from modsplit.app.figure4 import CONV_MODELS
from modsplit.app.selection import VALIDATION_SIZE, split_validation


@torch.no_grad()
def pair_accuracy(bank, x, y, pair):
    keep = (y == pair[0]) | (y == pair[1])
    return float((bank.compose(list(pair)).predict(x[keep]) == y[keep]).float().mean())


@torch.no_grad()
def base_pair_accuracy(model, x, y, pair):
    """The base model's own 2-class accuracy: argmax over the two classes' logits."""
    keep = (y == pair[0]) | (y == pair[1])
    logits = model(x[keep])[:, list(pair)]
    return float((torch.tensor(pair)[logits.argmax(1)] == y[keep]).float().mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg16_quarter")
    p.add_argument("--base", required=True)
    p.add_argument("--per-module-bn", type=int, default=1)
    p.add_argument("--score-init", choices=["kaiming", "magnitude"], default="kaiming")
    p.add_argument("--train", type=int, default=4000, help="first N training images")
    p.add_argument("--test", type=int, default=1000, help="first N test images (--eval-on test)")
    p.add_argument("--eval-on", choices=["validation", "test"], default="validation")
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
    train, val = split_validation(load_dataset("cifar10", "train", args.data_dir),
                                  VALIDATION_SIZE["cifar10"])
    x, y = train.tensors
    if args.train > len(y):
        p.error(f"--train {args.train} exceeds the {len(y)} training images left after the "
                "validation split")
    if args.eval_on == "validation":
        xt, yt = val.tensors
    else:
        xt, yt = load_dataset("cifar10", "test", args.data_dir).tensors
        xt, yt = xt[:args.test], yt[:args.test]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:args.train], y[:args.train]), batch_size=32,
        shuffle=True, generator=torch.Generator().manual_seed(0))
    start = time.time()
    bank = modsplit.decompose(model, loader, 10, density=0.1, alpha=args.alpha,
                              epochs=args.epochs, progress=False, seed=0,
                              batchnorm="module" if args.per_module_bn else "frozen",
                              score_init=args.score_init,
                              eval_set=torch.utils.data.TensorDataset(xt, yt))
    wall = time.time() - start
    pairs = list(itertools.combinations(range(10), 2))
    with torch.no_grad():
        acc10 = float((bank.compose(list(range(10))).predict(xt) == yt).float().mean())
        base10 = float((model(xt).argmax(1) == yt).float().mean())
    hist = [{k: v for k, v in h.items() if k in ("epoch", "ce", "module_acc", "ji", "rps_pair",
                                                "eval_module_acc")} for h in bank.history]
    result = {"settings": vars(args), "machine": f"{platform.machine()}, torch {torch.__version__}",
              "wall_s": round(wall, 1), "history": hist, "acc10": acc10, "base_acc10": base10,
              "acc2_3_7": pair_accuracy(bank, xt, yt, (3, 7)),
              "acc2_mean_45_pairs": sum(pair_accuracy(bank, xt, yt, pair) for pair in pairs) / 45,
              "base_acc2_mean_45_pairs": sum(base_pair_accuracy(model, xt, yt, pair)
                                             for pair in pairs) / 45}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
