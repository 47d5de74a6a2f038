"""The command line's subcommands. Each takes the resolved configuration (modsplit.app.config) and
`quiet`, writes its output folder (cfg["out"]) and returns the exit code.

Output folder (every command writes config.yaml and metrics.json; besides):
  train      model.pt      the trained base model (modsplit model file, see model_io)
  decompose  bank.msb      the bank file (modsplit.files); plus the report's plots and report.md
  compose    composed.msc  the compact model (CompactModel.save; --format compact, the default),
             composed.pt2 / composed.onnx  plain torch.export / ONNX files (--format pt2 / onnx)
  evaluate   (metrics only)
  report     plots and report.md (modsplit.app.report)
  demo       all of the above
Library errors worth a one-line message (wrong paths, names, class ids, mismatched files) are
raised as ValueError / OSError; modsplit.app.cli turns them into exit code 2.
"""
import json
import math
import os
import time

import torch
from torch.utils.data import DataLoader

from modsplit import distributed, metrics
from modsplit.app import compose_report, config, data, model_io, report
from modsplit.bank import ModuleBank
from modsplit.decompose import decompose as decompose_model
from modsplit.app.train import evaluate as model_accuracy
from modsplit.app.train import train_classifier

BANK_FILE, MODEL_FILE = "bank.msb", "model.pt"
COMPOSED_FILES = {"compact": "composed.msc", "pt2": "composed.pt2", "onnx": "composed.onnx"}


def _say(quiet, msg):
    if not quiet:
        print(msg, flush=True)


def _dataset(cfg, split):
    d = cfg["data"]
    return data.load_dataset(d["dataset"], split, d["data_dir"],
                             d["limit"] if split == "train" else d["test_limit"])


def _finish(cfg, out, results, quiet):
    """Write config.yaml and metrics.json into `out`."""
    config.write(os.path.join(out, "config.yaml"), cfg)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    _say(quiet, f"wrote {out}")


def _check_classes(classes, allowed, what):
    """Raise ValueError unless `classes` is a non-empty list of distinct ids in `allowed`."""
    allowed = list(allowed)
    bad = [c for c in classes if c not in allowed]
    if not classes or bad or len(set(classes)) != len(classes):
        span = (f"0-{allowed[-1]}" if allowed == list(range(len(allowed)))
                else ",".join(map(str, allowed)))
        problem = f"class ids {bad} out of range" if bad else f"bad class list {classes}"
        raise ValueError(f"{problem}: {what} has classes {span}")


def _check_outputs(model, sample, n_classes, cfg):
    """Raise ValueError when the model's logits do not match the dataset's class count."""
    with torch.no_grad():
        logits = model(sample[:2].to(cfg["device"]))
    if logits.dim() != 2 or logits.shape[1] != n_classes:
        raise ValueError(f"model {cfg['model']} outputs shape {tuple(logits.shape)}; dataset "
                         f"{cfg['data']['dataset']} needs [B, {n_classes}] logits")


def train_step(cfg, out, quiet):
    """Build the architecture cfg["train"]["model"], train it, save model.pt. Returns
    (model, results); records the factory arguments used and the model file in cfg."""
    t = cfg["train"]
    if model_io.is_file(t["model"]):
        raise ValueError(f"train builds a new model: --model takes a built-in name or "
                         f"package.module:factory, not the file {t['model']}")
    train_set, test_set = _dataset(cfg, "train"), _dataset(cfg, "test")
    n = data.num_classes(cfg["data"]["dataset"])
    kwargs = model_io.data_kwargs(model_io.factory(t["model"]), t["model_args"],
                                  tuple(train_set.tensors[0].shape[1:]), n)
    torch.manual_seed(cfg["seed"])
    model = model_io.build(t["model"], kwargs)
    train_classifier(model, train_set, epochs=t["epochs"], lr=t["lr"],
                     batch_size=t["batch_size"], seed=cfg["seed"], device=cfg["device"],
                     progress=not quiet)
    path = os.path.join(out, MODEL_FILE)
    model_io.save_model_file(path, model.cpu(), t["model"], kwargs)
    t["model_args"], cfg["model"] = kwargs, os.path.abspath(path)
    results = {"train_accuracy": model_accuracy(model, train_set, device=cfg["device"]),
               "test_accuracy": model_accuracy(model, test_set, device=cfg["device"])}
    _say(quiet, f"base model {t['model']} {kwargs}: train accuracy "
                f"{results['train_accuracy']:.4f}, test accuracy {results['test_accuracy']:.4f}")
    return model, results


