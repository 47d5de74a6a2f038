"""`modsplit reproduce figure4`: the paper's Figure 4 (conv nets) and the anchors' units.

For each seed: a base conv net is trained (or loaded from --out; --base-seed: one base model for
every seed, so that the seeds vary the decomposition alone), then decomposed once per
alpha of --alphas (k = --density) with the modules scored on the test set after every epoch
(the figure's curves: mean 2-class RPs ratio and mean 1:1 module accuracy per epoch) and saved
as bank_<dataset>_<model>_s<seed>_a<alpha>.msb in --out; a bank already there that was decomposed
from the same base model with the same DecomposeConfig is reused instead (a rerun after an
interruption redoes only what is missing). Each bank is then measured on the validation and the
test set:

- 10-class recomposed accuracy (vote of all modules) against the base model, with a 95% Wilson
  interval on the test set;
- 2-class recomposed accuracy, mean over the class pairs, against the base model's own 2-class
  accuracy on the same images (argmax over the pair's two logits);
- the module x class matrix (metrics.module_class_matrix, test set);
- the anchors' units (anchor_units): fraction of the maskable weights kept per module and per
  2-class composition, and kernel retention, the share of the k x k kernels (conv layers with
  kernels larger than 1 x 1) holding any kept weight, per module and per 2-class composition.

With --select-on validation the alpha to report is chosen on the validation set
(selection.select_candidate): the smallest mean 2-class RPs among the alphas whose 10-class
accuracy loses at most --tolerance (default 2 points) and whose 2-class accuracy loses at most
--tolerance-pair (default 1 point) against the base model on the validation set. The test set
is only used for the reported numbers.

--recipe names a full-scale setting of the paper (Tables 3 and 4) for a GPU machine with the
datasets in torchvision's layout (RECIPES); --estimate-only times --estimate-steps steps of base
training and of decomposition and writes the estimated time per epoch instead of running.
"""
import copy
import itertools
import json
import os
import time

import torch

from modsplit import memory, metrics, ops
from modsplit.app.data import mean_std, num_classes
from modsplit.app.models import (resnet20, resnet50, small_resnet, small_vgg, vgg16,
                                 vgg16_quarter, wide_resnet28_10)
from modsplit.app.runner import Run, _pct, base_cache_name
from modsplit.app.selection import select_candidate, wilson_interval
from modsplit.app.train import (evaluate, predict_logits, rand_augment, random_crop_flip,
                                train_classifier)
from modsplit.bank import ModuleBank
from modsplit.decompose import decompose
from modsplit.decompose_config import DecomposeConfig
from modsplit.errors import BankFileError

# {name: function(num_classes) -> nn.Module} of the conv nets figure4 runs.
CONV_MODELS = {
    "resnet20": lambda n: resnet20(n),
    "vgg16_quarter": lambda n: vgg16_quarter(n),
    "vgg16": lambda n: vgg16(n),
    "resnet50": lambda n: resnet50(n),
    "wide_resnet28_10": lambda n: wide_resnet28_10(n),
    "small_vgg": lambda n: small_vgg(3, n, width=8),
    "small_resnet": lambda n: small_resnet(3, n, width=8),
}

# Published anchors (CIFAR-10, VGG16-class models), in their own units.
ANCHORS = {
    "SeaM": "10.11% of the weights kept per target (binary) problem",
    "MwT": "14.58% kernel retention at -1.13 points of accuracy",
    "GradSplitter / CNNSplitter": "N class modules recomposed into an N-class model (compare "
                                  "with our 10-class recomposition against the base)",
}
SEAM_WEIGHTS_KEPT = 0.1011
MWT_KERNEL_RETENTION, MWT_ACC_LOSS = 0.1458, 0.0113

