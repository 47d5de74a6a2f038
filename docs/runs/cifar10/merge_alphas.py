"""Merge the three one-alpha `figure4` runs of docs/runs/cifar10 (run side by side, one process
per alpha, to fit the shared 2-core VM) into one report: the same selection rule, tables and
plots as a single `figure4 --alphas 0,1,2` run (modsplit.app.figure4._select / _report).

    python docs/runs/cifar10/merge_alphas.py /tmp/wt15_runs/f4/a0 /tmp/wt15_runs/f4/a1 \
        /tmp/wt15_runs/f4/a2 --out /tmp/wt15_runs/f4/merged
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
    args = types.SimpleNamespace(**{**s0, "alphas": [x for r in runs for x in r["settings"]["alphas"]],
                                    "out": a.out})
    settings = {**s0, "alphas": args.alphas,
                "wall_time_s": [r["settings"]["wall_time_s"] for r in runs],
                "argv": [r["settings"]["argv"] for r in runs],
                "merged_by": "docs/runs/cifar10/merge_alphas.py " + " ".join(a.runs)}
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
    for name in args.models:
        figure4._select(run, results, name, s0["seed"])
    figure4._report(run, results)


if __name__ == "__main__":
    main()
