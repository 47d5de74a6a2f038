"""Merge `figure4` runs made side by side (one process per alpha or per seed, to fit the shared
2-core VM) into one report: the same selection rule, tables and plots as one `figure4` run over
all their alphas and seeds (modsplit.app.figure4._select / _report). Every (model, seed) is
selected again over the alphas the runs hold for it. (Stop 11 used it as merge_alphas.py.)

    python docs/runs/cifar10/merge_runs.py <run dir> <run dir> ... --out <dir>
"""
import argparse
import json
import os
import types

from modsplit.app import figure4


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    runs = [json.load(open(os.path.join(r, "figure4_cifar10.json"))) for r in a.runs]
    results = {k: v for r in runs for k, v in r["results"].items() if "selection" not in k}
    s0 = runs[0]["settings"]
    alphas = sorted({r["alpha"] for r in results.values()})
    seeds = sorted({r["seed"] for r in results.values()})
    args = types.SimpleNamespace(**{**s0, "alphas": alphas, "seeds": seeds, "out": a.out})
    settings = {**s0, "alphas": alphas, "seeds": seeds,
                "wall_time_s": [r["settings"]["wall_time_s"] for r in runs],
                "argv": [r["settings"]["argv"] for r in runs],
                "merged_by": "docs/runs/cifar10/merge_runs.py " + " ".join(a.runs)}
    test = [None] * s0["test_examples"]
    decomp = [None] * s0["decomp_examples"]

    def save(name, markdown, res):
        text = markdown + "\n\nSettings: " + json.dumps(settings, indent=None) + "\n"
        open(os.path.join(a.out, f"{name}.md"), "w").write(text)
        json.dump({"settings": settings, "results": res},
                  open(os.path.join(a.out, f"{name}.json"), "w"), indent=1)
        print(text)

    run = types.SimpleNamespace(args=args, test=test, decomp_set=lambda: decomp, save=save,
                                log=print)
    cells = list(results.values())
    for name in args.models:
        for seed in seeds:
            args.alphas = sorted(r["alpha"] for r in cells if (r["model"], r["seed"]) == (name, seed))
            if args.alphas:
                figure4._select(run, results, name, seed)
    args.alphas = alphas
    figure4._report(run, results)


if __name__ == "__main__":
    main()