# Full-scale settings (paper's Table 3 for base training, Table 4 for decomposition; 5 trials;
# alpha chosen on a validation split of 5,000 training images). SVHN is not in Table 3: it gets
# the CIFAR-10 row, as the paper's text groups the two for augmentation. Decomposition epochs:
# 25, the length of the paper's Table 2 / Figure 3 runs.
_RECIPE_COMMON = dict(select_on="validation", seeds=[0, 1, 2, 3, 4], density=0.1)
RECIPES = {
    "vgg16-cifar10": dict(_RECIPE_COMMON, dataset="cifar10", models=["vgg16"], epochs_base=100,
                          base_lr=0.01, base_batch_size=64, milestones=None,
                          augment="crop-flip", lr=0.1, batch_size=32, epochs_decomp=25),
    "resnet50-svhn": dict(_RECIPE_COMMON, dataset="svhn", models=["resnet50"], epochs_base=100,
                          base_lr=0.01, base_batch_size=64, milestones=None,
                          augment="crop-flip", lr=0.1, batch_size=32, epochs_decomp=25),
    "wrn28-10-cifar100": dict(_RECIPE_COMMON, dataset="cifar100", models=["wide_resnet28_10"],
                              epochs_base=200, base_lr=0.1, base_batch_size=256,
                              milestones=[60, 120, 160], augment="randaugment", lr=0.01,
                              batch_size=512, epochs_decomp=25),
}
RECIPE_VALIDATION_SIZE = 5000


class ConvRun(Run):
    """Run for conv nets: base models from CONV_MODELS trained with the Table 3 recipe of the
    arguments (--base-lr, --base-batch-size, --milestones, --augment) on --device."""

    def base_training(self):
        """train_classifier's keyword arguments (besides model, data, epochs, seed)."""
        a = self.args
        aug = {"none": None, "crop-flip": random_crop_flip}.get(a.augment)
        if a.augment == "randaugment":
            aug = rand_augment(*mean_std(a.dataset), num_ops=2, magnitude=14)
        return dict(lr=a.base_lr, batch_size=a.base_batch_size, milestones=a.milestones,
                    gamma=0.2, augment=aug, device=self.device)

    def settings(self):
        record = super().settings()
        a = self.args
        record["base_training"] = {"optimizer": "sgd", "lr": a.base_lr, "momentum": 0.9,
                                   "nesterov": True, "weight_decay": 5e-4,
                                   "batch_size": a.base_batch_size, "milestones": a.milestones,
                                   "gamma": 0.2, "augment": a.augment}
        record.update(recipe=a.recipe, device=str(self.device), test_limit=a.test_limit,
                      base_seed=a.base_seed,
                      tolerance_pair=a.tolerance_pair)
        return record

    def base_model(self, name, seed=None):
        """Trained conv net `name` of `seed`: from the cache in --out, else trained (torch's
        global RNG seeded with the seed for the initial weights) and saved. Records its test
        (and validation) accuracy."""
        a = self.args
        seed = a.seed if seed is None else seed
        path = os.path.join(a.out, base_cache_name(a.dataset, name, "paper", a.epochs_base,
                                                   len(self.train), seed))
        torch.manual_seed(seed)
        model = CONV_MODELS[name](num_classes(a.dataset))
        if os.path.isfile(path):
            model.load_state_dict(torch.load(path, map_location="cpu"))
        else:
            start = time.time()
            train_classifier(model, self.train, epochs=a.epochs_base, seed=seed,
                             progress=False, **self.base_training())
            self.log(f"{name} seed {seed}: base trained in {time.time() - start:.0f} s")
            torch.save(model.state_dict(), path)
        model.to(self.device).eval()
        self.base_accuracy[f"{name}/s{seed}"] = evaluate(model, self.test, device=self.device)
        if self.val is not None:
            self.base_val_accuracy[f"{name}/s{seed}"] = evaluate(model, self.val,
                                                                 device=self.device)
        return model