def load_model(cfg):
    """The trained base model cfg["model"], on cfg["device"]."""
    return model_io.load_trained(cfg["model"]).to(cfg["device"])


def decompose_step(cfg, model, out, quiet):
    """Decompose the model on the training set, save bank.msb, record it in cfg. Under torchrun
    (WORLD_SIZE > 1) the modules are sharded over the ranks (modsplit.distributed) and only rank
    0 writes bank.msb."""
    d = cfg["decompose"]
    model_io.check_decomposable(model, cfg["model"])
    train_set = _dataset(cfg, "train")
    n = data.num_classes(cfg["data"]["dataset"])
    _check_outputs(model, train_set.tensors[0], n, cfg)
    if d["classes"] is not None:
        _check_classes(d["classes"], range(n), f"dataset {cfg['data']['dataset']}")
    loader = DataLoader(train_set, batch_size=d["batch_size"], shuffle=True)
    distributed.init_from_env(cfg["device"])
    bank = decompose_model(model, loader, n, density=d["density"], alpha=d["alpha"], p=d["p"],
                           epochs=d["epochs"], lr=d["lr"], lr_schedule=d["lr_schedule"],
                           balance=d["balance"], batchnorm=d["batchnorm"],
                           score_init=d["score_init"], seed=cfg["seed"],
                           eval_set=_dataset(cfg, "test") if d["eval_test"] else None,
                           device=cfg["device"], progress=not quiet and distributed.is_writer(),
                           classes=d["classes"], distributed="auto",
                           checkpoint_dir=d["checkpoint_dir"])
    path = os.path.join(out, BANK_FILE)
    if distributed.is_writer():
        bank.save(path)
    cfg["bank"] = os.path.abspath(path)
    return bank


def load_bank(cfg, model):
    """The bank file cfg["bank"] of `model`, checked against the dataset's class count."""
    path = cfg["bank"]
    if not path:
        raise ValueError("no bank given: pass --bank (a bank file written by modsplit decompose)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no bank file {path}")
    bank = ModuleBank.load(path, model)
    n = data.num_classes(cfg["data"]["dataset"])
    if bank.num_classes != n:
        raise ValueError(f"bank {path} has {bank.num_classes} classes; dataset "
                         f"{cfg['data']['dataset']} has {n}")
    return bank


def default_subsets(classes) -> list:
    """A few class subsets to recompose: the first two, the last two, every other, all."""
    c = list(classes)
    picks = [c[:2], c[-2:], c[::2], c] if len(c) > 1 else [c]
    out = []
    for s in picks:
        if len(s) and s not in out:
            out.append(s)
    return out


def _finite(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def evaluate_bank(cfg, model, bank) -> dict:
    """Base model accuracy, per-module accuracy, the module x class matrix and, per subset
    (cfg["evaluate"]["subsets"] or default_subsets), recomposed accuracy, JI, RPs, parameters."""
    test_set = _dataset(cfg, "test")
    subsets = cfg["evaluate"]["subsets"] or default_subsets(bank.classes)
    for s in subsets:
        _check_classes(s, bank.classes, "the bank")
    masks = bank.masks()
    matrix = metrics.module_class_matrix(bank, test_set)
    modules = [{"class": c, "accuracy": _finite(matrix[k, c].item()),
                "kept": sum(metrics.popcount(m[k]) for m in masks.values())}
               for k, c in enumerate(bank.classes)]
    rows = []
    for s in subsets:
        idx = bank.module_indices(s)
        rows.append({"classes": list(s),
                     "accuracy": metrics.recomposed_accuracy(bank, test_set, s),
                     "ji": metrics.mask_jaccard({n: m[idx] for n, m in masks.items()}),
                     "rps": metrics.remaining_params_ratio(bank, s),
                     "params": bank.compose(s).num_parameters()})
    return {"base_accuracy": model_accuracy(model, test_set, device=cfg["device"]),
            "ji": metrics.jaccard_index(bank), "modules": modules,
            "matrix": [[_finite(v) for v in row] for row in matrix.tolist()], "subsets": rows}


def compose_step(cfg, model, bank, out, quiet):
    """Write the composition of cfg["compose"]["classes"] in cfg["compose"]["format"] (compact,
    pt2 or onnx) and report its accuracy, RPs, file size and latency at batch 1 and 64 against
    the base model `model` (modsplit.app.compose_report)."""
    classes, fmt = cfg["compose"]["classes"], cfg["compose"]["format"]
    _check_classes(classes, bank.classes, "the bank")
    if fmt not in COMPOSED_FILES:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(COMPOSED_FILES)}")
    test_set = _dataset(cfg, "test")
    path = os.path.join(out, COMPOSED_FILES[fmt])
    composed = bank.compose(classes)
    loaded = compose_report.write_composed(composed, fmt, path, test_set.tensors[0][:2])
    results = {"classes": classes, "format": fmt, "file": os.path.abspath(path),
               "accuracy": metrics.recomposed_accuracy(bank, test_set, classes),
               "rps": metrics.remaining_params_ratio(bank, classes),
               "params": composed.num_parameters(),
               "base_params": sum(p.numel() for p in bank.net.net.parameters()),
               **compose_report.size_and_latency(model, path, loaded, test_set, classes)}
    _say(quiet, f"classes {classes}: accuracy {results['accuracy']:.4f}, RPs "
                f"{results['rps']:.4f} -> {path}\n" + compose_report.summary(results))
    return results


