"""The fused view of a converted network: the same computation, with its BatchNorm + ReLU pairs
and 2 x 2 max pools run by modsplit's one-pass CPU kernels (modsplit.ops.channel_affine,
modsplit.ops.max_pool2x2).

MultiModuleNet runs its network through this view. The view shares every parameter, buffer and
leaf module with the network; only the containers on the way to a replaced layer are copied
(shallowly), so the network itself, its state_dict and everything that reads it (banks,
exports, compaction) are unchanged. What is replaced:

  * inside an nn.Sequential, a BatchNorm1d / BatchNorm2d or ModuleBatchNorm directly followed by
    an nn.ReLU: NormReLU(norm) in its place and nn.Identity() in the ReLU's;
  * any other BatchNorm1d / BatchNorm2d: NormReLU(norm, relu=False);
  * nn.MaxPool2d(2) (kernel 2, stride 2, no padding, dilation 1, floor mode, no indices):
    MaxPool2x2.

Layers with hooks are left alone. Each replacement computes what it replaces (the affine map
rounds as a fused multiply-add may) and runs the original layers wherever the kernels do not
(not a CPU float32 / float64 tensor, a non-CPU backend) or the fusion does not apply (an
nn.BatchNorm in training mode or without running statistics).
"""
import copy

import torch
import torch.nn as nn

from modsplit import ops
from modsplit.backend import uses_cpu_kernel
from modsplit.module_norm import ModuleBatchNorm

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def hookless(m: nn.Module) -> bool:
    """m has no forward, forward-pre, backward or backward-pre hook of its own."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


class NormReLU(nn.Module):
    """BatchNorm (nn.BatchNorm1d / 2d in eval mode, or a ModuleBatchNorm) and, with relu, the ReLU
    after it, in one pass on the CPU kernels. norm is shared, not copied (and not registered:
    the view owns no state). forward(x float [R, C, *]) -> like x."""

    def __init__(self, norm: nn.Module, relu: bool = True):
        super().__init__()
        self.__dict__["norm"] = norm
        self.relu = bool(relu)

    def forward(self, x):
        norm = self.norm
        if isinstance(norm, ModuleBatchNorm):
            return norm(x, relu=self.relu)
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in norm.parameters())
        if (norm.training or norm.running_mean is None or trainable or x.dim() < 2
                or not uses_cpu_kernel(x)):
            y = norm(x)
            return torch.relu(y) if self.relu else y
        with torch.no_grad():  # frozen statistics: y = x * scale + shift per channel
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
        return ops.channel_affine(x, 1, scale.unsqueeze(0).to(x.dtype),
                                  shift.unsqueeze(0).to(x.dtype), self.relu)

    def extra_repr(self):
        return f"{type(self.norm).__name__}, relu={self.relu}"


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _is_pool2x2(m: nn.Module) -> bool:
    """m is exactly nn.MaxPool2d(2)."""
    return (type(m) is nn.MaxPool2d and _pair(m.kernel_size) == (2, 2)
            and _pair(m.stride if m.stride is not None else m.kernel_size) == (2, 2)
            and _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) on the CPU kernel (uint8 window positions for the backward); pool is the
    layer it stands for (shared). forward(x float [N, C, H, W]) -> [N, C, H/2, W/2]."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.__dict__["pool"] = pool

    def forward(self, x):
        if x.dim() == 4 and x.shape[2] >= 2 and x.shape[3] >= 2 and uses_cpu_kernel(x):
            return ops.max_pool2x2(x)[0]
        return self.pool(x)


def _fusable_norm(m: nn.Module) -> bool:
    return (isinstance(m, ModuleBatchNorm) or type(m) in _BATCHNORMS) and hookless(m)


class FusedView:
    """The fused view of `net` (see the module docstring). view: the module to run (net itself
    when nothing is replaced). sync() copies the training flags of the copied containers from
    net's before a run, so that train() / eval() on net reach them; stale(): a replaced layer
    has got a hook since (the view must be rebuilt, so that the hook runs)."""

    def __init__(self, net: nn.Module):
        self.copies = []  # (copy, original) containers
        self.replaced = []  # the layers the view runs as fused ones
        self.view = self._twin(net)

    def sync(self):
        for twin, original in self.copies:
            twin.training = original.training
        return self.view

    def stale(self) -> bool:
        return not all(hookless(m) for m in self.replaced)

    def _twin(self, module: nn.Module) -> nn.Module:
        if not hookless(module):
            return module
        if _is_pool2x2(module):
            self.replaced.append(module)
            return MaxPool2x2(module)
        if type(module) in _BATCHNORMS:
            self.replaced.append(module)
            return NormReLU(module, relu=False)
        if not module._modules:
            return module
        children = dict(module._modules)
        names = list(children)
        fused = set()
        if isinstance(module, nn.Sequential):
            for a, b in zip(names, names[1:]):
                if (a not in fused and _fusable_norm(children[a])
                        and type(children[b]) is nn.ReLU and hookless(children[b])):
                    self.replaced += [children[a], children[b]]
                    children[a], children[b] = NormReLU(children[a]), nn.Identity()
                    fused.update((a, b))
        for name, child in children.items():
            if name not in fused and child is not None:
                children[name] = self._twin(child)
        if all(children[n] is module._modules[n] for n in names):
            return module
        twin = copy.copy(module)
        twin.__dict__["_modules"] = children
        self.copies.append((twin, module))
        return twin
