"""Reproduce the seed paper's tables and figure: `modsplit reproduce <table1|table2|table5|table6|
figure3> ...` (also `python -m modsplit.app.reproduce <command> ...`).

Every command trains the base FC models (or loads them from the output folder, where they are
cached per dataset, model, epochs, limit and seed), decomposes them with module stemming, prints a
Markdown table with the paper's numbers beside ours and writes `<out>/<name>.md` and
`<out>/<name>.json` (figure3 also writes `<out>/<name>.png`). Both outputs record the settings
(seed, epochs, limits, alpha, density) and the wall time and machine.

Decomposition follows the paper's Table 4 (SGD, Nesterov momentum 0.9, lr 0.1, batch 32, p = 1)
with decompose()'s cosine learning-rate decay and density k = 0.1 unless told otherwise; base
training follows Table 3 (lr 0.01, batch 64). Epoch counts and training-set limits are
arguments because the paper's 100 base epochs and 25-50 decomposition epochs on full sets do not
fit a CPU budget: the outputs say what was run.

`--base-protocol pan-rajan` builds base models the way Pan & Rajan (FSE 2020) built theirs, so
that their baselines and module stemming can be compared on such models: every image of the run
(train, decomposition and test sets) is divided by 255 once more, mimicking their Keras loader,
which scales pixels twice (skimage's resize already maps uint8 to [0, 1], then /255), so the nets
see inputs in [0, 1/255]; base models start from Glorot-uniform weights and zero biases and are
trained with Adam (lr 1e-3, eps 1e-7, no weight decay), batch 32, for --epochs-base epochs (50
in their script). `paper` (default) is the seed paper's Table 3 training on [0, 1] inputs.
"""
import argparse
import itertools
import os
import statistics
import sys

import torch

from modsplit import metrics, ops
from modsplit.app import figure4
from modsplit.app.baselines import decompose_pan_rajan, value_set_jaccard
# The runner's shared steps, also reachable as reproduce.<name> (as before they moved there).
from modsplit.app.runner import (BASE_PROTOCOLS, MODELS, Run, _pct, base_cache_name,
                                 base_training_kwargs, base_training_settings, dead_units,
                                 protocol_inputs)
from modsplit.app.selection import select_candidate
from modsplit.decompose_config import DecomposeConfig
from modsplit.layers import SCORE_INITS
from modsplit.module_norm import BATCHNORM_MODES
from modsplit.errors import ModsplitError

BASELINES = ("ti-i", "ti-sne", "cm-rie")
NUM_CLASSES = 10

# The paper's Table 1 (k = 10%): {dataset: {method: {model: (JI, recomposed accuracy %)}}}.
PAPER_TABLE1 = {
    "mnist": {
        "ti-i": {"fc1": (0.47, 94.91), "fc2": (0.64, 96.83), "fc3": (0.44, 69.19),
                 "fc4": (0.53, 96.44)},
        "ti-sne": {"fc1": (0.47, 94.91), "fc2": (0.65, 96.83), "fc3": (0.45, 96.30),
                   "fc4": (0.55, 96.79)},
        "cm-rie": {"fc1": (0.43, 94.90), "fc2": (0.63, 96.82), "fc3": (0.43, 96.33),
                   "fc4": (0.53, 96.75)},
        "stemming": {"fc1": (0.60, 96.47), "fc2": (0.71, 95.92), "fc3": (0.67, 96.61),
                     "fc4": (0.67, 96.75)},
    },
    "fmnist": {
        "ti-i": {"fc1": (0.78, 85.82), "fc2": (0.64, 87.58), "fc3": (0.52, 77.55),
                 "fc4": (0.56, 87.51)},
        "ti-sne": {"fc1": (0.78, 85.82), "fc2": (0.65, 87.58), "fc3": (0.53, 87.09),
                   "fc4": (0.57, 87.79)},
        "cm-rie": {"fc1": (0.75, 85.85), "fc2": (0.63, 87.56), "fc3": (0.51, 87.10),
                   "fc4": (0.55, 87.95)},
        "stemming": {"fc1": (0.72, 84.63), "fc2": (0.67, 85.44), "fc3": (0.66, 86.30),
                     "fc4": (0.75, 86.42)},
    },
}

