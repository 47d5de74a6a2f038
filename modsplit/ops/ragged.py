"""ragged_masked_linear and ragged_masked_conv2d: K modules over one weight, each on its own
set of rows (decompose's sampled negatives): fake impls, autograd, Python wrappers.

Rows of module k: offsets[k] .. offsets[k+1] - 1 of the output, reading x[rows[t]] (or x[t]
without rows), so the work is the T rows the modules take, not K times the batch.
"""
import torch

from modsplit import torch_backend
from modsplit.backend import ops_for, uses_cpu_kernel
from modsplit.ops.conv import _pair
from modsplit.ops.linear import _needs
from modsplit.reference import unpack_mask as _unpack_ref

_ops = torch.ops.modsplit


def ragged_masked_linear(x, weight, packed, offsets, rows=None, bias=None):
    """out[t] = x[rows[t]] (W*M_k)^T + b for offsets[k] <= t < offsets[k+1].

    x float [R, I]; weight [O, I]; packed int32 [K, O, ceil(I/32)]; offsets int64 [K+1]
    rising from 0 to T; rows int64 [T] in [0, R), or None (module k takes x's rows
    offsets[k] .. offsets[k+1] - 1, T = R); bias [O] or None -> out [T, O], x's dtype."""
    return ops_for(x).ragged_masked_linear(x, weight, packed, offsets, rows, bias)


def ragged_masked_linear_grad_scores_(out, grad_out, x, weight, packed, offsets, rows=None):
    """out float [K, O, I] <- the score gradient (g_k^T x_k) * W of ragged_masked_linear (the
    second output of its backward), written in place; grad_out [T, O], the rest as for
    ragged_masked_linear. A caller that keeps out between steps reuses its memory. The C++
    kernel for float32 / float64 CPU tensors ("auto" / "cpu" backend), the torch backend's
    twin elsewhere."""
    if uses_cpu_kernel(x):
        _ops.ragged_masked_linear_grad_scores_(out, grad_out, x, weight, packed, offsets, rows)
    else:
        torch_backend.ragged_masked_linear_grad_scores_(out, grad_out, x, weight, packed,
                                                        offsets, rows)
    return out


@torch.library.register_fake("modsplit::ragged_masked_linear_grad_scores_")
def _ragged_masked_linear_grad_scores_fake(out, grad_out, x, weight, packed, offsets, rows):
    return None


@torch.library.register_fake("modsplit::ragged_masked_linear")
def _ragged_masked_linear_fake(x, weight, packed, offsets, rows=None, bias=None):
    return x.new_empty((x.shape[0] if rows is None else rows.shape[0], weight.shape[0]))


@torch.library.register_fake("modsplit::ragged_masked_linear_backward")
def _ragged_masked_linear_backward_fake(grad_out, x, weight, packed, offsets, rows, output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty((packed.shape[0], *weight.shape)) if output_mask[1] else None,
            weight.new_empty(weight.shape[:1]) if output_mask[2] else None)


def _exact_weight_grad(grad_out, x, packed, offsets, rows, weight):
    """dL/dW [O, I] of the ragged product: sum_k (g_k^T x_k) * M_k."""
    xs = x if rows is None else x.index_select(0, rows)
    o, i = weight.shape
    total = torch.zeros_like(weight)
    for k, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if b > a:
            total += (grad_out[a:b].T @ xs[a:b]) * _unpack_ref(packed[k], (o, i)).to(weight.dtype)
    return total


def _setup(ctx, inputs, output):
    x, weight, packed, offsets = inputs[:4]
    rows = inputs[4] if len(inputs) > 4 else None
    ctx.has_rows = rows is not None
    ctx.save_for_backward(x, weight, packed, offsets, *([rows] if ctx.has_rows else []))


