"""module_batch_norm: training-mode BatchNorm with one set of batch statistics per module group
(the training path of modsplit.module_norm.ModuleBatchNorm). Fake impls, autograd, the Python
wrapper.

The CPU has compiled kernels (float32 / float64, csrc/cpu/module_batch_norm_cpu.cpp); elsewhere
(CUDA, the triton or torch backend, float16 / bfloat16) the torch backend's twin runs, whose
autograd is that of its ATen ops.
"""
import torch

from modsplit import torch_backend
from modsplit.backend import uses_cpu_kernel


def module_batch_norm(x, groups, weight=None, bias=None, eps=1e-5, relu=False, offsets=None):
    """Normalise each group's rows with their own batch mean and biased variance, then the
    affine map, then ReLU with relu (in the same pass). x float [G*N, C, *] (groups = G groups
    of N rows, C channels), weight / bias [C] or None -> (y like x, in x's dtype; mean [G, C];
    invstd [G, C]; the statistics are float32 for float16 / bfloat16 x). Differentiable in x,
    weight and bias. offsets int64 [G+1] rising from 0 to x's rows: ragged groups, group g on
    rows offsets[g] .. offsets[g+1] - 1 (a group without rows: mean 0, invstd
    1/sqrt(1 + eps))."""
    if uses_cpu_kernel(x):
        return torch.ops.modsplit.module_batch_norm(x, int(groups), weight, bias, float(eps),
                                                    bool(relu), offsets)
    return torch_backend.module_batch_norm(x, int(groups), weight, bias, float(eps), bool(relu),
                                           offsets)


@torch.library.register_fake("modsplit::module_batch_norm")
def _module_batch_norm_fake(x, groups, weight, bias, eps, relu=False, offsets=None):
    stats = (groups, x.shape[1])
    return torch.empty_like(x), x.new_empty(stats), x.new_empty(stats)


@torch.library.register_fake("modsplit::module_batch_norm_backward")
def _module_batch_norm_backward_fake(grad_y, x, groups, weight, mean, invstd, output_mask,
                                     out=None, offsets=None):
    c = x.shape[1]
    return (torch.empty_like(x) if output_mask[0] else None,
            x.new_empty((c,)) if output_mask[1] else None,
            x.new_empty((c,)) if output_mask[2] else None)


def _setup_context(ctx, inputs, output):
    x, groups, weight, bias, _, *rest = inputs  # the dispatcher drops trailing defaults
    relu, offsets = (rest + [False, None])[:2]
    y, mean, invstd = output
    ctx.mark_non_differentiable(mean, invstd)
    ctx.save_for_backward(x, weight, mean, invstd, y if relu else None, offsets)
    ctx.groups = groups
    ctx.output_mask = [ctx.needs_input_grad[0],
                       weight is not None and ctx.needs_input_grad[2],
                       bias is not None and ctx.needs_input_grad[3]]


def _backward(ctx, grad_y, _grad_mean, _grad_invstd):
    x, weight, mean, invstd, out, offsets = ctx.saved_tensors
    gx, gw, gb = torch.ops.modsplit.module_batch_norm_backward(
        grad_y, x, ctx.groups, weight, mean, invstd, ctx.output_mask, out, offsets)
    return gx, None, gw, gb, None, None, None


torch.library.register_autograd("modsplit::module_batch_norm", _backward,
                                setup_context=_setup_context)