# The paper's Table 2 (MNIST FC1, k = 10%, alpha = 1, epoch 25): {(initial score sharing,
# stemming loss): (avg, best, worst) ratio of RPs over the 2-class recompositions}.
PAPER_TABLE2 = {(False, False): (0.175, 0.159, 0.185), (True, False): (0.173, 0.159, 0.183),
                (False, True): (0.122, 0.117, 0.126), (True, True): (0.122, 0.116, 0.126)}

# The paper's Table 5 (MNIST, k = 10%): max test accuracy (%) of each module (rows 0-9), columns
# FC1..FC4 x alpha in (0, 0.05, 0.1).
_PAPER_TABLE5_ROWS = """
99.5 99.63 99.58 99.66 99.68 99.68 99.67 99.67 99.67 99.43 99.68 99.67
99.7 99.73 99.68 99.67 99.62 99.7 99.75 99.71 99.74 99.61 99.74 99.72
99.06 98.97 98.9 99.19 99.18 99.14 99.2 99.21 99.23 98.87 99.12 99.14
98.45 98.63 98.58 98.93 99.05 98.79 98.82 98.73 98.91 97.94 98.75 98.9
99.24 99.22 99.2 99.22 99.30 99.28 99.36 99.26 99.16 98.47 99.06 99.16
98.73 98.83 98.78 99.02 98.98 98.73 98.86 98.74 98.75 98.22 99.00 98.88
99.44 99.45 99.45 99.48 99.49 99.41 99.47 99.37 99.38 99.19 99.42 99.44
98.9 98.74 98.91 98.95 99.02 98.96 99.01 99.02 99.12 98.51 98.97 98.97
98.06 98.18 98.54 98.39 98.31 98.51 98.42 98.59 98.5 97.67 98.66 98.62
98.77 98.76 98.83 98.77 98.74 98.75 98.87 98.93 98.99 98.1 99.04 99.00
"""
PAPER_TABLE5_ALPHAS = (0.0, 0.05, 0.1)
PAPER_TABLE5 = {
    (model, alpha): [float(row.split()[3 * m + a]) for row in _PAPER_TABLE5_ROWS.split("\n")
                     if row.strip()]
    for m, model in enumerate(MODELS) for a, alpha in enumerate(PAPER_TABLE5_ALPHAS)}

# The paper's Table 6 (MNIST FC1): diagonal (module c on class c, %) per density k, and the
# range of its off-diagonal entries.
PAPER_TABLE6_DIAGONAL = {
    0.05: (98.48, 98.38, 96.71, 92.43, 96.28, 92.42, 97.99, 94.21, 91.39, 96.11),
    0.1: (98.76, 99.60, 97.31, 95.22, 98.31, 96.52, 98.48, 95.61, 91.89, 96.67),
    0.2: (98.72, 99.24, 96.97, 94.46, 97.66, 94.76, 98.08, 97.53, 93.18, 96.49),
}
PAPER_TABLE6_OFF_DIAGONAL = (43.7, 46.6)


def bool_mask_jaccard(masks):
    """Mean pairwise mask JI of {layer: bool [K, O, I]} masks (edge positions), computed by the
    same metric as the stemming banks' (metrics.mask_jaccard on packed masks)."""
    return metrics.mask_jaccard({n: ops.pack_mask(m.contiguous(), 1) for n, m in masks.items()})


def pair_rps(bank):
    """RPs ratio of every 2-class recomposition: {(i, j): ratio} over the 45 pairs."""
    return {pair: metrics.remaining_params_ratio(bank, pair)
            for pair in itertools.combinations(bank.classes, 2)}


def _num(v):
    return "–" if v is None else f"{v:.3f}"


# ---------------------------------------------------------------------------------------------
# Commands

