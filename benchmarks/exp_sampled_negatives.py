"""Sampled negatives vs full co-training: time per epoch, JI and recomposed accuracy.

Run: python benchmarks/exp_sampled_negatives.py --out docs/runs/sampled_negatives [--quick]

Per workload, one process, same base model, same seed, same data order, one after the other:
  full      decompose(..., neg_ratio=None)   (the paper's loss: every module sees the batch of 32)
  sampled   decompose(..., neg_ratio=r) on batches of 32 examples (G = 1: the same batch) or,
            for G > 1, of 32 * G * K / 10 ("module-balanced" batches: each module's rows per
            step about (1 + r) * 32 * G / 10, the same for every K, and G * K / 10 times fewer
            optimizer steps per epoch)
  full, same batch   (extra, --control, only where G > 1) full co-training on the sampled run's
            batches and learning rates: how much of the difference is the batch size alone
Reported: wall seconds per epoch (decompose's total time / epochs), JI (metrics.jaccard_index)
and recomposed accuracy of all classes on the test split (metrics.recomposed_accuracy).

(r, G, L) is chosen first on validation data carved from the training split (its last --val
examples, never used for decomposition or base training): MNIST FC1, candidates --candidates
("r:G[:L],..."; L multiplies the sampled run's lr and graft_lr, default 1; --ratios r,... means
G = L = 1); of the candidates whose validation recomposed accuracy is within 0.5 point and JI
within 0.03 of full co-training's on the same validation data, the one with the shortest
validation run is used for every workload (the smallest r, G = L = 1, if none is); with
--per-workload, FC2-FC4 each choose theirs the same way on their own validation runs.
--loader: both sides' loader, a torch DataLoader (per-example collation, default) or
modsplit.TensorBatches (slices of the tensors; the data order then comes from torch's global
RNG, which decompose seeds per epoch).

Workloads (Table 1 settings: density 0.1, alpha 2, p 1, lr 0.1 cosine, batch 32, SGD Nesterov;
base models per the "paper" protocol, train_classifier's defaults), scaled down to fit a shared
2-core CPU: --decomp examples for decomposition, --epochs epochs, base models trained for
--base-epochs epochs on the --base examples:
  mnist  FC1-FC4 (K = 10);  mnist2  mnist2_fc (1 hidden layer of 64, base lr 0.05, K = 100);
  cifar10  small_vgg width 16 (base lr 0.05, K = 10); mnist2 and cifar10 decompose for
  epochs - 1 epochs, cifar10 on --decomp / 5 examples.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modsplit import TensorBatches, decompose, metrics  # noqa: E402
from modsplit.app.data import load_dataset  # noqa: E402
from modsplit.app.models import FC1, FC2, FC3, FC4, mnist2_fc, small_vgg  # noqa: E402
from modsplit.app.train import evaluate, train_classifier  # noqa: E402

SETTINGS = dict(density=0.1, alpha=2.0, p=1, lr=0.1, lr_schedule="cosine")
GRAFT_LR = 0.01  # decompose's default graft_lr; L scales it with lr


def _split(ds, n_first, n_last):
    x, y = ds.tensors
    return TensorDataset(x[:n_first], y[:n_first]), TensorDataset(x[-n_last:], y[-n_last:])


def _decompose(model, data, k, epochs, seed, ratio, batch=32, lr_scale=1.0, loader="dataloader"):
    """decompose() timed; loader "tensor": modsplit.TensorBatches, else a torch DataLoader."""
    loader = (TensorBatches(data, batch) if loader == "tensor" else
              DataLoader(data, batch_size=batch, shuffle=True,
                         generator=torch.Generator().manual_seed(seed)))
    settings = {**SETTINGS, "lr": SETTINGS["lr"] * lr_scale,
                "graft_lr": GRAFT_LR * lr_scale}
    t0 = time.perf_counter()
    bank = decompose(model, loader, k, epochs=epochs, seed=seed, progress=False,
                     neg_ratio=ratio, **settings)
    return bank, time.perf_counter() - t0


def _quality(bank, test, k):
    return {"ji": metrics.jaccard_index(bank),
            "acc": metrics.recomposed_accuracy(bank, test, range(k))}


def _batch(group, k):
    """The sampled run's batch: full co-training's 32 for G = 1, else 32 * G * K / 10 examples
    (G at K = 10; the same rows per module at every K)."""
    return 32 if group == 1 else max(1, round(32 * group * k / 10))


def compare(name, model, data, test, k, epochs, seed, cand, log, control=False,
            loader="dataloader"):
    """cand = (r, G, L): the sampled run's ratio, batch group and learning-rate multiplier."""
    ratio, group, lr_scale = cand
    out = {"workload": name, "k": k, "decomp_examples": len(data), "epochs": epochs,
           "seed": seed, "ratio": ratio, "group": group, "lr_scale": lr_scale,
           "sampled_batch": _batch(group, k), "base_test_acc": evaluate(model, test)}
    modes = [("full", None, 32, 1.0), ("sampled", ratio, _batch(group, k), lr_scale)]
    if control and group != 1:
        modes.append(("full_same_batch", None, _batch(group, k), lr_scale))
    for mode, r, batch, scale in modes:
        bank, secs = _decompose(model, data, k, epochs, seed, r, batch, scale, loader)
        out[mode] = {"seconds": secs, "seconds_per_epoch": secs / epochs, "batch": batch,
                     "lr_scale": scale, **_quality(bank, test, k), "history": bank.history}
        log(f"{name} {mode} (batch {batch}): {secs / epochs:.2f} s/epoch, "
            f"JI {out[mode]['ji']:.3f}, acc {out[mode]['acc']:.4f}")
    out["speedup_per_epoch"] = out["full"]["seconds_per_epoch"] / out["sampled"][
        "seconds_per_epoch"]
    out["ji_diff"] = out["sampled"]["ji"] - out["full"]["ji"]
    out["acc_diff_points"] = 100 * (out["sampled"]["acc"] - out["full"]["acc"])
    return out


