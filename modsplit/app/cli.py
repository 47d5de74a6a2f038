"""Command line: `modsplit <command>` (also `python -m modsplit <command>`).

Settings come from modsplit.app.config.DEFAULTS, then --config FILE, then the flags given; every
flag below maps to one configuration key. Errors in what was asked for (a wrong path, an
unknown name, class ids out of range, a bank of another model) end the run with exit code 2 and
a one-line message on stderr.
"""
import argparse
import os
import sys

import yaml

from modsplit.app import commands, config
from modsplit.backend import set_backend
from modsplit.errors import ModsplitError
from modsplit.layers import SCORE_INITS
from modsplit.module_norm import BATCHNORM_MODES
from modsplit.app.reproduce import add_reproduce_parser

class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def class_list(text: str) -> list:
    """"3,7" -> [3, 7]; "0-4" -> [0, 1, 2, 3, 4]; items may mix both ("0-2,7")."""
    out = []
    try:
        for item in text.split(","):
            lo, sep, hi = item.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad class list {text!r} (expected e.g. 3,7 or "
                                         f"0-4)") from None
    return out


def _key_value(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def _add(p, flag, key, **kw):
    p.add_argument(flag, dest=key, default=argparse.SUPPRESS, **kw)


def _common(p, data=True):
    _add(p, "--config", "config_file", metavar="FILE",
         help="YAML or TOML settings file (e.g. the config.yaml of an earlier run)")
    _add(p, "--out", "out", metavar="DIR", help="output folder (default runs/<command>)")
    _add(p, "--seed", "seed", type=int, help="random seed (default 0)")
    _add(p, "--device", "device", help="torch device, e.g. cpu or cuda (default cpu)")
    _add(p, "--backend", "backend",
         help="masked-op kernels: auto, cpu, cuda, triton (default: $MODSPLIT_BACKEND, else auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    if data:
        _add(p, "--dataset", "data.dataset", metavar="NAME",
             help="digits (default), mnist, fmnist, cifar10, cifar100, svhn or "
                  "imagefolder:<dir>")
        _add(p, "--data-dir", "data.data_dir", metavar="DIR", help="folder of the data files")
        _add(p, "--limit", "data.limit", type=int, metavar="N", help="use N training examples")
        _add(p, "--test-limit", "data.test_limit", type=int, metavar="N",
             help="use N test examples")


def _trained(p):
    _add(p, "--model", "model", metavar="MODEL",
         help="trained base model: a model file (model.pt of modsplit train, torch.export "
              ".pt2, TorchScript) or package.module:factory")


def _bank(p):
    _add(p, "--bank", "bank", metavar="FILE", help="bank file written by modsplit decompose")


def _train_flags(p, epochs_flag):
    _add(p, epochs_flag, "train.epochs", type=int, metavar="N", help="training epochs")
    _add(p, "--train-lr", "train.lr", type=float, metavar="LR", help="training learning rate")


def _decompose_flags(p, epochs_flag):
    _add(p, epochs_flag, "decompose.epochs", type=int, metavar="N", help="decomposition epochs")
    _add(p, "--density", "decompose.density", type=float, help="share of weights per module")
    _add(p, "--alpha", "decompose.alpha", type=float, help="weight of the stemming term")
    _add(p, "--p", "decompose.p", type=float, help="norm of the stemming term")
    _add(p, "--batchnorm", "decompose.batchnorm", choices=BATCHNORM_MODES,
         help="BatchNorm statistics: per module (default) or the base model's, frozen")
    _add(p, "--score-init", "decompose.score_init", choices=SCORE_INITS,
         help="initial scores: Kaiming draw (default) or magnitude (top-|W| masks)")


def build_parser() -> argparse.ArgumentParser:
    """The `modsplit` argument parser (subcommands demo, train, decompose, compose, evaluate,
    report, reproduce)."""
    parser = _Parser(prog="modsplit", description="Split a trained classifier into per-class "
                     "modules and recompose any subset of them.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("demo", help="train, decompose, recompose and report on digits")
    _common(p)
    _train_flags(p, "--train-epochs")
    _decompose_flags(p, "--epochs")
    _add(p, "--classes", "compose.classes", type=class_list, help="classes to export")
    p.set_defaults(func=commands.run_demo)

    p = sub.add_parser("train", help="train a base model -> model.pt")
    _common(p)
    _add(p, "--model", "train.model", metavar="MODEL",
         help="built-in name (fc1, small_vgg, ...) or package.module:factory (default fc1)")
    p.add_argument("--model-arg", dest="model_args", action="append", type=_key_value,
                   default=[], metavar="KEY=VALUE", help="factory keyword argument (repeatable)")
    _train_flags(p, "--epochs")
    _add(p, "--batch-size", "train.batch_size", type=int)
    p.set_defaults(func=commands.run_train)

    p = sub.add_parser("decompose", help="decompose a trained model -> bank.msb, metrics, plots")
    _common(p)
    _trained(p)
    _decompose_flags(p, "--epochs")
    _add(p, "--lr", "decompose.lr", type=float, help="score learning rate")
    _add(p, "--lr-schedule", "decompose.lr_schedule", choices=("cosine", "constant"),
         help="learning-rate schedule over the epochs (default cosine)")
    _add(p, "--no-balance", "decompose.balance", action="store_const", const=False,
         help="plain cross-entropy instead of the class-weighted (1:1) one")
    _add(p, "--eval-test", "decompose.eval_test", action="store_const", const=True,
         help="score the modules on the test set after every epoch (history, history.png)")
    _add(p, "--batch-size", "decompose.batch_size", type=int)
    _add(p, "--classes", "decompose.classes", type=class_list,
         help="build modules for these classes only (default all)")
    _add(p, "--checkpoint-dir", "decompose.checkpoint_dir", metavar="DIR",
         help="checkpoint each epoch into DIR; rerunning the command resumes from it")
    p.set_defaults(func=commands.run_decompose)

    p = sub.add_parser("compose", help="recompose classes from a bank -> composed.msc (compact), "
                                       "composed.pt2 or composed.onnx")
    _common(p)
    _trained(p)
    _bank(p)
    _add(p, "--classes", "compose.classes", type=class_list, help="e.g. 3,7 or 0-4")
    _add(p, "--format", "compose.format", choices=("compact", "pt2", "onnx"),
         help="compact: modsplit's compact model (default); pt2 / onnx: plain files that load "
              "without modsplit")
    p.set_defaults(func=commands.run_compose)

    for name, func, what in (("evaluate", commands.run_evaluate, "accuracy per module, per "
                              "recomposition, module x class matrix -> metrics.json"),
                             ("report", commands.run_report, "plots and report.md")):
        p = sub.add_parser(name, help=what)
        _common(p)
        _trained(p)
        _bank(p)
        _add(p, "--subsets", "evaluate.subsets", type=class_list, nargs="+",
             metavar="CLASSES", help="class subsets to recompose, e.g. 0,1 3,7 0-9")
        p.set_defaults(func=func)
    add_reproduce_parser(sub)
    return parser


def _absolute(cfg):
    """Paths in cfg made absolute, so that the written config works from any folder."""
    for key in ("out", "model", "bank"):
        value = cfg[key]
        if value and (key == "out" or os.path.exists(value)):
            cfg[key] = os.path.abspath(value)
    if cfg["data"]["data_dir"]:
        cfg["data"]["data_dir"] = os.path.abspath(cfg["data"]["data_dir"])
    if cfg["decompose"]["checkpoint_dir"]:
        cfg["decompose"]["checkpoint_dir"] = os.path.abspath(cfg["decompose"]["checkpoint_dir"])


def _check_device(name):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")


def settings(args) -> dict:
    """The configuration of a parsed command line: defaults, --config file, flags."""
    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "func", "quiet", "config_file", "model_args")}
    cfg = config.resolve(getattr(args, "config_file", None), flags)
    if getattr(args, "model_args", None):
        cfg["train"]["model_args"].update(dict(args.model_args))
    if not cfg["out"]:
        cfg["out"] = os.path.join("runs", args.command)
    _absolute(cfg)
    _check_device(cfg["device"])
    set_backend(cfg["backend"])
    return cfg


def main(argv=None) -> int:
    """Run the command line; returns the exit code (2 for a bad request)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "reproduce":  # the paper's tables: its own flags, no config file
            args.command_line = "modsplit " + " ".join(sys.argv[1:] if argv is None else argv)
            return args.func(args)
        cfg = settings(args)
        os.makedirs(cfg["out"], exist_ok=True)
        return args.func(cfg, args.quiet)
    except (ModsplitError, ValueError, OSError) as exc:
        message = " ".join(str(exc).split()).removeprefix("modsplit: ")
        print(f"modsplit {args.command}: error: {message}", file=sys.stderr)
        return 2
