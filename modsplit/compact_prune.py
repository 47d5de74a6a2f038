"""Channel pruning of a traced export (modsplit.export's PlainMultiConv2d layers in a torch.fx
graph): conv output channels that no chosen module needs are removed, with the input channels of
the next conv and the BatchNorms between them.

A chain conv_a -> (BatchNorm2d | per-module BatchNorm2d (PlainModuleBatchNorm) | ReLU | max /
adaptive-average pooling)* -> conv_b, where each step has a single user, is pruned. Output
channel c of conv_a goes when conv_b reads it with no module (every chosen module's filter
weights on input c are dropped), or when every chosen module drops conv_a's whole filter c and
the chain maps its constant output (bias, BatchNorm: each module's own) to exactly 0 for every
module (e.g. a ReLU of a negative value): conv_b's input c is then all zeros, padding
included. A constant non-zero channel is kept (its contribution at the borders depends on the
padding). Repeated until nothing changes. Exact: outputs are unchanged.
"""
import torch
import torch.nn as nn

from modsplit.export import PlainModuleBatchNorm, PlainMultiConv2d

_CHAIN = (nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d)
_CHAIN_FUNCTIONS = (torch.relu, torch.nn.functional.relu)


def _plain_conv(gm, node):
    if node is None or node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    ok = isinstance(m, PlainMultiConv2d) and m.groups == 1 and m.pre_pad is None
    return m if ok else None


def _chain_module(m) -> bool:
    """True for a module that may sit between two pruned convs (maps each channel on its own)."""
    return isinstance(m, _CHAIN) or (isinstance(m, PlainModuleBatchNorm) and m.spatial)


def _chain(gm, node):
    """(steps, conv_b) following conv node `node`, or None when it is not a prunable chain."""
    steps, cur = [], node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        if _plain_conv(gm, u) is not None and u.args[0] is cur:
            return steps, gm.get_submodule(u.target)
        if u.op == "call_module" and _chain_module(gm.get_submodule(u.target)):
            steps.append(gm.get_submodule(u.target))
        elif (u.op == "call_function" and u.target in _CHAIN_FUNCTIONS) or (
                u.op == "call_method" and u.target == "relu"):
            steps.append(torch.relu)
        else:
            return None
        cur = u


def _keep_channels(a, steps, b):
    """bool [O_a]: the output channels of a that must stay."""
    k, o = a.masks.shape[0], a.weight.shape[0]
    filt = a.masks.any(0).reshape(o, -1).any(1)
    reads = b.masks.any(0).transpose(0, 1).reshape(o, -1).any(1)
    t = torch.zeros(k, o, 8, 8, dtype=a.weight.dtype, device=a.weight.device)  # one row a module
    if a.bias is not None:
        t = t + a.bias.detach().reshape(1, o, 1, 1)
    with torch.no_grad():
        for step in steps:
            t = step(t)
    return reads & (filt | (t[:, :, 0, 0] != 0).any(0))


def _cut_batchnorm(bn, keep):
    """A copy of the BatchNorm2d `bn` keeping only the channels `keep` (bool [C])."""
    new = nn.BatchNorm2d(int(keep.sum()), bn.eps, bn.momentum, bn.affine,
                         bn.track_running_stats).eval()
    state = {k: (v[keep] if v.dim() == 1 else v) for k, v in bn.state_dict().items()}
    new.load_state_dict(state)
    return new


def _replace(gm, old, new):
    for name, m in list(gm.named_modules()):
        if m is old:
            parent, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, new)


def prune_channels(gm) -> int:
    """Prune the chains of the fx.GraphModule `gm` in place; returns the channels removed."""
    removed, changed = 0, True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            a = _plain_conv(gm, node)
            found = _chain(gm, node) if a is not None else None
            if found is None:
                continue
            steps, b = found
            keep = _keep_channels(a, steps, b)
            if bool(keep.all()) or not bool(keep.any()):
                continue
            a.weight = nn.Parameter(a.weight.detach()[keep], requires_grad=False)
            a.masks = a.masks[:, keep]
            if a.bias is not None:
                a.bias = nn.Parameter(a.bias.detach()[keep], requires_grad=False)
            for step in steps:
                if isinstance(step, nn.BatchNorm2d):
                    _replace(gm, step, _cut_batchnorm(step, keep))
                elif isinstance(step, PlainModuleBatchNorm):
                    step.keep_units(keep)
            b.weight = nn.Parameter(b.weight.detach()[:, keep], requires_grad=False)
            b.masks = b.masks[:, :, keep]
            removed += int((~keep).sum())
            changed = True
    return removed
