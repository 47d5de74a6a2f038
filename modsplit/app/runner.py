"""The runner's shared steps: the data of a run (train / validation / test), its settings
record, the base-model cache and the decomposition call, used by `modsplit reproduce`'s
commands (reproduce.py for the FC tables, figure4.py for the conv nets)."""
import argparse
import inspect
import json
import os
import platform
import sys
import time

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from modsplit.app.data import load_dataset, num_classes
from modsplit.app.models import FC1, FC2, FC3, FC4
from modsplit.app.selection import VALIDATION_SIZE, split_validation
from modsplit.app.train import evaluate, train_classifier
from modsplit.decompose import decompose
from modsplit.decompose_config import DecomposeConfig

MODELS = {"fc1": FC1, "fc2": FC2, "fc3": FC3, "fc4": FC4}
BASE_PROTOCOLS = ("paper", "pan-rajan")


def protocol_inputs(dataset, protocol):
    """The images the base models of `protocol` see: `dataset` (TensorDataset of float32
    [N, C, H, W] images in [0, 1] and int64 [N] labels) itself for "paper"; for "pan-rajan" a
    new TensorDataset with the images divided by 255 once more (float32, in [0, 1/255]) and the
    same labels, as Pan & Rajan's double scaling gives."""
    if protocol == "paper":
        return dataset
    if protocol == "pan-rajan":
        x, y = dataset.tensors
        return TensorDataset(x / 255, y)
    raise ValueError(f"unknown base protocol {protocol!r}; valid: {', '.join(BASE_PROTOCOLS)}")


def base_training_kwargs(protocol):
    """Keyword arguments of train_classifier (besides epochs and seed) for `protocol`: none for
    "paper" (train_classifier's Table 3 defaults: SGD lr 0.01, Nesterov 0.9, weight decay 5e-4,
    batch 64, PyTorch's default init); Keras-style Adam for "pan-rajan"."""
    if protocol == "paper":
        return {}
    if protocol == "pan-rajan":
        return dict(optimizer="adam", lr=1e-3, eps=1e-7, weight_decay=0.0, batch_size=32,
                    init="glorot")
    raise ValueError(f"unknown base protocol {protocol!r}; valid: {', '.join(BASE_PROTOCOLS)}")


def base_training_settings(protocol):
    """The base-training hyperparameters of `protocol` for the settings record: a JSON-able
    dict of train_classifier's optimizer / init / batch arguments, base_training_kwargs over
    train_classifier's defaults."""
    defaults = inspect.signature(train_classifier).parameters
    given = base_training_kwargs(protocol)
    return {k: given.get(k, defaults[k].default)
            for k in ("optimizer", "lr", "momentum", "nesterov", "betas", "eps", "weight_decay",
                      "batch_size", "init")}


def base_cache_name(dataset, name, protocol, epochs, limit, seed):
    """File name of a cached base model: today's `base_<dataset>_<name>_e<epochs>_n<limit>
    _s<seed>.pt` for "paper" (so existing caches stay valid), with `_<protocol>` after the model
    name otherwise. limit: an int or None (all)."""
    tag = "" if protocol == "paper" else f"_{protocol}"
    return (f"base_{dataset}_{name}{tag}_e{epochs}_n{'all' if limit is None else limit}"
            f"_s{seed}.pt")


@torch.no_grad()
def dead_units(model, dataset, batch_size=4096):
    """Number of units of the model's first Linear layer (an int) whose pre-activation is <= 0
    on every example of `dataset` (images float32 [N, C, H, W]; inputs flattened to [N, I])."""
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    alive = torch.zeros(first.out_features, dtype=torch.bool)
    x = dataset.tensors[0]
    for i in range(0, len(x), batch_size):
        alive |= (first(x[i:i + batch_size].flatten(1)) > 0).any(0)
    return int((~alive).sum())