def _table1_runs(run, name, seed):
    """{method: result} of one base model (trained with `seed`) for Table 1."""
    args = run.args
    model = run.base_model(name, seed)
    run.log(f"{name} seed {seed}: base test accuracy "
            f"{run.base_accuracy[f'{name}/s{seed}']:.4f}")
    out = {}
    if "stemming" in args.methods:
        bank, config, selection = _stemming_for_table1(run, model, name, seed)
        out["stemming"] = {"ji": metrics.jaccard_index(bank),
                           "acc": metrics.recomposed_accuracy(bank, run.test, range(NUM_CLASSES)),
                           "alpha": config.alpha, "decompose_config": config.to_dict(),
                           "history": bank.history}
        if selection is not None:
            out["stemming"]["selection"] = selection
        run.log(f"{name} seed {seed}: stemming {out['stemming']['ji']:.3f} JI, "
                f"{out['stemming']['acc']:.4f} acc")
    for method in (m for m in BASELINES if m in args.methods):
        try:
            mods = decompose_pan_rajan(model, run.train, method)
        except ValueError as e:  # a class without a confident positive (weak base model)
            out[method] = {"ji": None, "value_ji": None, "acc": None, "error": str(e)}
            continue
        out[method] = {"ji": bool_mask_jaccard(mods.masks()),
                       "value_ji": value_set_jaccard(mods), "acc": mods.accuracy(run.test)}
        run.log(f"{name} seed {seed}: {method} {out[method]}")
    return out


def _stemming_for_table1(run, model, name, seed):
    """(bank, its DecomposeConfig, selection record or None) of Table 1's stemming cell.

    --select-on test: one decomposition with --alpha. --select-on validation: one per candidate
    of --alphas, and the bank kept is the one selection.select_candidate picks on the validation
    set: highest mask JI among the candidates whose 10-class recomposed validation accuracy is
    within --tolerance of the base model's validation accuracy. The record lists every
    candidate's validation JI and accuracy; the test set is not looked at."""
    args = run.args
    if run.val is None:
        config = run.decompose_config(args.alpha, seed=seed)
        return run.decompose(model, config), config, None
    base_val = run.base_val_accuracy[f"{name}/s{seed}"]
    banks, candidates = [], []
    for alpha in args.alphas:
        config = run.decompose_config(alpha, seed=seed)
        bank = run.decompose(model, config)
        val_acc = metrics.recomposed_accuracy(bank, run.val, range(NUM_CLASSES))
        banks.append((bank, config))
        candidates.append({"alpha": alpha, "ji": metrics.jaccard_index(bank),
                           "val_acc": val_acc, "acc_loss": base_val - val_acc})
        run.log(f"{name} seed {seed} alpha {alpha}: validation JI {candidates[-1]['ji']:.3f}, "
                f"acc {val_acc:.4f} (base {base_val:.4f})")
    chosen, rule = select_candidate(candidates, "ji", {"acc": args.tolerance})
    selection = {"chosen_alpha": args.alphas[chosen], "rule": rule,
                 "base_val_acc": base_val, "candidates": candidates}
    return (*banks[chosen], selection)


def _mean_std(runs, key):
    """(mean, sample std or None for one run) of runs[i][key] over the runs where it is set;
    (None, None) when it is set in none."""
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _cell(mean, std, fmt):
    if mean is None:
        return "–"
    return fmt(mean) + ("" if std is None else " ± " + fmt(std))


def run_table1(args):
    """Table 1: mask JI and 10-class recomposed accuracy of module stemming and the three
    Pan & Rajan baselines per model (plus the baselines' value-set JI, their published kind),
    averaged over --seeds (one base model and one decomposition per seed; ± sample std)."""
    run = Run("table1", args)
    paper = PAPER_TABLE1.get(args.dataset, {})
    seeds = args.seeds or [args.seed]
    per_seed = {name: {seed: _table1_runs(run, name, seed) for seed in seeds}
                for name in args.models}
    results = {}
    for name, by_seed in per_seed.items():
        results[name] = {}
        for method in next(iter(by_seed.values())):
            runs = [dict(by_seed[s][method], seed=s) for s in seeds]
            summary = {"runs": runs}
            for key in ("ji", "value_ji", "acc"):
                summary[key], summary[f"{key}_std"] = _mean_std(runs, key)
            results[name][method] = summary
    what = f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    how = (f"alpha = {args.alpha}" if run.val is None else
           f"alpha chosen per model and seed on the validation set from {args.alphas} "
           f"(highest JI with recomposed accuracy within {100 * args.tolerance:g} points of the "
           f"base model's)")
    lines = [f"Table 1 ({args.dataset}, k = {args.density}, {how}, {what}): mask "
             "JI over edge positions, value-set JI (Pan & Rajan's published kind, baselines "
             "only) and 10-class recomposed test accuracy (%); the paper's numbers beside ours.",
             "", "| method | model | α | JI (ours) | JI (paper) | value-set JI | acc % (ours) | "
             "acc % (paper) |", "|---|---|---|---|---|---|---|---|"]
    for method in (m for m in BASELINES + ("stemming",) if m in args.methods):
        for name in args.models:
            r = results[name][method]
            ji_p, acc_p = paper.get(method, {}).get(name, (None, None))
            alphas = "/".join(f"{x['alpha']:g}" for x in r["runs"] if "alpha" in x) or "–"
            lines.append(
                f"| {method} | {name.upper()} | {alphas} | {_cell(r['ji'], r['ji_std'], _num)} | "
                f"{'–' if ji_p is None else f'{ji_p:.2f}'} | "
                f"{_cell(r['value_ji'], r['value_ji_std'], _num)} | "
                f"{_cell(r['acc'], r['acc_std'], _pct)} | "
                f"{'–' if acc_p is None else f'{acc_p:.2f}'} |")
    return run.save(f"table1_{args.dataset}", "\n".join(lines), results)