def _backward(ctx, grad_out):
    x, weight, packed, offsets, *rest = ctx.saved_tensors
    rows = rest[0] if ctx.has_rows else None
    need_x, need_w, _, _, _, need_b = _needs(ctx, 6)
    gx, _, gb = _ops.ragged_masked_linear_backward(grad_out.contiguous(), x, weight, packed,
                                                   offsets, rows, [need_x, False, need_b])
    gw = _exact_weight_grad(grad_out, x, packed, offsets, rows, weight) if need_w else None
    return gx, gw, None, None, None, gb


torch.library.register_autograd("modsplit::ragged_masked_linear", _backward,
                                setup_context=_setup)


# ---- conv ---------------------------------------------------------------------------------------

def ragged_masked_conv2d(x, weight, packed, offsets, rows=None, bias=None, stride=1, padding=0,
                         dilation=1, groups=1):
    """out[t] = conv2d(x[rows[t]], W*M_k) + b for offsets[k] <= t < offsets[k+1].

    x float [R, C, H, W]; weight [O, C/groups, kh, kw]; packed int32 [K, O, ceil(C/groups*kh*kw
    /32)]; offsets int64 [K+1] rising from 0 to T; rows int64 [T] in [0, R), or None (module k
    takes x's rows offsets[k] .. offsets[k+1] - 1, T = R); bias [O] or None -> out
    [T, O, Ho, Wo], x's dtype."""
    return ops_for(x).ragged_masked_conv2d(x, weight, packed, offsets, rows, bias, _pair(stride),
                                           _pair(padding), _pair(dilation), int(groups))


@torch.library.register_fake("modsplit::ragged_masked_conv2d")
def _ragged_masked_conv2d_fake(x, weight, packed, offsets, rows, bias, stride, padding, dilation,
                               groups):
    t = x.shape[0] if rows is None else rows.shape[0]
    hw = torch_backend.conv_out_hw(x, weight, stride, padding, dilation)
    return x.new_empty((t, weight.shape[0], *hw))


@torch.library.register_fake("modsplit::ragged_masked_conv2d_backward")
def _ragged_masked_conv2d_backward_fake(grad_out, x, weight, packed, offsets, rows, stride,
                                        padding, dilation, groups, output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty((packed.shape[0], *weight.shape)) if output_mask[1] else None,
            weight.new_empty(weight.shape[:1]) if output_mask[2] else None)


def _exact_conv_weight_grad(grad_out, x, weight, packed, offsets, rows, stride, padding,
                            dilation, groups):
    """dL/dW [*weight.shape] of the ragged convolution: sum_k dL/d(W*M_k) * M_k (ATen's
    convolution backward per module with rows)."""
    xs = x if rows is None else x.index_select(0, rows)
    total = torch.zeros_like(weight)
    for k, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        if b > a:
            gw = torch.ops.aten.convolution_backward(
                grad_out[a:b], xs[a:b], weight, None, stride, padding, dilation, False, [0, 0],
                groups, [False, True, False])[1]
            total += gw * _unpack_ref(packed[k], weight.shape).to(weight.dtype)
    return total


def _setup_conv(ctx, inputs, output):
    x, weight, packed, offsets, rows, _, *conv_args = inputs
    ctx.has_rows, ctx.conv_args = rows is not None, conv_args
    ctx.save_for_backward(x, weight, packed, offsets, *([rows] if ctx.has_rows else []))


def _backward_conv(ctx, grad_out):
    x, weight, packed, offsets, *rest = ctx.saved_tensors
    rows = rest[0] if ctx.has_rows else None
    need_x, need_w, _, _, _, need_b = _needs(ctx, 10)[:6]
    grad_out = grad_out.contiguous()
    gx, _, gb = _ops.ragged_masked_conv2d_backward(grad_out, x, weight, packed, offsets, rows,
                                                   *ctx.conv_args, [need_x, False, need_b])
    gw = (_exact_conv_weight_grad(grad_out, x, weight, packed, offsets, rows, *ctx.conv_args)
          if need_w else None)
    return gx, gw, None, None, None, gb, None, None, None, None


torch.library.register_autograd("modsplit::ragged_masked_conv2d", _backward_conv,
                                setup_context=_setup_conv)
