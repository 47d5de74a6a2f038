"""graft_cross_entropy: co-training's K grafting layers and class-weighted cross-entropy in one
op (decompose.train_step). Fake impls, autograd, the Python wrapper.

The CPU has compiled kernels (float32 / float64, csrc/cpu/graft_cross_entropy_cpu.cpp);
elsewhere (CUDA, the triton or torch backend, float16 / bfloat16) the torch backend's twin runs,
whose autograd is that of its ATen ops.
"""
import torch

from modsplit import torch_backend
from modsplit.backend import uses_cpu_kernel


def graft_cross_entropy(logits, weight, bias, positive, row_weight, scale):
    """logits float [K, R, N], grafts weight [K, N, 2] and bias [K, 2], positive bool [K, R],
    row_weight [K, R] (each row's class weight, 0 for a row that does not count), scale ->
    (out [K, R, 2] = logits @ weight + bias, ce [K] = scale * sum_r row_weight *
    cross_entropy(out[k, r], 0 where positive else 1)). Differentiable in logits, weight and
    bias; out carries no gradient."""
    if uses_cpu_kernel(logits):
        return torch.ops.modsplit.graft_cross_entropy(logits, weight, bias, positive, row_weight,
                                                      float(scale))
    out, ce = torch_backend.graft_cross_entropy(logits, weight, bias, positive, row_weight,
                                                float(scale))
    return out.detach(), ce


@torch.library.register_fake("modsplit::graft_cross_entropy")
def _graft_cross_entropy_fake(logits, weight, bias, positive, row_weight, scale):
    k, r, _ = logits.shape
    return logits.new_empty((k, r, 2)), logits.new_empty((k,))


@torch.library.register_fake("modsplit::graft_cross_entropy_backward")
def _graft_cross_entropy_backward_fake(grad_ce, logits, weight, out, positive, row_weight, scale,
                                       output_mask):
    return (torch.empty_like(logits) if output_mask[0] else None,
            torch.empty_like(weight) if output_mask[1] else None,
            weight.new_empty((weight.shape[0], 2)) if output_mask[2] else None)


def _setup_context(ctx, inputs, output):
    logits, weight, _, positive, row_weight, scale = inputs
    out, _ = output
    ctx.mark_non_differentiable(out)
    ctx.save_for_backward(logits, weight, out, positive, row_weight)
    ctx.scale = scale
    ctx.output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]


def _backward(ctx, _grad_out, grad_ce):
    logits, weight, out, positive, row_weight = ctx.saved_tensors
    grads = torch.ops.modsplit.graft_cross_entropy_backward(
        grad_ce.contiguous(), logits, weight, out, positive, row_weight, ctx.scale,
        ctx.output_mask)
    return (*grads, None, None, None)


torch.library.register_autograd("modsplit::graft_cross_entropy", _backward,
                                setup_context=_setup_context)