def _print_evaluation(evaluation):
    print(f"base model test accuracy {evaluation['base_accuracy']:.4f}, Jaccard index of all "
          f"modules {evaluation['ji']:.4f}")
    print("module accuracy (1:1 balanced): " + ", ".join(
        f"{m['class']}: {m['accuracy']:.3f}" for m in evaluation["modules"]))
    print(report.subset_table(evaluation["subsets"]))


def run_train(cfg, quiet):
    """`modsplit train`."""
    _, results = train_step(cfg, cfg["out"], quiet)
    _finish(cfg, cfg["out"], results, quiet)
    return 0


def run_decompose(cfg, quiet):
    """`modsplit decompose`: bank file, evaluation, plots."""
    model = load_model(cfg)
    bank = decompose_step(cfg, model, cfg["out"], quiet)
    if not distributed.is_writer():  # rank 0 evaluates and writes the outputs
        return 0
    evaluation = evaluate_bank(cfg, model, bank)
    report.write_report(cfg["out"], bank, evaluation)
    _print_evaluation(evaluation)
    _finish(cfg, cfg["out"], {"history": bank.history, **evaluation}, quiet)
    return 0


def run_compose(cfg, quiet):
    """`modsplit compose`."""
    model = load_model(cfg)
    bank = load_bank(cfg, model)
    _finish(cfg, cfg["out"], compose_step(cfg, model, bank, cfg["out"], quiet), quiet)
    return 0


def run_evaluate(cfg, quiet):
    """`modsplit evaluate`."""
    model = load_model(cfg)
    evaluation = evaluate_bank(cfg, model, load_bank(cfg, model))
    _print_evaluation(evaluation)
    _finish(cfg, cfg["out"], evaluation, quiet)
    return 0


def run_report(cfg, quiet):
    """`modsplit report`."""
    model = load_model(cfg)
    bank = load_bank(cfg, model)
    evaluation = evaluate_bank(cfg, model, bank)
    paths = report.write_report(cfg["out"], bank, evaluation)
    _say(quiet, "wrote " + ", ".join(paths))
    _finish(cfg, cfg["out"], evaluation, quiet)
    return 0


def run_demo(cfg, quiet):
    """`modsplit demo`: train, decompose, evaluate, compose and report in one folder."""
    start, out = time.perf_counter(), cfg["out"]
    model, trained = train_step(cfg, out, quiet)
    bank = decompose_step(cfg, model, out, quiet)
    evaluation = evaluate_bank(cfg, model, bank)
    composed = compose_step(cfg, model, bank, out, quiet)
    report.write_report(out, bank, evaluation)
    _print_evaluation(evaluation)
    _finish(cfg, out, {"train": trained, "history": bank.history, **evaluation,
                       "compose": composed}, quiet)
    print(f"demo finished in {time.perf_counter() - start:.1f} s; plots and report.md in {out}")
    return 0