def run_table2(args):
    """Table 2: initial score sharing x stemming loss (alpha vs 0) -> avg / best / worst RPs ratio
    of the 45 two-class recompositions (FC1 by default)."""
    run = Run("table2", args)
    model = run.base_model(args.models[0])
    results = {}
    for shared, stem in itertools.product((False, True), (False, True)):
        config = run.decompose_config(args.alpha if stem else 0.0, shared_init=shared)
        bank = run.decompose(model, config)
        ratios = list(pair_rps(bank).values())
        results[f"shared={shared},stem={stem}"] = {
            "shared_init": shared, "stemming": stem, "decompose_config": config.to_dict(),
            "avg": sum(ratios) / len(ratios),
            "best": min(ratios), "worst": max(ratios), "pairs": len(ratios),
            "ji": metrics.jaccard_index(bank), "history": bank.history}
        run.log(f"shared {shared} stem {stem}: {results[f'shared={shared},stem={stem}']['avg']}")
    lines = [f"Table 2 ({args.dataset} {args.models[0].upper()}, k = {args.density}, alpha = "
             f"{args.alpha}, epoch {args.epochs_decomp}): ratio of RPs of the 2-class "
             "recompositions; paper (epoch 25) beside.", "",
             "| initial score sharing | stemming loss | avg | best | worst | paper avg | "
             "paper best | paper worst |", "|---|---|---|---|---|---|---|---|"]
    for r in results.values():
        p = PAPER_TABLE2[(r["shared_init"], r["stemming"])]
        lines.append(f"| {'X' if r['shared_init'] else ''} | {'X' if r['stemming'] else ''} | "
                     f"{r['avg']:.3f} | {r['best']:.3f} | {r['worst']:.3f} | {p[0]:.3f} | "
                     f"{p[1]:.3f} | {p[2]:.3f} |")
    return run.save(f"table2_{args.dataset}_{args.models[0]}", "\n".join(lines), results)


