"""decompose()'s co-training step on the CIFAR-10 model zoo nets, in decompose's default
configuration for nets with BatchNorm (batchnorm="module", score update fused with the next
top-k): seconds per step. For before/after comparisons of whole steps across commits (run it
with PYTHONPATH at each checkout); benchmarks/bench_cotrain.py compares against plain PyTorch.

Settings: K = 10 modules, batch 32 of random 3x32x32 inputs and labels, density 0.1, lr 0.1,
Nesterov momentum 0.9, weight decay 5e-4, graft lr 0.01, alpha 1, p 1 against a fixed anchor;
nets at their seed-0 initialisation (the step's cost does not depend on trained weights).
Two warm-up steps, then the median over --steps steps.

Run: python benchmarks/bench_decompose_step.py [--models resnet20,vgg16_quarter] [--threads 1]
     [--steps 4] [--json out.json]
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch

from modsplit import DecomposeConfig, Grafts, convert
from modsplit.decompose import make_optimizer, train_step

K, B, DENSITY = 10, 32, 0.1


def step_seconds(name, steps):
    from modsplit.app.models import factory
    torch.manual_seed(0)
    model = factory(name)(num_classes=10).eval()
    net = convert(model, K, DENSITY, seed=0, batchnorm="module").eval()
    net.train_module_norms(True)  # as decompose's optimisation steps run them
    grafts = Grafts.init_for(range(K), K)
    cfg = DecomposeConfig.build(None, K, lr=0.1, graft_lr=0.01, momentum=0.9, weight_decay=5e-4,
                                alpha=1.0, p=1.0, density=DENSITY)
    opt = make_optimizer(net, grafts, cfg)
    anchors = [s.detach().mean(0) for s in net.score_parameters()]
    classes = torch.arange(K)
    weights = (torch.full((K,), 5.0), torch.full((K,), 10 / 18))
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(2 + steps):
        x, y = torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g)
        t0 = time.perf_counter()
        train_step(net, grafts, opt, x, y, classes, weights, 1.0, 1.0, anchors)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet20,vgg16_quarter")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for name in args.models.split(","):
        median, times = step_seconds(name, args.steps)
        rows[name] = {"median_s": median, "steps_s": times}
        print(f"{name}: {median:.3f} s/step (median of {args.steps}; "
              f"{', '.join(f'{t:.3f}' for t in times)})")
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "threads": args.threads, "K": K, "batch": B, "density": DENSITY}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
