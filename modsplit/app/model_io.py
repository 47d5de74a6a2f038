"""Models for the command line: built-in names, Python entry points and model files.

A model is named by
  * a built-in name of modsplit.app.models (fc1, small_vgg, ...): an untrained architecture;
  * an entry point "package.module:factory": factory(**model_args) -> nn.Module (for train, an
    untrained one; elsewhere it must return the trained model);
  * a file (an existing path, or a name ending in .pt / .pth / .pt2 / .ts):
      - a modsplit model file, written by `modsplit train` (save_model_file): torch.save of
        {"format": "modsplit.model", "version": 1, "factory": <name or entry point>,
         "kwargs": {...}, "state_dict": {...}}, read back with weights_only=True (no pickled
        code): the factory is called with kwargs and the state_dict loaded;
      - a torch.export file (torch.export.save): its graph is lifted so that every aten.linear
        / aten.conv2d call on a stored weight runs in an nn.Linear / nn.Conv2d (which
        decomposition needs); export it with a dynamic batch dimension, since modules run on
        K copies of the batch;
      - a TorchScript file (torch.jit.save): usable as a base model to evaluate, not to
        decompose (its layers are compiled code).
"""
import importlib
import inspect
import math
import os
import zipfile

import torch
from torch import nn

from modsplit.app import models

FORMAT = "modsplit.model"
_FILE_SUFFIXES = (".pt", ".pth", ".pt2", ".ts")


def is_file(spec: str) -> bool:
    """Whether `spec` names a model file rather than a built-in name or an entry point."""
    return os.path.exists(spec) or spec.lower().endswith(_FILE_SUFFIXES)


def factory(spec: str):
    """The callable named by a built-in name or a "package.module:factory" entry point."""
    if ":" not in spec:
        if spec.lower() not in models.MODELS:
            raise ValueError(f"unknown model {spec!r}: not a file, not a built-in name "
                             f"({', '.join(models.MODELS)}) and not package.module:factory")
        return models.factory(spec)
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model entry point {spec!r}: cannot import {module_name!r} "
                         f"({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model entry point {spec!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model entry point {spec!r} is not callable")
    return obj


def data_kwargs(fn, kwargs: dict, sample_shape, num_classes: int) -> dict:
    """`kwargs` plus in_features / in_channels / num_classes taken from the data (one sample's
    shape [C, H, W] and the class count) for those parameters `fn` takes and kwargs lacks."""
    params = inspect.signature(fn).parameters
    found = {"in_features": math.prod(sample_shape), "in_channels": sample_shape[0],
             "num_classes": num_classes}
    return {**{k: v for k, v in found.items() if k in params}, **kwargs}


def build(spec: str, kwargs: dict) -> nn.Module:
    """factory(spec)(**kwargs), checked to be an nn.Module."""
    model = factory(spec)(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def save_model_file(path, model: nn.Module, spec: str, kwargs: dict):
    """Write a modsplit model file (see the module docstring): architecture by name + tensors."""
    torch.save({"format": FORMAT, "version": 1, "factory": spec, "kwargs": dict(kwargs),
                "state_dict": model.state_dict()}, path)


def _file_kind(path) -> str:
    """"modsplit", "export" or "torchscript", from the archive's member names."""
    try:
        names = zipfile.ZipFile(path).namelist()
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a model file (not a torch zip archive)") from None
    if any(n.endswith("/archive_format") for n in names):
        return "export"
    if any("/code/" in n for n in names):
        return "torchscript"
    return "modsplit"


def _lift(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Run each aten.linear / aten.conv2d call whose weight (and bias) are stored attributes in
    an nn.Linear / nn.Conv2d submodule sharing those tensors, named after the weight's owner
    ("features.0.weight" -> "features_0_lifted"). train() / eval() only set the flag again:
    the graph's dropout and normalisation modes were fixed when it was exported."""
    for node in list(gm.graph.nodes):
        lin = node.target is torch.ops.aten.linear.default
        conv = node.target is torch.ops.aten.conv2d.default
        if node.op != "call_function" or not (lin or conv) or node.kwargs:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b, rest = args[0], args[1], args[2], args[3:]
        if getattr(w, "op", None) != "get_attr" or (b is not None and b.op != "get_attr"):
            continue
        weight = gm.get_parameter(w.target)
        if lin:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
        else:
            stride, padding, dilation, groups = (list(rest) + [1, 0, 1, 1][len(rest):])[:4]
            layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], weight.shape[2:],
                              stride, padding, dilation, groups, bias=b is not None)
        layer.weight = weight
        if b is not None:
            layer.bias = gm.get_parameter(b.target)
        name = w.target.rpartition(".")[0].replace(".", "_") + "_lifted"
        gm.add_submodule(name, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    for name in ("train", "eval"):  # torch.export makes these raise; its graph has no modes
        gm.__dict__.pop(name, None)
    return gm


def load_file(path) -> nn.Module:
    """The model in a model file (see the module docstring), in eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file {path}")
    kind = _file_kind(path)
    if kind == "export":
        return _lift(torch.export.load(path).module())
    if kind == "torchscript":
        return torch.jit.load(path, map_location="cpu").eval()
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means: not our format
        raise ValueError(f"{path} is not a modsplit model file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a modsplit model file (no {FORMAT!r} header)")
    model = build(blob["factory"], blob["kwargs"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def load_trained(spec: str) -> nn.Module:
    """The trained base model named by `spec`: a model file, or an entry point whose factory
    returns the trained model (called with no arguments). Built-in names are refused: they
    are untrained architectures (train one with `modsplit train`)."""
    if not spec:
        raise ValueError("no model given: pass --model (a model file or package.module:factory)")
    if is_file(spec):
        return load_file(spec)
    if ":" not in spec:
        factory(spec)  # unknown names fail here with the list of valid ones
        raise ValueError(f"model {spec!r} is an untrained built-in architecture; train it with "
                         f"`modsplit train --model {spec}` and pass the model file it writes")
    return build(spec, {}).eval()


def check_decomposable(model: nn.Module, spec: str):
    """Raise ValueError when `model` has no nn.Linear / nn.Conv2d layer to decompose."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(f"{spec} is a TorchScript model, which cannot be decomposed (its layers "
                         "are compiled code); save it with torch.export instead")
    if not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules()):
        raise ValueError(f"model {spec} has no nn.Linear / nn.Conv2d layer to decompose")
