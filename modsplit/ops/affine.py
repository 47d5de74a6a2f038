"""channel_affine: a per-(group, channel) affine map with an optional ReLU in one pass
(BatchNorm in eval mode and the ReLU after it; modsplit.fused_layers.NormReLU). Fake impls,
autograd, the Python wrapper.

The CPU has compiled kernels (float32 / float64, csrc/cpu/channel_affine_cpu.cpp); elsewhere
(CUDA, the triton or torch backend, float16 / bfloat16) the torch backend's twin runs, whose
autograd is that of its ATen ops.
"""
import torch

from modsplit import torch_backend
from modsplit.backend import uses_cpu_kernel


def channel_affine(x, groups, scale, shift, relu=False):
    """y = x * scale[g, c] + shift[g, c] on group g's rows, then ReLU with relu.
    x float [G*N, C, *] (groups = G groups of N rows, C channels), scale / shift [G, C] of x's
    dtype -> y like x. Differentiable in x, scale and shift."""
    if uses_cpu_kernel(x):
        return torch.ops.modsplit.channel_affine(x, int(groups), scale, shift, bool(relu))
    return torch_backend.channel_affine(x, int(groups), scale, shift, bool(relu))


@torch.library.register_fake("modsplit::channel_affine")
def _channel_affine_fake(x, groups, scale, shift, relu=False):
    return torch.empty_like(x)


@torch.library.register_fake("modsplit::channel_affine_backward")
def _channel_affine_backward_fake(grad_y, out, groups, scale, relu):
    return torch.empty_like(grad_y)


def _setup_context(ctx, inputs, output):
    x, groups, scale, _, relu = inputs
    want_affine = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ctx.save_for_backward(output if relu else None, scale, x if want_affine else None)
    ctx.groups, ctx.relu = groups, relu


def _backward(ctx, grad_y):
    out, scale, x = ctx.saved_tensors
    gx = gscale = gshift = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.modsplit.channel_affine_backward(grad_y, out, ctx.groups, scale, ctx.relu)
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:  # sums over each group's rows
        g = grad_y if not ctx.relu else torch.where(out <= 0, torch.zeros_like(grad_y), grad_y)
        g = g.reshape(ctx.groups, g.shape[0] // ctx.groups, g.shape[1], -1)
        if ctx.needs_input_grad[2]:
            gscale = (g * x.reshape(g.shape)).sum((1, 3))
        if ctx.needs_input_grad[3]:
            gshift = g.sum((1, 3))
    return gx, None, gscale, gshift, None


torch.library.register_autograd("modsplit::channel_affine", _backward,
                                setup_context=_setup_context)