class Run:
    """One command's context: data, settings record, output folder and base-model cache.

    args: the parsed arguments (dataset, epochs_base, epochs_decomp, limit, decomp_limit,
    seed, out, threads, data_dir, base_protocol, select_on, validation_size). The train set is
    the first `limit` examples (all when None); with select_on "validation" its last
    validation_size examples (selection.split_validation) become the validation set `val`, used
    to choose hyperparameters, and are left out of base training and decomposition (`val` is None
    otherwise). The test set is always complete. All are the inputs of --base-protocol
    (protocol_inputs), so base training, both decompositions and every evaluation see them.
    """

    def __init__(self, command, args):
        self.command, self.args, self.start = command, args, time.time()
        if args.threads:
            torch.set_num_threads(args.threads)
        os.makedirs(args.out, exist_ok=True)
        self.protocol = getattr(args, "base_protocol", "paper")
        self.device = torch.device(getattr(args, "device", "cpu"))
        self.train = protocol_inputs(
            load_dataset(args.dataset, "train", args.data_dir, args.limit), self.protocol)
        self.val = None
        if getattr(args, "select_on", "test") == "validation":
            self.train, self.val = split_validation(self.train, self.validation_size())
        self.test = protocol_inputs(load_dataset(args.dataset, "test", args.data_dir,
                                                 getattr(args, "test_limit", None)),
                                    self.protocol)
        self.base_accuracy, self.base_dead_units, self.base_val_accuracy = {}, {}, {}

    def validation_size(self):
        """--validation-size, or the dataset's default (selection.VALIDATION_SIZE)."""
        return getattr(self.args, "validation_size", None) or VALIDATION_SIZE[self.args.dataset]

    def settings(self):
        """The settings and timing of this run, as a JSON-able dict."""
        a = self.args
        keys = ("dataset", "models", "epochs_base", "epochs_decomp", "limit", "decomp_limit",
                "seed", "seeds", "methods", "alpha", "alphas", "density", "densities", "lr",
                "lr_schedule", "balance", "batch_size", "graft_lr", "batchnorm", "score_init",
                "select_on", "tolerance")
        record = {k: getattr(a, k) for k in keys if hasattr(a, k)}
        record.update(command=self.command, base_protocol=self.protocol,
                      base_training=base_training_settings(self.protocol),
                      decompose_config=(self.decompose_config(a.alpha).to_dict()
                                        if hasattr(a, "alpha") else None),
                      train_examples=len(self.train),
                      validation_examples=0 if self.val is None else len(self.val),
                      validation_split=None if self.val is None else
                      f"last {len(self.val)} of the first {len(self.train) + len(self.val)} "
                      "training examples",
                      decomp_examples=len(self.decomp_set()), test_examples=len(self.test),
                      base_test_accuracy=self.base_accuracy,
                      base_validation_accuracy=self.base_val_accuracy,
                      base_dead_units=self.base_dead_units,
                      wall_time_s=round(time.time() - self.start, 1),
                      machine=f"{platform.node()} ({platform.machine()}, "
                              f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
                              f"{torch.get_num_threads()} threads)",
                      finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                      argv=getattr(a, "command_line", None) or " ".join(sys.argv))
        return record

    def base_model(self, name, seed=None):
        """Trained base model `name` (fc1..fc4) of `seed` (default --seed): loaded from the
        cache file in --out when there (base_cache_name: one file per protocol), else trained on
        the train set as --base-protocol says (base_training_kwargs) and saved. Records its test
        accuracy and its number of dead first-layer units on the train set (dead_units) under
        "<name>/s<seed>". Seeds torch's global RNG with the seed for the initial weights."""
        a = self.args
        seed = a.seed if seed is None else seed
        limit = a.limit if self.val is None else len(self.train)  # the examples it trains on
        path = os.path.join(a.out, base_cache_name(a.dataset, name, self.protocol,
                                                   a.epochs_base, limit, seed))
        torch.manual_seed(seed)
        model = MODELS[name](in_features=self.train.tensors[0][0].numel())
        if os.path.isfile(path):
            model.load_state_dict(torch.load(path))
            model.eval()
        else:
            train_classifier(model, self.train, epochs=a.epochs_base, seed=seed,
                             progress=False, **base_training_kwargs(self.protocol))
            torch.save(model.state_dict(), path)
        self.base_accuracy[f"{name}/s{seed}"] = evaluate(model, self.test)
        if self.val is not None:
            self.base_val_accuracy[f"{name}/s{seed}"] = evaluate(model, self.val)
        self.base_dead_units[f"{name}/s{seed}"] = dead_units(model, self.train)
        return model

    def decomp_set(self):
        """The first `decomp_limit` train examples (the whole train set when None)."""
        n = self.args.decomp_limit
        return self.train if n is None or n >= len(self.train) else Subset(self.train, range(n))

    def decompose_config(self, alpha, density=None, shared_init=True, epochs=None, seed=None):
        """The DecomposeConfig of a decomposition with stemming weight `alpha`: --density,
        --epochs-decomp, --lr, --graft-lr, --lr-schedule, --balance, --batchnorm, --score-init
        and --seed unless given here, p = 1 and the rest decompose()'s defaults (Table 4's momentum and weight decay).
        Its to_dict() is what the run records of every decomposition."""
        a = self.args
        return DecomposeConfig(
            density=a.density if density is None else density, alpha=alpha, p=1,
            epochs=a.epochs_decomp if epochs is None else epochs, lr=a.lr,
            graft_lr=getattr(a, "graft_lr", DecomposeConfig.graft_lr),
            lr_schedule=a.lr_schedule, balance=a.balance, shared_init=shared_init,
            batchnorm=getattr(a, "batchnorm", DecomposeConfig.batchnorm),
            score_init=getattr(a, "score_init", DecomposeConfig.score_init),
            seed=a.seed if seed is None else seed)

    def decompose(self, model, config, eval_set=None):
        """Module stemming of `model` on the decomposition set with `config` (a DecomposeConfig,
        see decompose_config) in batches of --batch-size, shuffled by config.seed (the scores
        are drawn from it too); eval_set: evaluate the modules on it after every epoch
        (decompose's eval_set)."""
        data = self.decomp_set()
        loader = DataLoader(data, batch_size=self.args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(config.seed))
        return decompose(model, _LabelledLoader(loader, _labels(data)),
                         num_classes(self.args.dataset), config,
                         progress=False, eval_set=eval_set, device=self.device)

    def log(self, message):
        """Progress line on stderr with the elapsed time."""
        print(f"[{time.time() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)

    def save(self, name, markdown, results):
        """Print the Markdown report and write <out>/<name>.md and <out>/<name>.json."""
        settings = self.settings()
        parts = [markdown, "Settings: " + ", ".join(
            f"{k}={v}" for k, v in settings.items()
            if k not in ("argv", "base_test_accuracy", "base_dead_units",
                         "base_validation_accuracy"))]
        for key, title, fmt in (
                ("base_test_accuracy", "Base test accuracy", lambda v: f"{100 * v:.2f}%"),
                ("base_validation_accuracy", "Base validation accuracy",
                 lambda v: f"{100 * v:.2f}%"),
                ("base_dead_units", "Dead first-layer units (never active on the train set)",
                 str)):
            if settings[key]:
                parts.append(f"{title}: " + ", ".join(f"{k} {fmt(v)}"
                                                      for k, v in settings[key].items()))
        text = "\n\n".join(parts) + f"\n\nCommand: `{settings['argv']}`\n"
        print(text)
        with open(os.path.join(self.args.out, f"{name}.md"), "w") as f:
            f.write(text)
        with open(os.path.join(self.args.out, f"{name}.json"), "w") as f:
            json.dump({"settings": settings, "results": results}, f, indent=1)
        return {"settings": settings, "results": results}


class _LabelledLoader:
    """A DataLoader wrapper that also exposes the dataset's label tensor (as `dataset.targets`)
    so that decompose() counts class frequencies without a pass over the data."""

    def __init__(self, loader, labels):
        self.loader, self.dataset = loader, argparse.Namespace(targets=labels)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def _labels(dataset):
    """int64 [n] labels of a TensorDataset or of a Subset of one."""
    if isinstance(dataset, Subset):
        return dataset.dataset.tensors[1][list(dataset.indices)]
    return dataset.tensors[1]


def _pct(v):
    return "–" if v is None else f"{100 * v:.2f}"
