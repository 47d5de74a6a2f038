"""Why conv-net decompositions stall at k = 0.1: a 10% subnetwork of a trained conv net under the
base model's frozen BatchNorm statistics gives near-constant logits, and the same subnetwork with
its BatchNorm statistics recomputed does not.

For each trained base model and density d: keep the top-d |weight| of every Conv2d / Linear
(magnitude pruning, per layer, no retraining) and measure on the first --test images of the test
set (a) accuracy and mean per-class logit standard deviation with the base model's running
statistics (what decompose() sees: BatchNorm in eval mode), (b) the same after recomputing the
running statistics on the first --calib training images (train-mode passes, cumulative average).

Run: python benchmarks/exp_bn_statistics.py --model resnet20=<base.pt> \
         --model vgg16_quarter=<base.pt> --out docs/runs/cifar10/bn_statistics
(base models from `modsplit reproduce figure4 --out`). Writes <out>.json and <out>.md.
"""
import argparse
import copy
import json
import os
import platform

import torch
import torch.nn as nn

from modsplit.app.data import load_dataset
from modsplit.app.figure4 import CONV_MODELS


def magnitude_pruned(model, density):
    """A copy of `model` keeping the top-`density` |weight| of every Conv2d / Linear."""
    pruned = copy.deepcopy(model)
    for m in pruned.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.data
            keep = max(1, int(density * w.numel()))
            thr = w.abs().flatten().kthvalue(w.numel() - keep + 1).values
            w.mul_((w.abs() >= thr).to(w.dtype))
    return pruned


def recalibrated(model, images, batch=100):
    """A copy of `model` whose BatchNorm running statistics are recomputed on `images`."""
    new = copy.deepcopy(model)
    for m in new.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    new.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            new(images[i:i + batch])
    return new.eval()


@torch.no_grad()
def measure(model, x, y):
    out = model(x)
    return {"accuracy": float((out.argmax(1) == y).float().mean()),
            "logit_std": float(out.std(0).mean())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, help="name=path of a base model")
    p.add_argument("--densities", default="1.0,0.3,0.1")
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--calib", type=int, default=1000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    x, _ = load_dataset("cifar10", "train", args.data_dir).tensors
    xt, yt = load_dataset("cifar10", "test", args.data_dir).tensors
    xt, yt, calib = xt[:args.test], yt[:args.test], x[:args.calib]
    rows = []
    for spec in args.model:
        name, path = spec.split("=", 1)
        model = CONV_MODELS[name](10)
        model.load_state_dict(torch.load(path, map_location="cpu"))
        model.eval()
        for d in (float(v) for v in args.densities.split(",")):
            pruned = magnitude_pruned(model, d)
            rows.append({"model": name, "density": d, "frozen_bn": measure(pruned, xt, yt),
                         "recalibrated_bn": measure(recalibrated(pruned, calib), xt, yt)})
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"# Magnitude-pruned subnetworks: frozen vs recomputed BatchNorm statistics", "",
             f"CIFAR-10, first {len(yt)} test images; statistics recomputed on the first "
             f"{len(calib)} training images; {platform.machine()}, torch {torch.__version__}.", "",
             "| model | density | accuracy, frozen BN | logit std, frozen BN | accuracy, "
             "recomputed BN | logit std, recomputed BN |", "|---|---|---|---|---|---|"]
    for r in rows:
        f, c = r["frozen_bn"], r["recalibrated_bn"]
        lines.append(f"| {r['model']} | {r['density']} | {f['accuracy']:.3f} | "
                     f"{f['logit_std']:.4f} | {c['accuracy']:.3f} | {c['logit_std']:.4f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": vars(args), "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
