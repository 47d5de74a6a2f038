"""The network graph of a compact model as JSON: torch.fx nodes over a fixed set of torch.nn
modules (plus modsplit.export's PlainModuleBatchNorm), functions and tensor methods, so that a
compact file holds no pickled or executable code.

to_json(graph_module) -> {"nodes": [...], "modules": {target: spec}} with tensors returned apart;
from_json(...) rebuilds an fx.GraphModule. A node is {"name", "op", "target", "args", "kwargs"}:
op is placeholder, call_module (target = a module of the spec table), call_function / call_method
(target = a key of FUNCTIONS / METHODS) or output; args nest lists, numbers, strings, None,
{"node": name} and {"slice": [start, stop, step]}. Anything else raises CompactFormatError.
"""
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from modsplit.compact_layers import CompactConv2d, CompactLinear
from modsplit.convert import repeat_folded
from modsplit.errors import ModsplitError
from modsplit.export import PlainModuleBatchNorm


class CompactFormatError(ModsplitError, ValueError):
    """A network (or a compact file's graph) uses something a compact model cannot hold."""


FUNCTIONS = {"add": operator.add, "mul": operator.mul, "getitem": operator.getitem,
             "torch.add": torch.add, "torch.relu": torch.relu, "torch.flatten": torch.flatten,
             "torch.cat": torch.cat, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh,
             "F.relu": F.relu, "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
             "F.avg_pool2d": F.avg_pool2d, "F.max_pool2d": F.max_pool2d,
             "repeat_folded": repeat_folded}
_FUNCTION_NAMES = {id(f): n for n, f in FUNCTIONS.items()}
METHODS = ("relu", "flatten", "view", "reshape", "size", "mean", "add", "sigmoid", "contiguous")

# Leaf modules a compact graph may hold (torch.nn's, and the export's per-module BatchNorm, plain
# torch as well): constructor attributes (tensors travel apart).
_NN = {nn.Flatten: ("start_dim", "end_dim"), nn.ReLU: (), nn.Tanh: (), nn.Sigmoid: (),
       nn.ReLU6: (), nn.Identity: (), nn.LeakyReLU: ("negative_slope",),
       nn.GELU: ("approximate",),
       nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
       nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
       PlainModuleBatchNorm: ("num_features", "n_modules", "spatial"),
       nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
       nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
       nn.AdaptiveAvgPool2d: ("output_size",),
       nn.Linear: ("in_features", "out_features"),
       nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                   "groups", "padding_mode")}
_NN_BY_NAME = {cls.__name__: cls for cls in _NN}
_COMPACT = {"CompactLinear": CompactLinear, "CompactConv2d": CompactConv2d}


class _Tracer(fx.Tracer):
    """Keeps the given module types (the multi-module layers) as leaves."""

    def __init__(self, leaves):
        super().__init__()
        self.leaves = tuple(leaves)

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def trace(net: nn.Module, leaves=()) -> fx.GraphModule:
    """torch.fx graph of `net` with `leaves` (module types) kept whole."""
    try:
        return fx.GraphModule(net, _Tracer(leaves).trace(net))
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise CompactFormatError(f"modsplit: the network cannot be traced by torch.fx ({exc}); "
                                 "use the ExportedModel (ComposedModel.export()) instead") from exc


