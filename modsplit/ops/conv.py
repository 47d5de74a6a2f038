"""masked_conv2d and multi_masked_conv2d: fake impls, autograd, Python wrappers."""
import torch

from modsplit.backend import ops_for
from modsplit.reference import unpack_mask as _unpack_ref
from modsplit.torch_backend import conv_out_hw

_ops = torch.ops.modsplit


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def masked_conv2d(x, weight, packed, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv2d with weight W*M. x [B, C, H, W], weight [O, C/groups, kh, kw],
    packed int32 [O, ceil(C/groups*kh*kw/32)], bias [O] or None -> [B, O, Ho, Wo]."""
    return ops_for(x).masked_conv2d(x, weight, packed, bias, _pair(stride), _pair(padding),
                                    _pair(dilation), int(groups))


def multi_masked_conv2d(x, weight, packed, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """K modules over one weight. x [B, C, H, W] shared or [K, B, C, H, W] per module,
    packed int32 [K, O, words] -> [K, B, O, Ho, Wo]."""
    return ops_for(x).multi_masked_conv2d(x, weight, packed, bias, _pair(stride),
                                          _pair(padding), _pair(dilation), int(groups))


@torch.library.register_fake("modsplit::masked_conv2d")
def _masked_conv2d_fake(x, weight, packed, bias, stride, padding, dilation, groups):
    return x.new_empty((x.shape[0], weight.shape[0],
                        *conv_out_hw(x, weight, stride, padding, dilation)))


@torch.library.register_fake("modsplit::multi_masked_conv2d")
def _multi_masked_conv2d_fake(x, weight, packed, bias, stride, padding, dilation, groups):
    return x.new_empty((packed.shape[0], x.shape[-4], weight.shape[0],
                        *conv_out_hw(x, weight, stride, padding, dilation)))


def _backward_fake(grad_out, x, weight, packed, stride, padding, dilation, groups, output_mask):
    score_shape = (*packed.shape[:-2], *weight.shape)
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty(score_shape) if output_mask[1] else None,
            weight.new_empty(weight.shape[:1]) if output_mask[2] else None)


torch.library.register_fake("modsplit::masked_conv2d_backward", _backward_fake)
torch.library.register_fake("modsplit::multi_masked_conv2d_backward", _backward_fake)


def _setup(ctx, inputs, output):
    x, weight, packed, _, stride, padding, dilation, groups = inputs
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.save_for_backward(x, weight, packed)


def _exact_weight_grad(grad_out, x, weight, packed, stride, padding, dilation, groups):
    """dL/dW = dL/d(W*M) * M (summed over modules for a bank), via ATen's conv backward."""
    multi = packed.dim() == 3
    xs = (x if x.dim() == 5 else x.expand(packed.shape[0], *x.shape)) if multi else x[None]
    gs = grad_out if multi else grad_out[None]
    ps = packed if multi else packed[None]
    total = torch.zeros_like(weight)
    for xk, gk, pk in zip(xs, gs, ps):
        gw = torch.ops.aten.convolution_backward(gk, xk, weight, None, stride, padding, dilation,
                                                 False, [0, 0], groups, [False, True, False])[1]
        total += gw * _unpack_ref(pk, weight.shape).to(weight.dtype)
    return total


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        x, weight, packed = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        gx, _, gb = backward_op(grad_out, x, weight, packed, *ctx.conv_args, [need_x, False, need_b])
        gw = _exact_weight_grad(grad_out, x, weight, packed, *ctx.conv_args) if need_w else None
        return gx, gw, None, gb, None, None, None, None
    return backward


torch.library.register_autograd("modsplit::masked_conv2d",
                                _make_backward(_ops.masked_conv2d_backward), setup_context=_setup)
torch.library.register_autograd("modsplit::multi_masked_conv2d",
                                _make_backward(_ops.multi_masked_conv2d_backward),
                                setup_context=_setup)