def run_table5(args):
    """Table 5: maximum over the decomposition epochs of each module's test accuracy (1:1
    balanced, %) per model and alpha, as in the paper (evaluated after every epoch through
    decompose's eval_set); the accuracy after the last epoch is kept in the JSON beside it."""
    run = Run("table5", args)
    results = {}
    for name in args.models:
        model = run.base_model(name)
        for alpha in args.alphas:
            config = run.decompose_config(alpha)
            bank = run.decompose(model, config, eval_set=run.test)
            per_epoch = [r["eval_module_acc"] for r in bank.history]
            accs = [max(col) for col in zip(*per_epoch)]
            results[f"{name},{alpha}"] = {"model": name, "alpha": alpha, "module_acc": accs,
                                         "decompose_config": config.to_dict(),
                                         "avg": sum(accs) / len(accs),
                                         "best_epoch": [col.index(max(col)) + 1
                                                        for col in zip(*per_epoch)],
                                         "last_epoch_module_acc": per_epoch[-1],
                                         "history": bank.history}
            run.log(f"{name} alpha {alpha}: avg {results[f'{name},{alpha}']['avg']:.4f}")
    cols = list(results.values())
    lines = [f"Table 5 ({args.dataset}, k = {args.density}): maximum over {args.epochs_decomp} "
             "epochs of each module's test accuracy (%) on its 1:1 balanced task; paper (max "
             "over 50 epochs) in brackets.", "",
             "| module | " + " | ".join(f"{c['model'].upper()} α={c['alpha']:g}" for c in cols)
             + " |", "|---" * (len(cols) + 1) + "|"]
    for c in range(NUM_CLASSES):
        cells = []
        for col in cols:
            p = PAPER_TABLE5.get((col["model"], col["alpha"]))
            cells.append(f"{_pct(col['module_acc'][c])}" + (f" ({p[c]:.2f})" if p else ""))
        lines.append(f"| module {c} | " + " | ".join(cells) + " |")
    avg = []
    for col in cols:
        p = PAPER_TABLE5.get((col["model"], col["alpha"]))
        avg.append(f"{_pct(col['avg'])}" + (f" ({sum(p) / len(p):.2f})" if p else ""))
    lines.append("| avg | " + " | ".join(avg) + " |")
    return run.save(f"table5_{args.dataset}", "\n".join(lines), results)


def run_table6(args):
    """Table 6: module x class accuracy (%) on 1:1 balanced sets, per density k (FC1 default)."""
    run = Run("table6", args)
    model = run.base_model(args.models[0])
    results, lines = {}, []
    for k in args.densities:
        config = run.decompose_config(args.alpha, density=k)
        bank = run.decompose(model, config)
        m = metrics.module_class_matrix(bank, run.test)
        eye = torch.eye(NUM_CLASSES, dtype=torch.bool)
        results[str(k)] = {"density": k, "matrix": m.tolist(),
                           "decompose_config": config.to_dict(),
                           "diagonal_mean": m[eye].mean().item(),
                           "off_diagonal_mean": m[~eye].mean().item()}
        paper = PAPER_TABLE6_DIAGONAL.get(k)
        lines += [f"Table 6 ({args.dataset} {args.models[0].upper()}, k = {k}, alpha = "
                  f"{args.alpha}): accuracy (%) of module (row) on the 1:1 balanced set of class "
                  f"(column); paper's diagonal in brackets.", "",
                  "| module | " + " | ".join(f"class {j}" for j in range(NUM_CLASSES)) + " |",
                  "|---" * (NUM_CLASSES + 1) + "|"]
        for i in range(NUM_CLASSES):
            cells = [_pct(m[i, j].item()) + (f" ({paper[i]:.2f})" if paper and i == j else "")
                     for j in range(NUM_CLASSES)]
            lines.append(f"| module {i} | " + " | ".join(cells) + " |")
        lines += ["", f"Diagonal mean {_pct(results[str(k)]['diagonal_mean'])}"
                  + (f" (paper {sum(paper) / len(paper):.2f})" if paper else "")
                  + f", off-diagonal mean {_pct(results[str(k)]['off_diagonal_mean'])} (paper "
                  f"{PAPER_TABLE6_OFF_DIAGONAL[0]}-{PAPER_TABLE6_OFF_DIAGONAL[1]}).", ""]
        run.log(f"k {k}: diagonal {results[str(k)]['diagonal_mean']:.4f}")
    return run.save(f"table6_{args.dataset}_{args.models[0]}", "\n".join(lines), results)


