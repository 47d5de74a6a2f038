"""multi_masked_conv2d on the CPU: the dense path (oneDNN on the unpacked W*M) against the sparse
path (direct convolution over the kept weights) across densities: the measurement behind the
crossover kSparseConvMaxDensity (csrc/cpu/masked_conv2d_sparse.h).

Layers: the four convolutions of small_vgg(3, 10, width 16) on CIFAR-10 (bench_cotrain's conv
workload), K = 10 modules, batch 32, per-module inputs (the first layer's input is shared, and
needs no grad_x). Per density and path: median ms of the forward, and of the backward with
grad_x (except the first layer) and grad_scores, as co-training calls it. The two paths are
checked to agree (max abs difference of the forward relative to its scale) before timing. The
path is forced through $MODSPLIT_SPARSE_CONV_MAX_DENSITY (0: dense, 1: sparse).

Run: python benchmarks/bench_conv_paths.py [--threads 1] [--reps 9] [--json out.json]
"""
import argparse
import json
import os
import platform
import time

import torch

import modsplit  # noqa: F401  (registers the ops)

ENV = "MODSPLIT_SPARSE_CONV_MAX_DENSITY"
K, B = 10, 32
# name: (C, O, H, shared input)
LAYERS = {"conv1 3->16 32px": (3, 16, 32, True), "conv2 16->16 32px": (16, 16, 32, False),
          "conv3 16->32 16px": (16, 32, 16, False), "conv4 32->32 16px": (32, 32, 16, False)}
DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
GEO = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def measure(layer, density, reps):
    C, O, H, shared = LAYERS[layer]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*(() if shared else (K,)), B, C, H, H, generator=g)
    weight = torch.randn(O, C, 3, 3, generator=g)
    packed = torch.ops.modsplit.multi_topk_mask(torch.randn(K, O, C * 9, generator=g), density)
    ops = torch.ops.modsplit
    row, outs = {"layer": layer, "density": density}, {}
    for path, value in (("dense", "0"), ("sparse", "1")):
        os.environ[ENV] = value
        y = ops.multi_masked_conv2d(x, weight, packed, None, *GEO)
        go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        mask = [not shared, True, False]
        outs[path] = y
        row[f"{path}_forward_ms"] = median_ms(
            lambda: ops.multi_masked_conv2d(x, weight, packed, None, *GEO), reps)
        row[f"{path}_backward_ms"] = median_ms(
            lambda: ops.multi_masked_conv2d_backward(go, x, weight, packed, *GEO, mask), reps)
    row["max_rel_diff"] = ((outs["dense"] - outs["sparse"]).abs().max()
                           / outs["dense"].abs().max().clamp(min=1)).item()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    saved = os.environ.get(ENV)
    try:
        rows = [measure(layer, d, args.reps) for layer in LAYERS for d in DENSITIES]
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "threads": args.threads, "K": K, "batch": B, "reps": args.reps,
            "statistic": "median ms"}
    print(f"multi_masked_conv2d paths, K={K}, batch {B}; {meta['machine']}, torch "
          f"{meta['torch']}, {args.threads} thread(s), median of {args.reps}")
    print("| layer | density | dense fwd | sparse fwd | dense bwd | sparse bwd | "
          "sparse / dense (fwd+bwd) | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dense = r["dense_forward_ms"] + r["dense_backward_ms"]
        sparse = r["sparse_forward_ms"] + r["sparse_backward_ms"]
        print(f"| {r['layer']} | {r['density']} | {r['dense_forward_ms']:.2f} | "
              f"{r['sparse_forward_ms']:.2f} | {r['dense_backward_ms']:.2f} | "
              f"{r['sparse_backward_ms']:.2f} | {sparse / dense:.2f} | {r['max_rel_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
