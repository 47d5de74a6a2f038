"""Recomposed models against the base model they came from: file size and CPU latency at batch 1
and 64 of the compact model (modsplit.compact), the .pt2 and ONNX exports, the composed model on
modsplit's masked ops, and the base model (eval mode, same threads, same inputs, interleaved).

Run (MNIST FC1-FC4, the settings of benchmarks/RESULTS.md "Compact composed models"):
  python benchmarks/bench_compose.py --dataset mnist --models fc1 fc2 fc3 fc4 \
      --out docs/runs/compose_mnist
  python benchmarks/bench_compose.py --dataset cifar10 --models small_vgg small_resnet \
      --train-epochs 8 --train-lr 0.05 --decompose-limit 10000 --decompose-classes 3,7 \
      --out docs/runs/compose_cifar10
  python benchmarks/bench_compose.py --dataset cifar10 --models resnet20 \
      --figure4 <figure4 --out folder> --out docs/runs/compose_cifar10_resnet20
  (or --base <base .pt> --bank <bank .msb> instead of --figure4)
Trained models and banks are cached in --cache (retrained only when missing). Writes <out>.json
and <out>.md.
"""
import argparse
import json
import os
import platform
import tempfile

import onnxruntime as ort
import torch
from torch.utils.data import DataLoader, Subset

import modsplit
from modsplit import metrics
from modsplit.app.data import load_dataset, num_classes
from modsplit.app.figure4 import CONV_MODELS
from modsplit.app.latency import compare_latency, file_bytes, state_dict_bytes
from modsplit.app.runner import base_cache_name
from modsplit.app.models import get_model
from modsplit.app.train import train_classifier
from modsplit.plain_export import export_onnx, export_pt2


def model_kwargs(name, x):
    if name.startswith("fc"):
        return {"in_features": x[0].numel()}
    return {"in_channels": x.shape[1], "num_classes": 10}


def load_base_and_bank(args, name, base_path, bank_path):
    """(base model in eval mode, bank) of conv net `name` (figure4's CONV_MODELS) from files."""
    model = CONV_MODELS[name](num_classes(args.dataset))
    model.load_state_dict(torch.load(base_path, map_location="cpu"))
    model.eval()
    return model, modsplit.ModuleBank.load(bank_path, model)


def from_figure4(args, name):
    """(base model, bank) of `modsplit reproduce figure4 --out args.figure4`: the seed-0 base
    model and the bank of the alpha its validation selection chose (else of --alpha)."""
    with open(os.path.join(args.figure4, f"figure4_{args.dataset}.json")) as f:
        run = json.load(f)
    s, results = run["settings"], run["results"]
    alpha = results.get(f"{name},s0,selection", {}).get("chosen_alpha", args.alpha)
    r = results[f"{name},s0,{alpha:g}"]
    base = base_cache_name(args.dataset, name, s.get("base_protocol", "paper"), s["epochs_base"],
                           s["train_examples"], 0)
    args.alpha, args.epochs = alpha, s["epochs_decomp"]
    return load_base_and_bank(args, name, os.path.join(args.figure4, base),
                              os.path.join(args.figure4, r["bank_file"]))


