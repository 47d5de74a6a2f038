"""Plots and a Markdown summary of a decomposition (used by `modsplit report` and `demo`).

write_report(out, bank, evaluation) writes into folder `out`:
  history.png       per-epoch RPs (pair and all modules), Jaccard index and module accuracy
                    (training; test too when decomposed with an eval_set) from bank.history;
  module_class.png  the module x class accuracy matrix (the paper's Table 6);
  layers.png        mask overlap per masked layer: density, JI, union of all modules;
  report.md         the settings, the tables and the three plots.
`evaluation` is the dict commands.evaluate_bank() returns (the metrics JSON).
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from modsplit import metrics  # noqa: E402


def layer_overlap(bank) -> list:
    """Per masked layer: {layer, weights, density (mean kept share per module), ji (pairwise
    Jaccard index), union (share kept by at least one module)}."""
    rows = []
    shapes = bank.weight_shapes()
    for name, packed in bank.masks().items():
        n = metrics.maskable_count({name: packed}, shapes)
        kept = metrics.popcount(packed) / bank.n_modules
        rows.append({"layer": name, "weights": n, "density": kept / n,
                     "ji": metrics.mask_jaccard({name: packed}),
                     "union": metrics.union_count(packed) / n})
    return rows


def _plot_history(history, path):
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("rps_pair", "RPs, two modules"), ("rps_all", "RPs, all modules"),
                       ("ji", "Jaccard index")):
        left.plot(epochs, [h[key] for h in history], marker="o", label=label)
    left.set(xlabel="epoch", ylabel="ratio", title="Mask overlap per epoch", ylim=(0, 1.02))
    left.legend()
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.plot(epochs, [h["module_acc"] for h in history], marker="o", color="tab:green",
               label="modules, train (1:1)")
    if "eval_module_acc" in history[0]:  # decompose(eval_set=...) / --eval-test
        right.plot(epochs, [sum(h["eval_module_acc"]) / len(h["eval_module_acc"])
                            for h in history], marker="o", label="modules, test (1:1)")
        right.plot(epochs, [h["eval_acc"] for h in history], marker="o",
                   label="all modules' vote, test")
    right.set(xlabel="epoch", ylabel="accuracy", title="Accuracy per epoch")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_matrix(matrix, classes, path):
    n = len(matrix[0])
    fig, ax = plt.subplots(figsize=(1 + 0.5 * n, 1 + 0.45 * len(classes)))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set(xticks=range(n), yticks=range(len(classes)), yticklabels=classes,
           xlabel="class", ylabel="module", title="Module x class accuracy")
    if n <= 20:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_layers(rows, path):
    names = [r["layer"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 3.8))
    width = 0.27
    for i, (key, label) in enumerate((("density", "kept per module"), ("ji", "Jaccard index"),
                                      ("union", "kept by any module"))):
        ax.bar([j + (i - 1) * width for j in x], [r[key] for r in rows], width, label=label)
    ax.set(xticks=list(x), xticklabels=names, xlabel="layer", ylabel="share of weights",
           ylim=(0, 1.3), title="Mask overlap per layer")
    ax.legend(loc="upper center", ncol=3, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def subset_table(rows) -> str:
    """Markdown table of recompositions: [{classes, accuracy, ji, rps, params}]."""
    lines = ["| classes | accuracy | JI | RPs | parameters |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {','.join(map(str, r['classes']))} | {r['accuracy']:.4f} | "
                     f"{r['ji']:.4f} | {r['rps']:.4f} | {r['params']} |")
    return "\n".join(lines)


def _markdown(bank, evaluation, overlap) -> str:
    mods = evaluation["modules"]
    lines = [
        "# modsplit report", "",
        f"Bank: {bank.n_modules} modules of a {bank.num_classes}-class model, density "
        f"{bank.density}, alpha {bank.alpha}, p {bank.p}. Base model test accuracy "
        f"{evaluation['base_accuracy']:.4f}; mean module accuracy (1:1 balanced) "
        f"{sum(m['accuracy'] for m in mods) / len(mods):.4f}; Jaccard index "
        f"{evaluation['ji']:.4f}.", "",
        "## Recompositions", "", subset_table(evaluation["subsets"]), "",
        "## Modules", "", "| class | accuracy | kept weights |", "| --- | ---: | ---: |",
        *(f"| {m['class']} | {m['accuracy']:.4f} | {m['kept']} |" for m in mods), "",
        "## Mask overlap per layer", "", "| layer | weights | kept per module | JI | kept by "
        "any module |", "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {r['layer']} | {r['weights']} | {r['density']:.4f} | {r['ji']:.4f} | "
          f"{r['union']:.4f} |" for r in overlap), "",
        "## Plots", "", *(["![per epoch](history.png)", ""] if bank.history else []),
        "![module x class](module_class.png)", "", "![per layer](layers.png)", ""]
    return "\n".join(lines)


def write_report(out, bank, evaluation) -> list:
    """Write the plots and report.md into folder `out`; returns the paths written."""
    os.makedirs(out, exist_ok=True)
    overlap = layer_overlap(bank)
    paths = [os.path.join(out, n) for n in
             ("history.png", "module_class.png", "layers.png", "report.md")]
    if bank.history:
        _plot_history(bank.history, paths[0])
    else:
        paths.pop(0)
    _plot_matrix(evaluation["matrix"], list(bank.classes), paths[-3])
    _plot_layers(overlap, paths[-2])
    with open(paths[-1], "w") as f:
        f.write(_markdown(bank, evaluation, overlap))
    return paths
