"""max_pool2x2: nn.MaxPool2d(2) (stride 2, floor mode) with uint8 window positions instead of
int64 flat indices (modsplit.fused_layers.MaxPool2x2). Fake impls, autograd, the Python wrapper.

The CPU has compiled kernels (float32 / float64, csrc/cpu/max_pool2x2_cpu.cpp); elsewhere
(CUDA, the triton or torch backend, float16 / bfloat16) the torch backend's twin runs (ATen's
max_pool2d, whose autograd it keeps).
"""
import torch

from modsplit import torch_backend
from modsplit.backend import uses_cpu_kernel


def max_pool2x2(x):
    """x float [N, C, H, W] (H, W >= 2) -> (y [N, C, H/2, W/2] like F.max_pool2d(x, 2), ties to
    the first position and NaN propagated as ATen does; indices uint8 [N, C, H/2, W/2]: the
    window position 2 * dy + dx of each maximum). Differentiable in x."""
    if uses_cpu_kernel(x):
        return torch.ops.modsplit.max_pool2x2(x)
    return torch_backend.max_pool2x2(x)


@torch.library.register_fake("modsplit::max_pool2x2")
def _max_pool2x2_fake(x):
    n, c, h, w = x.shape
    return x.new_empty((n, c, h // 2, w // 2)), x.new_empty((n, c, h // 2, w // 2),
                                                            dtype=torch.uint8)


@torch.library.register_fake("modsplit::max_pool2x2_backward")
def _max_pool2x2_backward_fake(grad_y, indices, input_size):
    return grad_y.new_empty((*grad_y.shape[:2], *input_size))


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    _, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(indices)
    ctx.input_size = tuple(x.shape[2:])


def _backward(ctx, grad_y, _grad_indices):
    (indices,) = ctx.saved_tensors
    return torch.ops.modsplit.max_pool2x2_backward(grad_y.contiguous(), indices, ctx.input_size)


torch.library.register_autograd("modsplit::max_pool2x2", _backward, setup_context=_setup_context)