def run_figure3(args):
    """Figure 3: mean 2-class RPs ratio (top) and mean module test accuracy (1:1 balanced,
    bottom) per decomposition epoch, one curve per (density k, alpha), from bank.history (the
    modules are evaluated on the test set after every epoch); one column per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Run("figure3", args)
    results = {}
    fig, axes = plt.subplots(2, len(args.models), figsize=(4 * len(args.models), 6),
                             squeeze=False)
    for col, name in enumerate(args.models):
        model = run.base_model(name)
        for k, alpha in itertools.product(args.densities, args.alphas):
            config = run.decompose_config(alpha, density=k)
            bank = run.decompose(model, config, eval_set=run.test)
            h = bank.history
            test_acc = [sum(r["eval_module_acc"]) / len(r["eval_module_acc"]) for r in h]
            results[f"{name},{k},{alpha}"] = {"model": name, "density": k, "alpha": alpha,
                                             "decompose_config": config.to_dict(),
                                             "test_module_acc": test_acc, "history": h}
            epochs = [r["epoch"] for r in h]
            axes[0, col].plot(epochs, [r["rps_pair"] for r in h], marker=".",
                              label=f"k={k:g}, α={alpha:g}")
            axes[1, col].plot(epochs, test_acc, marker=".")
            run.log(f"{name} k {k} alpha {alpha}: rps {h[-1]['rps_pair']:.4f}")
        for k in args.densities:
            axes[0, col].axhline(k, linestyle=":", color="gray")
        axes[0, col].set_title(f"{args.dataset} {name.upper()}")
        axes[0, col].set_ylabel("2-class RPs ratio")
        axes[1, col].set_ylabel("module test acc (1:1)")
        axes[1, col].set_xlabel("epoch")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    name = f"figure3_{args.dataset}"
    fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=100)
    plt.close(fig)
    lines = [f"Figure 3 ({args.dataset}): final-epoch values; curves in {name}.png.", "",
             "| model | k | α | RPs ratio (2-class) | module test acc % | JI |",
             "|---|---|---|---|---|---|"]
    for r in results.values():
        last = r["history"][-1]
        lines.append(f"| {r['model'].upper()} | {r['density']:g} | {r['alpha']:g} | "
                     f"{last['rps_pair']:.4f} | {_pct(r['test_module_acc'][-1])} | "
                     f"{last['ji']:.3f} |")
    return run.save(name, "\n".join(lines), results)


COMMANDS = {"table1": run_table1, "table2": run_table2, "table5": run_table5,
            "table6": run_table6, "figure3": run_figure3, "figure4": figure4.run_figure4}

# Per-command defaults that differ from the shared ones.
_DEFAULT_MODELS = {"table1": "fc1,fc2,fc3,fc4", "table2": "fc1", "table5": "fc1,fc2,fc3,fc4",
                   "table6": "fc1", "figure3": "fc1", "figure4": "resnet20"}
_DEFAULT_ALPHAS = {"table1": "1,2", "table5": "0,0.05,0.1", "figure3": "0,0.1,1",
                   "figure4": "0,1,2"}
_DEFAULT_DENSITIES = {"table6": "0.05,0.1,0.2", "figure3": "0.1"}


def _floats(text):
    return [float(v) for v in text.split(",")]


def _add_command(sub, command):
    p = sub.add_parser(command, help=COMMANDS[command].__doc__.split("\n")[0].replace("%", "%%"),
                       description=COMMANDS[command].__doc__)
    conv = command == "figure4"
    p.add_argument("--dataset", default="cifar10" if conv else "mnist",
                   choices=("cifar10", "cifar100", "svhn") if conv else ("mnist", "fmnist",
                                                                       "digits"))
    p.add_argument("--models", default=_DEFAULT_MODELS[command],
                   type=lambda s: [m.strip().lower() for m in s.split(",")],
                   help="comma-separated subset of " + (
                       "resnet20,vgg16_quarter,vgg16,resnet50,wide_resnet28_10,small_vgg,"
                       "small_resnet" if conv else "fc1,fc2,fc3,fc4"))
    p.add_argument("--epochs-base", type=int, default=20,
                   help="base training epochs (paper 100; Pan & Rajan 50)")
    p.add_argument("--base-protocol", default="paper", choices=BASE_PROTOCOLS,
                   help="how base models are built: 'paper' (Table 3: SGD, inputs in [0, 1]) or "
                        "'pan-rajan' (their Keras script: inputs divided by 255 once more, i.e. "
                        "in [0, 1/255], as their double scaling gives; Glorot-uniform init, zero "
                        "biases, Adam lr 1e-3 eps 1e-7, batch 32)")
    p.add_argument("--epochs-decomp", type=int, default=10,
                   help="decomposition epochs (paper 25-50)")
    p.add_argument("--limit", type=int, default=None, help="use the first N training examples")
    p.add_argument("--decomp-limit", type=int, default=None,
                   help="decompose on the first N of those (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=2.0 if command == "table1" else 1.0,
                   help="stemming coefficient (default 2 for table1, whose alpha the paper does "
                        "not state; 1 elsewhere, as in its Table 2)")
    p.add_argument("--density", type=float, default=0.1, help="module density k")
    p.add_argument("--lr", type=float, default=0.1, help="decomposition learning rate")
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "constant"),
                   help="decomposition learning-rate schedule")
    p.add_argument("--no-balance", dest="balance", action="store_false",
                   help="plain cross-entropy instead of the class-weighted (1:1) one")
    p.add_argument("--batch-size", type=int, default=32, help="decomposition batch size")
    p.add_argument("--batchnorm", default="module", choices=BATCHNORM_MODES,
                   help="BatchNorm statistics during decomposition: per module (default) or "
                        "the base model's, frozen")
    p.add_argument("--score-init", default="kaiming", choices=SCORE_INITS,
                   help="initial scores: Kaiming draw (the paper) or magnitude (initial masks = "
                        "each layer's top-|W| weights)")
    p.add_argument("--graft-lr", type=float, default=DecomposeConfig.graft_lr,
                   help="learning rate of the grafting layers")
    p.add_argument("--select-on", default="test", choices=("test", "validation"),
                   help="'validation': carve a validation set from the training images (the "
                        "last --validation-size of them; they are then left out of training) "
                        "and choose alpha on it (table1: from --alphas); 'test': no split, "
                        "alpha as given (the earlier runs)")
    p.add_argument("--validation-size", type=int, default=None,
                   help="validation images (default: 10000 for mnist/fmnist, 2000 for cifar10)")
    p.add_argument("--tolerance", type=float, default=0.02 if conv else 0.01,
                   help="with --select-on validation: largest (10-class) validation accuracy "
                        "loss against the base model (a fraction) a candidate may have to be "
                        "chosen")
    if command in _DEFAULT_ALPHAS:
        p.add_argument("--alphas", type=_floats, default=_floats(_DEFAULT_ALPHAS[command]),
                       help="alphas to run" + (" (the candidates of --select-on validation)"
                                               if command == "table1" else ""))
    if command in _DEFAULT_DENSITIES:
        p.add_argument("--densities", type=_floats,
                       default=_floats(_DEFAULT_DENSITIES[command]))
    if command == "table1":
        p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=None,
                       help="comma-separated seeds to average over (default: --seed alone)")
        p.add_argument("--methods", default=",".join(BASELINES + ("stemming",)),
                       type=lambda s: [m.strip().lower() for m in s.split(",")],
                       help="comma-separated subset of ti-i,ti-sne,cm-rie,stemming")
    if conv:
        figure4.add_figure4_arguments(p)
    p.add_argument("--out", default="reproduce_out", help="output and base-model cache folder")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: the usual ones)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=lambda args, c=command: _check_and_run(c, args))


def _check_and_run(command, args):
    if command == "figure4":
        figure4.apply_recipe(args)
    valid = figure4.CONV_MODELS if command == "figure4" else MODELS
    bad = [m for m in args.models if m not in valid]
    if bad:
        raise ValueError(f"unknown models {bad}; valid: {', '.join(valid)}")
    bad = [m for m in getattr(args, "methods", ()) if m not in BASELINES + ("stemming",)]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(BASELINES)}, stemming")
    COMMANDS[command](args)
    return 0


def add_reproduce_parser(subparsers):
    """Add `reproduce <command> ...` to an argparse subparsers object (the `modsplit` CLI).
    The parsed namespace's `func(args)` runs the command and returns 0."""
    p = subparsers.add_parser("reproduce", help="reproduce the paper's tables and figure",
                              description=__doc__)
    sub = p.add_subparsers(dest="reproduce_command", required=True)
    for command in COMMANDS:
        _add_command(sub, command)
    return p


def main_reproduce(argv=None):
    """`python -m modsplit.app.reproduce <command> ...`: parse argv and run; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m modsplit.app.reproduce", description=__doc__)
    sub = parser.add_subparsers(dest="reproduce_command", required=True)
    for command in COMMANDS:
        _add_command(sub, command)
    args = parser.parse_args(argv)
    args.command_line = "python -m modsplit.app.reproduce " + " ".join(
        sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ModsplitError, ValueError, OSError) as exc:
        print(f"reproduce: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main_reproduce())