@torch.no_grad()
def _confidences(bank, dataset, device):
    """(float [K, n] positive confidence of every module, int64 [n] labels) on `dataset`."""
    conf, labels = [], []
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=256):
        conf.append(bank.confidences(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(conf, 1), torch.cat(labels)


def composition_scores(conf, labels, base_logits, classes):
    """Recomposition accuracies from module confidences conf float [K, n] (row k: class
    classes[k]), labels int64 [n] and the base model's logits float [n, N]: {acc10 (vote of
    all K modules), base_acc10 (argmax of the base logits), acc10_ci (95% Wilson interval),
    acc2, base_acc2 (mean over the class pairs of the 2-class accuracy on the pair's images:
    modules' vote vs argmax over the base's two logits), acc2_min, acc2_loss_max (largest
    pair-wise loss against the base), n}; losses are fractions."""
    ids = torch.as_tensor(list(classes))
    acc10 = (ids[conf.argmax(0)] == labels).double().mean().item()
    base10 = (base_logits.argmax(1) == labels).double().mean().item()
    pairs, base_pairs = [], []
    for i, j in itertools.combinations(range(len(ids)), 2):
        keep = (labels == ids[i]) | (labels == ids[j])
        if not keep.any():
            continue
        y = labels[keep]
        pairs.append((ids[[i, j]][conf[[i, j]][:, keep].argmax(0)] == y).double().mean().item())
        base_pred = ids[[i, j]][base_logits[keep][:, ids[[i, j]]].argmax(1)]
        base_pairs.append((base_pred == y).double().mean().item())
    n = len(labels)
    return {"acc10": acc10, "base_acc10": base10,
            "acc10_ci": wilson_interval(round(acc10 * n), n),
            "acc2": sum(pairs) / len(pairs), "base_acc2": sum(base_pairs) / len(base_pairs),
            "acc2_min": min(pairs),
            "acc2_loss_max": max(b - p for p, b in zip(pairs, base_pairs)), "n": n}


def _pair_union_mean(kept):
    """Mean over module pairs of |A_i ∪ A_j| from a float [K, E] 0/1 matrix of kept items."""
    g = kept @ kept.T
    k = len(g)
    pairs = list(itertools.combinations(range(k), 2)) or [(0, 0)]
    return sum((g[i, i] + g[j, j] - g[i, j]).item() for i, j in pairs) / len(pairs)


def anchor_units(bank):
    """The anchors' units of a bank: {weights_module (fraction of the maskable weights one
    module keeps, mean over modules), weights_pair (same for the union of two modules, mean over
    pairs: the 2-class RPs ratio), kernels_module, kernels_pair (kernel retention: share of the
    k x k kernels, k > 1, of the conv layers with at least one kept weight), kernels_total}."""
    masks, shapes = bank.masks(), bank.weight_shapes()
    total = metrics.maskable_count(masks, shapes)
    g = metrics.intersections(masks).double()
    k = len(g)
    pairs = list(itertools.combinations(range(k), 2)) or [(0, 0)]
    weights_pair = sum((g[i, i] + g[j, j] - g[i, j]).item() for i, j in pairs) / len(pairs)
    kernels, n_kernels = None, 0
    for name, packed in masks.items():
        shape = shapes[name]
        if len(shape) != 4 or shape[2] * shape[3] == 1:
            continue
        bits = ops.unpack_mask(packed, (k, shape[0], shape[1] * shape[2] * shape[3]))
        kept = bits.view(k, shape[0] * shape[1], shape[2] * shape[3]).any(-1).float().cpu()
        kernels = kept if kernels is None else torch.cat([kernels, kept], 1)
        n_kernels += shape[0] * shape[1]
    out = {"weights_module": g.diagonal().mean().item() / total,
           "weights_pair": weights_pair / total, "kernels_total": n_kernels}
    if kernels is not None:
        out.update(kernels_module=kernels.sum(1).mean().item() / n_kernels,
                   kernels_pair=_pair_union_mean(kernels) / n_kernels)
    return out


def _measure(bank, run, base, device):
    """Validation and test scores of a bank (composition_scores), its anchor units and its
    test module x class matrix."""
    out = {}
    for split, data in (("val", run.val), ("test", run.test)):
        if data is None:
            continue
        conf, labels = _confidences(bank, data, device)
        logits = predict_logits(base, data, device=device)
        out[split] = composition_scores(conf, labels, logits, bank.classes)
    out["units"] = anchor_units(bank)
    out["matrix"] = metrics.module_class_matrix(bank, run.test).tolist()
    return out


def estimate(run, name, seed):
    """Time --estimate-steps steps of base training and of decomposition (after one warm-up
    step each) on --device; returns seconds per step and estimated seconds per epoch. The
    decomposition step is timed with --estimate-modules modules (default all; the first classes
    present in the timed images) and scaled linearly to all classes (its cost grows linearly
    with the number of modules)."""
    a = run.args
    steps, n_cls = a.estimate_steps, num_classes(a.dataset)
    torch.manual_seed(seed)
    model = CONV_MODELS[name](n_cls)
    kw = run.base_training()

    def timed(fn):
        fn(1)  # warm-up (kernel selection, allocation)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.time()
        fn(steps)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.time() - start) / steps

    def base_steps(n):
        data = torch.utils.data.Subset(run.train, range(min(len(run.train), n * a.base_batch_size)))
        train_classifier(model, _tensors(data), epochs=1, seed=seed, progress=False, **kw)

    base_step = timed(base_steps)
    model.eval()

    def decomp_steps(n):
        data = _tensors(torch.utils.data.Subset(run.train,
                                                range(min(len(run.train), n * a.batch_size))))
        present = data.tensors[1].unique().tolist()
        loader = torch.utils.data.DataLoader(data, batch_size=a.batch_size)
        cfg = run.decompose_config(a.alpha, epochs=1, seed=seed)
        decompose(copy.deepcopy(model), loader, n_cls, cfg,
                  classes=tuple(present[:a.estimate_modules or n_cls]), progress=False,
                  device=run.device, check_memory=False)

    modules = min(a.estimate_modules or n_cls, n_cls)
    decomp_step = timed(decomp_steps) * n_cls / modules
    mem = memory.estimate_decompose_memory(model, n_cls, "sgd-momentum", a.batch_size,
                                           tuple(run.train.tensors[0].shape[1:]))
    base_per_epoch = -(-len(run.train) // a.base_batch_size)
    decomp_per_epoch = -(-len(run.decomp_set()) // a.batch_size)
    return {"steps_timed": steps, "modules_timed": modules,
            "base_step_s": base_step, "base_steps_per_epoch": base_per_epoch,
            "base_epoch_s": base_step * base_per_epoch,
            "decomp_step_s": decomp_step, "decomp_steps_per_epoch": decomp_per_epoch,
            "decomp_epoch_s": decomp_step * decomp_per_epoch,
            "decomp_memory_gb": mem["total"] / 2 ** 30,
            "total_s": base_step * base_per_epoch * a.epochs_base
            + decomp_step * decomp_per_epoch * a.epochs_decomp * len(a.alphas)}


def _tensors(subset):
    """A Subset of a TensorDataset as a TensorDataset (x [n, ...], y [n])."""
    idx = torch.as_tensor(list(subset.indices))
    return torch.utils.data.TensorDataset(*(t[idx] for t in subset.dataset.tensors))


def run_figure4(args):
    """Figure 4 on conv nets: per-epoch mean 2-class RPs ratio and module accuracy for each
    alpha, recomposition accuracies against the base model, the module x class matrix and the
    anchors' units (SeaM, MwT, GradSplitter)."""
    run = ConvRun("figure4", args)
    if args.estimate_only:
        results = {name: estimate(run, name, args.seed) for name in args.models}
        lines = [f"Estimated cost on {run.device} ({args.recipe or 'arguments'}):", "",
                 "| model | base s/step | base s/epoch | decomp s/step | decomp s/epoch | "
                 "decomp memory GiB | total h (one seed) |", "|---|---|---|---|---|---|---|"]
        for name, e in results.items():
            lines.append(f"| {name} | {e['base_step_s']:.3f} | {e['base_epoch_s']:.0f} | "
                         f"{e['decomp_step_s']:.3f} | {e['decomp_epoch_s']:.0f} | "
                         f"{e['decomp_memory_gb']:.1f} | {e['total_s'] / 3600:.1f} |")
        return run.save(f"figure4_estimate_{args.dataset}", "\n".join(lines), results)
    seeds = args.seeds or [args.seed]
    results = {}
    for name in args.models:
        for seed in seeds:
            base = run.base_model(name, seed if args.base_seed is None else args.base_seed)
            for alpha in args.alphas:
                config = run.decompose_config(alpha, seed=seed)
                bank_file = f"bank_{args.dataset}_{name}_s{seed}_a{alpha:g}.msb"
                path = os.path.join(args.out, bank_file)
                start, bank = time.time(), saved_bank(path, base, config, run.device)
                wall = None
                if bank is None:
                    bank = run.decompose(base, config, eval_set=run.test)
                    wall = round(time.time() - start, 1)
                    bank.save(path)
                else:
                    run.log(f"{name} s{seed} alpha {alpha:g}: bank reused from {bank_file}")
                r = {"model": name, "seed": seed, "alpha": alpha,
                     "decompose_config": config.to_dict(), "decompose_s": wall,
                     "bank_reused": wall is None, "history": bank.history,
                     "bank_file": bank_file, **_measure(bank, run, base, run.device)}
                results[f"{name},s{seed},{alpha:g}"] = r
                t = r["test"]
                run.log(f"{name} s{seed} alpha {alpha:g}: rps {bank.history[-1]['rps_pair']:.4f}"
                        f" acc10 {t['acc10']:.4f} (base {t['base_acc10']:.4f}) acc2 "
                        f"{t['acc2']:.4f} (base {t['base_acc2']:.4f})")
            if run.val is not None:
                _select(run, results, name, seed)
    return _report(run, results)


def saved_bank(path, base, config, device):
    """The bank at `path` when it is a bank of `base` decomposed with exactly `config` (its
    recorded DecomposeConfig), on `device`; None when there is none or it differs (then the
    decomposition runs again and overwrites it)."""
    if not os.path.isfile(path):
        return None
    try:
        bank = ModuleBank.load(path, base)
    except (BankFileError, ValueError):
        return None
    want = DecomposeConfig.build(config, bank.num_classes).to_dict()
    same = json.dumps(bank.config, sort_keys=True) == json.dumps(want, sort_keys=True)
    return bank.to(device) if same else None


def _select(run, results, name, seed):
    """Choose the alpha of (name, seed) on the validation set; stores the record under
    results[f"{name},s{seed},selection"]."""
    a = run.args
    keys = [f"{name},s{seed},{alpha:g}" for alpha in a.alphas]
    candidates = [{"alpha": results[k]["alpha"],
                   "neg_rps_pair": -results[k]["units"]["weights_pair"],
                   "acc10_loss": results[k]["val"]["base_acc10"] - results[k]["val"]["acc10"],
                   "acc2_loss": results[k]["val"]["base_acc2"] - results[k]["val"]["acc2"]}
                  for k in keys]
    chosen, rule = select_candidate(candidates, "neg_rps_pair",
                                    {"acc10": a.tolerance, "acc2": a.tolerance_pair})
    results[f"{name},s{seed},selection"] = {"chosen_alpha": candidates[chosen]["alpha"],
                                            "rule": rule, "candidates": candidates}
    run.log(f"{name} s{seed}: validation chose alpha {candidates[chosen]['alpha']:g} ({rule})")


def _plots(run, results):
    """figure4_<dataset>_<model>.png (per-epoch curves) and ..._front.png (RPs / kernel
    retention against accuracy loss, with the anchors) per model, in --out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = run.args
    for name in a.models:
        rows = [r for r in results.values() if r.get("model") == name]
        fig, axes = plt.subplots(2, 1, figsize=(5, 6), sharex=True)
        for alpha in a.alphas:
            hs = [r["history"] for r in rows if r["alpha"] == alpha]
            epochs = [h["epoch"] for h in hs[0]]
            rps = torch.tensor([[h["rps_pair"] for h in hist] for hist in hs])
            acc = torch.tensor([[sum(h["eval_module_acc"]) / len(h["eval_module_acc"])
                                 for h in hist] for hist in hs])
            for ax, v in ((axes[0], rps), (axes[1], acc)):
                ax.plot(epochs, v.mean(0), marker=".", label=f"k={a.density:g}, α={alpha:g}")
                if len(hs) > 1:
                    ax.fill_between(epochs, v.mean(0) - v.std(0), v.mean(0) + v.std(0),
                                    alpha=0.2)
        axes[0].axhline(a.density, linestyle=":", color="gray")
        axes[0].set_title(f"{a.dataset} {name}")
        axes[0].set_ylabel("2-class RPs ratio")
        axes[1].set_ylabel("module test acc (1:1)")
        axes[1].set_xlabel("epoch")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, f"figure4_{a.dataset}_{name}.png"), dpi=100)
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for r in rows:
            t, u = r["test"], r["units"]
            axes[0].scatter(u["weights_pair"], 100 * (t["base_acc2"] - t["acc2"]), color="C0")
            axes[0].annotate(f"α={r['alpha']:g}", (u["weights_pair"],
                                                   100 * (t["base_acc2"] - t["acc2"])), fontsize=7)
            if "kernels_module" in u:
                axes[1].scatter(u["kernels_module"], 100 * (t["base_acc10"] - t["acc10"]),
                                color="C0")
                axes[1].annotate(f"α={r['alpha']:g}", (u["kernels_module"],
                                                       100 * (t["base_acc10"] - t["acc10"])),
                                 fontsize=7)
        axes[0].axvline(SEAM_WEIGHTS_KEPT, color="C3", linestyle="--", label="SeaM 10.11%")
        axes[0].axvline(0.15, color="gray", linestyle=":", label="goal RPs 0.15")
        axes[0].axhline(1, color="gray", linestyle=":", label="goal loss 1 point")
        axes[0].set_xlabel("weights kept, 2-class composition")
        axes[0].set_ylabel("2-class accuracy loss vs base (points)")
        axes[1].scatter([MWT_KERNEL_RETENTION], [100 * MWT_ACC_LOSS], color="C3", marker="*",
                        s=120, label="MwT 14.58%, -1.13")
        axes[1].axhline(2, color="gray", linestyle=":", label="goal loss 2 points")
        axes[1].set_xlabel("kernel retention per module")
        axes[1].set_ylabel("10-class accuracy loss vs base (points)")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.suptitle(f"{a.dataset} {name}: test set, one point per (seed, α)", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, f"figure4_{a.dataset}_{name}_front.png"), dpi=100)
        plt.close(fig)


def _seed_means(results):
    """Markdown lines: per (model, α) with more than one seed, the mean ± std over the seeds of
    the test-set numbers of the per-seed table (empty when every cell has one seed)."""
    cells = {}
    for r in results.values():
        if "alpha" in r and "test" in r:
            cells.setdefault((r["model"], r["alpha"]), []).append(r)
    if all(len(rows) < 2 for rows in cells.values()):
        return []

    def stat(rows, get, scale=1.0):
        v = torch.tensor([scale * get(r) for r in rows], dtype=torch.float64)
        digits = 2 if scale > 1 else 4
        mean = f"{v.mean().item():.{digits}f}"
        return f"{mean} ± {v.std().item():.{digits}f}" if len(v) > 1 else mean

    lines = ["", "Mean ± std over the seeds (test set; std over seeds, n - 1):", "",
             "| model | α | seeds | 2-class RPs | kernels kept per module | acc10 % | "
             "base acc10 % | acc2 % | base acc2 % |", "|---|---|---|---|---|---|---|---|---|"]
    for (model, alpha), rows in sorted(cells.items()):
        lines.append(
            f"| {model} | {alpha:g} | {len(rows)} | {stat(rows, lambda r: r['units']['weights_pair'])}"
            f" | {stat(rows, lambda r: r['units'].get('kernels_module', float('nan')))} | "
            f"{stat(rows, lambda r: r['test']['acc10'], 100)} | "
            f"{stat(rows, lambda r: r['test']['base_acc10'], 100)} | "
            f"{stat(rows, lambda r: r['test']['acc2'], 100)} | "
            f"{stat(rows, lambda r: r['test']['base_acc2'], 100)} |")
    return lines


def _report(run, results):
    """Plots, Markdown tables and the output files."""
    a = run.args
    _plots(run, results)
    lines = [f"Figure 4 ({a.dataset}, k = {a.density}, {a.epochs_decomp} decomposition epochs "
             f"on {len(run.decomp_set())} images; test set of {len(run.test)} images, 95% "
             "Wilson intervals): last-epoch values per (model, seed, α). acc10: 10-class "
             "recomposition; acc2: 2-class recompositions, mean over pairs, beside the base "
             "model's 2-class accuracy (argmax over the two logits) on the same images.", "",
             "| model | seed | α | 2-class RPs | kernels kept (module / pair) | module acc % | "
             "acc10 % [95% CI] | base acc10 % | acc2 % | base acc2 % | worst pair loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in results.values() if "alpha" in r and "test" in r):
        t, u, last = r["test"], r["units"], r["history"][-1]
        lo, hi = t["acc10_ci"]
        lines.append(
            f"| {r['model']} | {r['seed']} | {r['alpha']:g} | {u['weights_pair']:.4f} | "
            f"{u.get('kernels_module', float('nan')):.4f} / "
            f"{u.get('kernels_pair', float('nan')):.4f} | "
            f"{_pct(sum(last['eval_module_acc']) / len(last['eval_module_acc']))} | "
            f"{_pct(t['acc10'])} [{_pct(lo)}, {_pct(hi)}] | {_pct(t['base_acc10'])} | "
            f"{_pct(t['acc2'])} | {_pct(t['base_acc2'])} | {100 * t['acc2_loss_max']:.2f} |")
    lines += _seed_means(results)
    for key, sel in results.items():
        if key.endswith("selection"):
            lines += ["", f"{key.rsplit(',', 1)[0]}: validation chose α = "
                          f"{sel['chosen_alpha']:g} ({sel['rule']})."]
    lines += ["", "Anchors (published, CIFAR-10): " + "; ".join(
        f"{k}: {v}" for k, v in ANCHORS.items()) + "."]
    return run.save(f"figure4_{a.dataset}", "\n".join(lines), results)


def add_figure4_arguments(p):
    """figure4's own arguments on its argparse parser `p` (the shared ones are added by
    reproduce)."""
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="full-scale setting of the paper (Tables 3/4) for a GPU machine; "
                        "replaces dataset, models, epochs, learning rates, batch sizes, "
                        "augmentation and the validation size")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="comma-separated seeds (default: --seed alone)")
    p.add_argument("--base-seed", type=int, default=None,
                   help="decompose the base model of this seed for every seed of --seeds "
                        "(default: each seed trains and decomposes its own base model)")
    p.add_argument("--base-lr", type=float, default=0.01, help="base training lr (Table 3)")
    p.add_argument("--base-batch-size", type=int, default=64,
                   help="base training batch size (Table 3)")
    p.add_argument("--milestones", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="base training epochs at which the lr is multiplied by 0.2")
    p.add_argument("--augment", default="crop-flip", choices=("none", "crop-flip",
                                                                "randaugment"),
                   help="base training augmentation (randaugment: N=2, M=14, then crop-flip)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="use the first N test images (tests of the command)")
    p.add_argument("--tolerance-pair", type=float, default=0.01,
                   help="with --select-on validation: largest 2-class validation accuracy loss")
    p.add_argument("--estimate-only", action="store_true",
                   help="time --estimate-steps steps of base training and decomposition, write "
                        "the estimated time per epoch and stop")
    p.add_argument("--estimate-steps", type=int, default=5)
    p.add_argument("--estimate-modules", type=int, default=None,
                   help="modules in the timed decomposition steps (scaled to all classes)")


def apply_recipe(args):
    """Replace the arguments a --recipe fixes (RECIPES) in the parsed namespace, in place; its
    validation set is RECIPE_VALIDATION_SIZE images unless --validation-size is given."""
    if args.recipe:
        for key, value in RECIPES[args.recipe].items():
            setattr(args, key, value)
        args.validation_size = args.validation_size or RECIPE_VALIDATION_SIZE
    return args
