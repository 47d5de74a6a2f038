"""ragged_masked_conv2d and its backward: K modules over one conv weight, module k on its own rows
offsets[k] .. offsets[k+1] - 1 of the output, reading x[rows[t]] (decompose's sampled negatives).

No kernel of its own: after one host read of offsets, each module with rows is a one-module
problem of masked_conv2d.py (the fused unfold + GEMM kernels at few rows x output pixels, else
the bit-expansion kernel and a torch convolution), as the C++ twins run it per module.

Shapes: x [R, C, H, W]; weight [O, C/groups, kh, kw]; packed int32 [K, O, ceil(R/32)]; offsets
int64 [K+1]; rows int64 [T] or None (T = R); output [T, O, Ho, Wo]; grad_scores
[K, *weight.shape] (0 * W for a module without rows).
"""
import torch

from modsplit import torch_backend as tb

from .masked_conv2d import _ARGS, _backward, _forward_conv, masked_conv2d_weight_grad
from .ragged_masked_linear import _traced
from .utils import register_op


def _out_shape(x, weight, t, stride, padding, dilation):
    return (t, weight.shape[0], *tb.conv_out_hw(x, weight, stride, padding, dilation))


@register_op("modsplit_triton::ragged_masked_conv2d",
             "(Tensor x, Tensor weight, Tensor packed, Tensor offsets, Tensor? rows, "
             f"Tensor? bias, {_ARGS}) -> Tensor")
def ragged_masked_conv2d(x, weight, packed, offsets, rows, bias, stride, padding, dilation,
                         groups):
    """out[t] = conv2d(x[rows[t]], W*M_k) + b for offsets[k] <= t < offsets[k+1]."""
    if _traced(x, offsets, rows):
        t = x.shape[0] if rows is None else rows.shape[0]
        return x.new_empty(_out_shape(x, weight, t, stride, padding, dilation))
    _, t = tb.check_ragged_conv(x, weight, packed, offsets, rows, bias, groups)
    return tb.ragged_conv_forward(
        x, offsets, rows, _out_shape(x, weight, t, stride, padding, dilation),
        lambda k, xk: _forward_conv(xk, weight, packed[k], bias, stride, padding, dilation,
                                    groups)[0])


@register_op("modsplit_triton::ragged_masked_conv2d_backward",
             "(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, Tensor offsets, "
             f"Tensor? rows, {_ARGS}, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")
def ragged_masked_conv2d_backward(grad_out, x, weight, packed, offsets, rows, stride, padding,
                                  dilation, groups, output_mask):
    """-> (grad_x like x (with rows: summed over the t with rows[t] = r), grad_scores
    [K, *weight.shape], grad_bias [O]); None where output_mask is False."""
    k = packed.shape[0]
    if _traced(grad_out, x, offsets, rows):
        return (x.new_empty(x.shape) if output_mask[0] else None,
                weight.new_empty((k, *weight.shape)) if output_mask[1] else None,
                weight.new_empty(weight.shape[:1]) if output_mask[2] else None)
    _, t = tb.check_ragged_conv(x, weight, packed, offsets, rows, None, groups)
    want = _out_shape(x, weight, t, stride, padding, dilation)
    if tuple(grad_out.shape) != want or grad_out.dtype != x.dtype:
        raise ValueError(f"modsplit: grad_out must be {x.dtype} {list(want)}, got "
                         f"{grad_out.dtype} {list(grad_out.shape)}")
    return tb.ragged_conv_backward(
        grad_out, x, weight, offsets, rows, output_mask,
        lambda m, xk, gk: _backward(gk, xk, weight, packed[m], stride, padding, dilation, groups,
                                    [output_mask[0], output_mask[1], False])[:2])


@register_op("modsplit_triton::ragged_masked_conv2d_weight_grad",
             "(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, Tensor offsets, "
             f"Tensor? rows, {_ARGS}) -> Tensor")
def ragged_masked_conv2d_weight_grad(grad_out, x, weight, packed, offsets, rows, stride, padding,
                                     dilation, groups):
    """Exact dL/dW [*weight.shape] = sum_k dL/d(W*M_k) * M_k (autograd's weight gradient)."""
    if _traced(grad_out, x, offsets, rows):
        return weight.new_empty(weight.shape)
    xs = x if rows is None else x.index_select(0, rows)
    bounds = offsets.tolist()
    total = torch.zeros_like(weight)
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            total += masked_conv2d_weight_grad(grad_out[a:b], xs[a:b], weight, packed[k], stride,
                                               padding, dilation, groups)
    return total


def _setup(ctx, inputs, output):
    x, weight, packed, offsets, rows, _, *conv_args = inputs
    ctx.has_rows, ctx.conv_args = rows is not None, conv_args
    ctx.save_for_backward(x, weight, packed, offsets, *([rows] if ctx.has_rows else []))


def _backward_fn(ctx, grad_out):
    x, weight, packed, offsets, *rest = ctx.saved_tensors
    rows = rest[0] if ctx.has_rows else None
    need_x, need_w, _, _, _, need_b = (tuple(ctx.needs_input_grad) + (False,) * 10)[:6]
    grad_out = grad_out.contiguous()
    gx, _, gb = ragged_masked_conv2d_backward(grad_out, x, weight, packed, offsets, rows,
                                              *ctx.conv_args, [need_x, False, need_b])
    gw = (ragged_masked_conv2d_weight_grad(grad_out, x, weight, packed, offsets, rows,
                                           *ctx.conv_args) if need_w else None)
    return gx, gw, None, None, None, gb, None, None, None, None


ragged_masked_conv2d.register_autograd(_backward_fn, setup_context=_setup)