def choose(model, cands, decomp_set, val_set, args, log):
    """(r, G, L) for `model` (K = 10) on the validation set: of the candidates whose recomposed
    accuracy is within 0.5 point and JI within 0.03 of full co-training's, the one with the
    shortest run (the smallest r, G = L = 1, if none is). Returns (choice, record)."""
    val_runs = {}
    bank, full_secs = _decompose(model, decomp_set, 10, args.epochs, args.seed, None,
                                 loader=args.loader)
    full_q = {**_quality(bank, val_set, 10), "seconds": full_secs}
    for c in cands:
        r, g, scale = c
        bank, secs = _decompose(model, decomp_set, 10, args.epochs, args.seed, r, _batch(g, 10),
                                scale, args.loader)
        val_runs[c] = {**_quality(bank, val_set, 10), "seconds": secs}
        log(f"validation r={r} G={g} L={scale}: {val_runs[c]} (full {full_q})")
    ok = [c for c in cands if abs(val_runs[c]["ji"] - full_q["ji"]) <= 0.03
          and 100 * (full_q["acc"] - val_runs[c]["acc"]) <= 0.5]
    cand = (min(ok, key=lambda c: val_runs[c]["seconds"]) if ok
            else (min(c[0] for c in cands), 1.0, 1.0))
    name = ":".join
    log(f"chosen r = {cand[0]}, G = {cand[1]}, L = {cand[2]}")
    return cand, {"full": full_q,
                  "candidates": {name(map(str, c)): v for c, v in val_runs.items()},
                  "within_tolerance": [name(map(str, c)) for c in ok],
                  "chosen": name(map(str, cand))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/runs/sampled_negatives")
    ap.add_argument("--workloads", default="mnist,mnist2,cifar10")
    ap.add_argument("--ratios", default=None, help="r,... (G = 1); overrides --candidates")
    ap.add_argument("--candidates", default="1:1,3:1,1:5,3:2,1:3",
                    help="r:G[:L],... (L multiplies lr and graft_lr; default 1)")
    ap.add_argument("--ratio", type=float, default=None, help="skip the validation choice")
    ap.add_argument("--group", type=float, default=1.0, help="G with --ratio")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="L with --ratio")
    ap.add_argument("--per-workload", action="store_true",
                    help="FC2-FC4 choose their own (r, G, L) on their validation runs "
                         "(default: FC1's choice for every workload)")
    ap.add_argument("--control", action="store_true", help="also full co-training on the "
                    "sampled run's batches")
    ap.add_argument("--decomp", type=int, default=10000)
    ap.add_argument("--cifar-decomp", type=int, default=None,
                    help="CIFAR-10 decomposition examples (default --decomp / 5)")
    ap.add_argument("--base", type=int, default=20000)
    ap.add_argument("--val", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--base-epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loader", choices=("dataloader", "tensor"), default="dataloader",
                    help="both sides' loader: torch DataLoader (per-example collation) or "
                         "modsplit.TensorBatches (slices)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    log_path = os.path.join(args.out, "log.txt")

    def log(msg):
        line = f"[{time.time() - start:7.1f}s] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared VM), torch "
                          f"{torch.__version__}, {args.threads} torch thread(s)",
               "args": vars(args), "settings": SETTINGS, "runs": []}

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)

    workloads = args.workloads.split(",")
    mnist = load_dataset("mnist", "train")
    mnist_test = load_dataset("mnist", "test")
    base_set, val_set = _split(mnist, args.base, args.val)
    decomp_set = TensorDataset(*(t[:args.decomp] for t in base_set.tensors))
    models = {}
    need = ("fc1", "fc2", "fc3", "fc4") if "mnist" in workloads else ("fc1",) if args.ratio is None \
        else ()
    for name, factory in (("fc1", FC1), ("fc2", FC2), ("fc3", FC3), ("fc4", FC4)):
        if name not in need:
            continue
        torch.manual_seed(args.seed)
        models[name] = train_classifier(factory(), base_set, epochs=args.base_epochs,
                                        seed=args.seed, progress=False)
        log(f"base {name}: test acc {evaluate(models[name], mnist_test):.4f}")
    cand = (args.ratio, args.group, args.lr_scale)
    if args.ratio is None:  # choose (r, G, L) on validation data (FC1), never on test
        cands = ([(float(r), 1.0, 1.0) for r in args.ratios.split(",")] if args.ratios else
                 [tuple(float(v) for v in (c + ":1").split(":")[:3])
                  for c in args.candidates.split(",")])
        cand, results["choice"] = choose(models["fc1"], cands, decomp_set, val_set, args, log)
        save()
    log(f"r = {cand[0]}, G = {cand[1]}, L = {cand[2]}")
    if "mnist" in workloads:
        for name in ("fc1", "fc2", "fc3", "fc4"):
            own = cand
            if args.per_workload and args.ratio is None and name != "fc1":
                own, results.setdefault("choices", {})[name] = choose(
                    models[name], cands, decomp_set, val_set, args, log)
                save()
            results["runs"].append(compare(f"mnist {name}", models[name], decomp_set,
                                           mnist_test, 10, args.epochs, args.seed, own, log,
                                           args.control, args.loader))
            save()
    if "mnist2" in workloads:
        train2, test2 = load_dataset("mnist2", "train"), load_dataset("mnist2", "test")
        base2 = TensorDataset(*(t[:args.base] for t in train2.tensors))
        torch.manual_seed(args.seed)
        model2 = train_classifier(mnist2_fc(hidden=64), base2, epochs=args.base_epochs,
                                  lr=0.05, seed=args.seed, progress=False)
        log(f"base mnist2_fc: test acc {evaluate(model2, test2):.4f}")
        decomp2 = TensorDataset(*(t[:args.decomp] for t in base2.tensors))
        results["runs"].append(compare("mnist2 mnist2_fc(64)", model2, decomp2, test2, 100,
                                       max(1, args.epochs - 1), args.seed, cand, log,
                                       args.control, args.loader))
        save()
    if "cifar10" in workloads:
        train3, test3 = load_dataset("cifar10", "train"), load_dataset("cifar10", "test")
        base3 = TensorDataset(*(t[:args.base // 2] for t in train3.tensors))
        torch.manual_seed(args.seed)
        model3 = train_classifier(small_vgg(3, 10, 16), base3, epochs=max(1, args.base_epochs - 2),
                                  lr=0.05, seed=args.seed, progress=False)
        log(f"base small_vgg: test acc {evaluate(model3, test3):.4f}")
        decomp3 = TensorDataset(*(t[:args.cifar_decomp or args.decomp // 5]
                                  for t in base3.tensors))
        results["runs"].append(compare("cifar10 small_vgg(16)", model3, decomp3, test3, 10,
                                       max(1, args.epochs - 1), args.seed, cand, log,
                                       args.control, args.loader))
        save()
    results["wall_seconds"] = time.time() - start
    save()
    log("done")


if __name__ == "__main__":
    main()