def prepare(args, name, train_set):
    """(trained base model, bank), cached under args.cache (or taken from --figure4, or from
    --base and --bank)."""
    if args.figure4:
        return from_figure4(args, name)
    if args.bank:
        return load_base_and_bank(args, name, args.base, args.bank)
    os.makedirs(args.cache, exist_ok=True)
    stem = os.path.join(args.cache, f"{args.dataset}_{name}")
    x0 = train_set[0][0].unsqueeze(0)
    model = get_model(name, **model_kwargs(name, x0))
    if os.path.exists(stem + ".pt"):
        model.load_state_dict(torch.load(stem + ".pt"))
    else:
        limit = min(args.train_limit or len(train_set), len(train_set))
        train_classifier(model, Subset(train_set, range(limit)), epochs=args.train_epochs,
                         lr=args.train_lr, progress=False)
        torch.save(model.state_dict(), stem + ".pt")
    model.eval()
    if os.path.exists(stem + ".msb"):
        return model, modsplit.ModuleBank.load(stem + ".msb", model)
    subset = Subset(train_set, range(min(args.decompose_limit, len(train_set))))
    loader = DataLoader(subset, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    bank = modsplit.decompose(model, loader, num_classes(args.dataset), density=args.density,
                              alpha=args.alpha, epochs=args.epochs, progress=False,
                              classes=args.decompose_classes)
    bank.save(stem + ".msb")
    return model, bank


def measure(args, name, model, bank, classes, test_set, tmp):
    composed = bank.compose(classes)
    compact = composed.compact()
    x, y = test_set.tensors
    keep = (y == classes[0]) | (y == classes[1]) if len(classes) == 2 else torch.isin(
        y, torch.tensor(classes))
    xs, ys = x[keep], y[keep]
    paths = {f: os.path.join(tmp, f"{name}.{f}") for f in ("msc", "pt2", "onnx")}
    compact.save(paths["msc"])
    export_pt2(compact, paths["pt2"], xs[:4])
    export_onnx(compact, paths["onnx"], xs[:4])
    pt2 = torch.export.load(paths["pt2"]).module()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(paths["onnx"], opts, providers=["CPUExecutionProvider"])
    loaded = modsplit.CompactModel.load(paths["msc"])
    with torch.inference_mode():
        want = composed.predict(xs)
        ids = torch.tensor(classes)
        base_pred = ids[model(xs)[:, ids].argmax(1)]
        got = {"compact": loaded.predict(xs), "pt2": pt2(xs)[1],
               "onnx": torch.from_numpy(session.run(None, {"x": xs.numpy()})[1])}
    inputs = {"b1": xs[:1].contiguous(), "b64": xs[:64].contiguous()}
    lat = compare_latency({"base": model, "compact": loaded, "composed": composed,
                           "pt2": lambda t: pt2(t),
                           "onnx": lambda t: session.run(None, {"x": t.numpy()})},
                          inputs, rounds=args.rounds)
    base_bytes = state_dict_bytes(model)
    sizes = {"base_state_dict": base_bytes, "compact": file_bytes(paths["msc"]),
             "pt2": file_bytes(paths["pt2"]), "onnx": file_bytes(paths["onnx"])}
    rps = metrics.remaining_params_ratio(bank, classes)
    k = len(classes)
    maskable = sum(torch.Size(s).numel() for s in bank.weight_shapes().values())
    return {"model": name, "classes": list(classes), "rps": rps,
            "maskable_weights": maskable,
            "size_goal_bytes": int((rps + (k + 1) / 32) * maskable * 4
                                   + bank.grafts.weight[:k].numel() * 4 + k * 8),
            "bytes": sizes, "size_ratio": {f: b / base_bytes for f, b in sizes.items()},
            "latency_us": lat,
            "latency_ratio": {f: {b: lat[f][b] / lat["base"][b] for b in inputs} for f in lat},
            "same_predictions_as_composed": {f: bool(torch.equal(p, want)) for f, p in got.items()},
            "accuracy": {"composed": float((want == ys).float().mean()),
                         "base_restricted": float((base_pred == ys).float().mean())},
            "agreement_with_base": float((want == base_pred).float().mean()),
            "test_images": int(keep.sum()),
            "layers": [repr(m) for m in loaded.net.modules()
                       if type(m).__name__.startswith("Compact")]}


def to_markdown(args, rows):
    lines = [f"# Compact compositions, {args.dataset}", "",
             f"Machine: {args.machine}; torch {torch.__version__}; {args.threads} thread(s); "
             f"median of {args.rounds} interleaved rounds.", "",
             (f"Settings: base model and bank from `modsplit reproduce figure4 --out "
              f"{args.figure4}` (seed 0, alpha {args.alpha:g} as its validation selection chose; "
              f"its JSON holds every setting)." if args.figure4 else
              f"Settings: base model {args.base}, bank {args.bank}." if args.bank else
              f"Settings: base training {args.train_epochs} epochs (lr {args.train_lr}, batch 64, "
              f"{args.train_limit or 'all'} training images); decomposition density "
              f"{args.density}, alpha {args.alpha}, {args.epochs} epochs, batch 32, first "
              f"{args.decompose_limit} training images, modules for classes "
              f"{args.decompose_classes or 'all'}."), "",
             "| model | classes | RPs | base B | compact B (x base) | pt2 B (x) | onnx B (x) | "
             "base µs b1 / b64 | compact µs b1 / b64 (x base) | composed µs b1 / b64 | "
             "pt2 µs b1 / b64 | onnx µs b1 / b64 | same preds (compact/pt2/onnx) | acc composed |",
             "|" + "---|" * 14]
    for r in rows:
        s, lat, ratio = r["bytes"], r["latency_us"], r["latency_ratio"]
        sr = r["size_ratio"]
        same = "/".join("yes" if r["same_predictions_as_composed"][f] else "NO"
                        for f in ("compact", "pt2", "onnx"))
        lines.append(
            f"| {r['model']} | {','.join(map(str, r['classes']))} | {r['rps']:.3f} | "
            f"{s['base_state_dict']:,} | {s['compact']:,} ({sr['compact']:.2f}) | "
            f"{s['pt2']:,} ({sr['pt2']:.2f}) | {s['onnx']:,} ({sr['onnx']:.2f}) | "
            f"{lat['base']['b1']:.0f} / {lat['base']['b64']:.0f} | "
            f"{lat['compact']['b1']:.0f} / {lat['compact']['b64']:.0f} "
            f"({ratio['compact']['b1']:.2f} / {ratio['compact']['b64']:.2f}) | "
            f"{lat['composed']['b1']:.0f} / {lat['composed']['b64']:.0f} | "
            f"{lat['pt2']['b1']:.0f} / {lat['pt2']['b64']:.0f} | "
            f"{lat['onnx']['b1']:.0f} / {lat['onnx']['b64']:.0f} | {same} | "
            f"{r['accuracy']['composed']:.4f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--models", nargs="+", default=["fc1", "fc2", "fc3", "fc4"])
    p.add_argument("--classes", default="3,7")
    p.add_argument("--train-epochs", type=int, default=5)
    p.add_argument("--train-lr", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--decompose-limit", type=int, default=20000)
    p.add_argument("--train-limit", type=int, default=None, help="train the base model on the "
                   "first N training images (default all)")
    p.add_argument("--decompose-classes", default=None,
                   help="build modules for these classes only, e.g. 3,7 (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while measuring")
    p.add_argument("--train-threads", type=int, default=2,
                   help="torch threads while training and decomposing")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cache", default="runs/bench-compose")
    p.add_argument("--figure4", default=None, help="take the seed-0 base models and the "
                   "validation-chosen banks from this `modsplit reproduce figure4 --out` folder "
                   "(its settings, not --train-*/--epochs/--alpha, then describe them)")
    p.add_argument("--base", default=None, help="with --bank: the base model's state_dict file "
                   "(one conv net in --models)")
    p.add_argument("--bank", default=None, help="with --base: a bank file of that model")
    p.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} cores")
    p.add_argument("--out", required=True, help="output stem: writes <out>.json and <out>.md")
    args = p.parse_args()
    if args.decompose_classes:
        args.decompose_classes = tuple(int(c) for c in args.decompose_classes.split(","))
    classes = [int(c) for c in args.classes.split(",")]
    train_set, test_set = load_dataset(args.dataset, "train"), load_dataset(args.dataset, "test")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.set_num_threads(args.train_threads)
            model, bank = prepare(args, name, train_set)
            torch.set_num_threads(args.threads)
            rows.append(measure(args, name, model, bank, classes, test_set, tmp))
            print(json.dumps({k: rows[-1][k] for k in ("model", "size_ratio", "latency_ratio",
                                                       "same_predictions_as_composed")}),
                  flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"settings": vars(args), "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(to_markdown(args, rows))
    print(to_markdown(args, rows))


if __name__ == "__main__":
    main()
