"""Run configuration of the command line: defaults, YAML / TOML files, merging, writing back.

A configuration is one nested dict (see DEFAULTS). Every command reads DEFAULTS, then the file
given with --config (YAML: .yaml/.yml, TOML: .toml; keys it lacks keep their defaults), then
the flags given on the command line, and writes the merged result to <out>/config.yaml with the
paths it produced filled in (`model` after train, `bank` after decompose), so
`modsplit <command> --config <out>/config.yaml` repeats the run.
"""
import copy
import os

import yaml

DEFAULTS = {
    "seed": 0,
    "device": "cpu",
    "backend": None,    # masked-op kernels: auto, cpu, cuda, triton (None: $MODSPLIT_BACKEND,
                        # else auto; see modsplit.backend)
    "out": None,        # output folder (None: the command's default)
    "model": None,      # the trained base model: model file, or package.module:factory
    "bank": None,       # bank file of the trained base model
    "data": {
        "dataset": "digits",
        "data_dir": None,
        "limit": None,       # keep only the first `limit` training examples
        "test_limit": None,  # keep only the first `test_limit` test examples
    },
    "train": {
        "model": "fc1",      # built-in name (modsplit.app.models) or package.module:factory
        "model_args": {},    # factory keyword arguments; in_features, in_channels and
                             # num_classes are filled in from the data when the factory takes them
        "epochs": 15,
        "lr": 0.05,
        "batch_size": 64,
    },
    "decompose": {
        "epochs": 4,
        "density": 0.3,
        "alpha": 1.0,
        "p": 1.0,
        "lr": 0.1,
        "lr_schedule": "cosine",  # or "constant"
        "balance": True,     # class-weighted CE (1:1 positive/negative); False: plain CE
        "batchnorm": "module",  # per-module BatchNorm statistics; "frozen": the base model's
        "score_init": "kaiming",  # or "magnitude": initial masks = each layer's top-|W|
        "eval_test": False,  # score the modules on the test set after every epoch
        "batch_size": 32,
        "classes": None,     # class ids to build modules for (None: all)
        "checkpoint_dir": None,  # checkpoint every epoch there; a rerun resumes from it
    },
    "compose": {"classes": [3, 7], "format": "compact"},
    "evaluate": {"subsets": None},  # lists of class ids; None: a few chosen from the bank
}


def merge(base: dict, override: dict, where: str = "") -> dict:
    """A copy of `base` updated from `override`, recursively for dict values. Raises ValueError
    for a key `base` does not have (a misspelt setting should not pass silently), except below
    free-form mappings (train.model_args)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        name = f"{where}{key}"
        if key not in base and where != "train.model_args.":
            raise ValueError(f"unknown setting {name!r}; valid: "
                             f"{', '.join(where + k for k in base)}")
        if isinstance(base.get(key), dict) and name != "train.model_args":
            if not isinstance(value, dict):
                raise ValueError(f"setting {name!r} must be a mapping, got {value!r}")
            out[key] = merge(base[key], value, name + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def read(path) -> dict:
    """The mapping in a YAML (.yaml, .yml) or TOML (.toml) file."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in (".yaml", ".yml", ".toml"):
        raise ValueError(f"config file {path} must end in .yaml, .yml or .toml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if ext == ".toml":
            import tomllib
            loaded = tomllib.loads(raw.decode())
        else:
            loaded = yaml.safe_load(raw) or {}
    except (yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"config file {path} cannot be parsed: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    return loaded


def write(path, cfg: dict):
    """Write `cfg` as YAML (keys in DEFAULTS order)."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, default_flow_style=None)


def set_key(cfg: dict, dotted: str, value):
    """cfg["a"]["b"] = value for dotted = "a.b"."""
    *parents, last = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    cfg[last] = value


def resolve(config_file=None, flags=None) -> dict:
    """DEFAULTS, updated from `config_file` (if any), then from `flags` {dotted key: value}."""
    cfg = merge(DEFAULTS, read(config_file)) if config_file else copy.deepcopy(DEFAULTS)
    for dotted, value in (flags or {}).items():
        set_key(cfg, dotted, value)
    return cfg