def _arg_to_json(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return [_arg_to_json(v) for v in a]
    if isinstance(a, slice):
        return {"slice": [a.start, a.stop, a.step]}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise CompactFormatError(f"modsplit: a compact graph cannot hold the argument {a!r}")


def _arg_from_json(a, env):
    if isinstance(a, dict):
        if "node" in a:
            return env[a["node"]]
        return slice(*a["slice"])
    if isinstance(a, list):
        return tuple(_arg_from_json(v, env) for v in a)
    return a


def module_spec(m: nn.Module) -> tuple:
    """-> (spec dict, {tensor name: tensor}) of a leaf module a compact graph may hold."""
    if isinstance(m, nn.Dropout):  # inference: dropout is the identity
        return {"type": "Identity"}, {}
    if isinstance(m, (CompactLinear, CompactConv2d)):
        spec = {"type": type(m).__name__, "weight_shape": list(m.weight_shape),
                "shared": m.shared}
        if isinstance(m, CompactConv2d):
            spec.update(stride=list(m.stride), padding=list(m.padding))
        return spec, dict(m.state_dict())
    if type(m) not in _NN:
        raise CompactFormatError(f"modsplit: a compact graph cannot hold a {type(m).__name__}")
    spec = {"type": type(m).__name__}
    spec.update({a: _arg_to_json(getattr(m, a)) for a in _NN[type(m)]})
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        spec["bias"] = m.bias is not None
        if isinstance(m, nn.Conv2d) and isinstance(m.padding, str):
            raise CompactFormatError("modsplit: string paddings are not supported in a compact "
                                     "graph")
    return spec, dict(m.state_dict())


def build_module(spec: dict, tensors: dict) -> nn.Module:
    """Inverse of module_spec."""
    kind = spec.get("type")
    if kind in _COMPACT:
        conv = {k: spec[k] for k in ("stride", "padding") if k in spec}
        return _COMPACT[kind](spec["weight_shape"], tensors["union_mask"], tensors["values"],
                              tensors["module_masks"], tensors.get("bias"), spec["shared"],
                              **conv)
    if kind not in _NN_BY_NAME:
        raise CompactFormatError(f"modsplit: unknown module type {kind!r} in a compact graph")
    kwargs = {k: _arg_from_json(v, {}) for k, v in spec.items() if k != "type"}
    m = _NN_BY_NAME[kind](**kwargs)
    if tensors:
        m.load_state_dict(tensors)
    return m.eval()


def to_json(gm: fx.GraphModule) -> tuple:
    """-> (graph dict, {"<target>/<tensor name>": tensor})."""
    nodes, modules, tensors = [], {}, {}
    for n in gm.graph.nodes:
        target = n.target
        if n.op == "call_module":
            spec, state = module_spec(gm.get_submodule(target))
            modules[target] = spec
            tensors.update({f"{target}/{k}": v for k, v in state.items()})
        elif n.op == "call_function":
            if id(target) not in _FUNCTION_NAMES:
                raise CompactFormatError(f"modsplit: a compact graph cannot call {target}")
            target = _FUNCTION_NAMES[id(target)]
        elif n.op == "call_method":
            if target not in METHODS:
                raise CompactFormatError(f"modsplit: a compact graph cannot call .{target}()")
        elif n.op not in ("placeholder", "output"):
            raise CompactFormatError(f"modsplit: a compact graph cannot hold {n.op} nodes "
                                     f"({n.name})")
        nodes.append({"name": n.name, "op": n.op, "target": target,
                      "args": _arg_to_json(n.args),
                      "kwargs": {k: _arg_to_json(v) for k, v in n.kwargs.items()}})
    return {"nodes": nodes, "modules": modules}, tensors


def from_json(graph: dict, tensors: dict) -> fx.GraphModule:
    """Rebuild the fx.GraphModule of to_json's output (tensors keyed "<target>/<name>")."""
    try:
        root = {}
        for target, spec in graph["modules"].items():
            prefix = target + "/"
            root[target] = build_module(spec, {k[len(prefix):]: v for k, v in tensors.items()
                                               if k.startswith(prefix)})
        g, env = fx.Graph(), {}
        for n in graph["nodes"]:
            args = _arg_from_json(n["args"], env)
            kwargs = {k: _arg_from_json(v, env) for k, v in n["kwargs"].items()}
            if n["op"] == "placeholder":
                env[n["name"]] = g.placeholder(n["target"])
            elif n["op"] == "output":
                g.output(args[0])
            elif n["op"] == "call_module":
                env[n["name"]] = g.call_module(n["target"], args, kwargs)
            elif n["op"] == "call_function":
                env[n["name"]] = g.call_function(FUNCTIONS[n["target"]], args, kwargs)
            elif n["op"] == "call_method" and n["target"] in METHODS:
                env[n["name"]] = g.call_method(n["target"], args, kwargs)
            else:
                raise CompactFormatError(f"modsplit: bad node {n!r} in a compact graph")
        return fx.GraphModule(root, g)
    except (KeyError, TypeError, IndexError) as exc:
        raise CompactFormatError(f"modsplit: malformed compact graph ({exc!r})") from exc
