"""masked_conv2d / multi_masked_conv2d and their backwards, routed like masked_linear.

No kernel of its own. Above modsplit.routing's fused-row threshold (rows = batch x output pixels
per module, nearly always) the expanded path: masked_linear's bit-expansion kernel writes W*M_k
for a chunk of modules, then one torch convolution (cuDNN on a GPU) with groups = chunk*groups
over the module-folded channels, forward and aten.convolution_backward
(modsplit.torch_backend.conv_expanded / conv_backward_expanded). At or below it, the fused path:
the input is unfolded (im2col, F.unfold) into rows of R = C/groups*kh*kw columns, whose flat
order is the mask's column order, and each group runs the fused masked_linear kernels against
weight[group].reshape(O/groups, R); grad_x folds the column gradients back (F.fold).

Shapes: x [B, C, H, W] (shared by all modules) or [K, B, C, H, W]; weight [O, C/groups, kh, kw];
packed int32 [O, ceil(R/32)] or [K, O, ceil(R/32)]; output [B, O, Ho, Wo] or [K, B, O, Ho, Wo].
"""
import torch
import torch.nn.functional as F

from modsplit import routing
from modsplit import torch_backend as tb

from .masked_linear import _forward, _grad_scores, _grad_x, _weight_grad, expand
from .utils import register_op

_ARGS = "int[2] stride, int[2] padding, int[2] dilation, int groups"


def _columns(x, weight, stride, padding, dilation, groups):
    """x [N, C, H, W] -> (columns [groups, N * L, R], (Ho, Wo)); L = Ho * Wo."""
    kh, kw = weight.shape[2:]
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    n, _, length = cols.shape
    ho = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = cols.reshape(n, groups, -1, length).permute(1, 0, 3, 2)
    return cols.reshape(groups, n * length, cols.shape[-1]), (ho, wo)


class _Problem:
    """One conv call seen as `groups` masked GEMMs over K modules (K = 1 for the single op)."""

    def __init__(self, x, weight, packed, stride, padding, dilation, groups):
        self.packed = packed if packed.dim() == 3 else packed[None]
        self.k = self.packed.shape[0]
        self.shared = x.dim() == 4
        self.x_shape = x.shape
        self.args = (stride, padding, dilation, groups)
        self.batch = x.shape[-4]
        cols, self.hw = _columns(x.reshape(-1, *x.shape[-3:]), weight, *self.args)
        self.cols = cols if self.shared else cols.reshape(groups, self.k, -1, cols.shape[-1])
        self.weight = weight
        self.og = weight.shape[0] // groups

    def group(self, gi):
        """(columns, weight [O/groups, R], packed [K, O/groups, words]) of group gi."""
        rows = slice(gi * self.og, (gi + 1) * self.og)
        return self.cols[gi], self.weight[rows].reshape(self.og, -1), self.packed[:, rows]

    def grad_rows(self, grad_out):
        """grad_out [K, B, O, Ho, Wo] (or [B, O, Ho, Wo] for K = 1) -> [K, B * L, O]."""
        g = grad_out.reshape(self.k, self.batch, -1, *self.hw)
        return g.permute(0, 1, 3, 4, 2).reshape(self.k, -1, g.shape[2])

    def forward(self, bias):
        outs = []
        for gi in range(self.args[3]):
            cols, w, p = self.group(gi)
            b = None if bias is None else bias[gi * self.og:(gi + 1) * self.og]
            outs.append(_forward(cols, w, p, b, self.shared))
        y = torch.cat(outs, -1).reshape(self.k, self.batch, *self.hw, -1)
        return y.permute(0, 1, 4, 2, 3).contiguous()

    def grad_x(self, rows, dtype):
        parts = []
        for gi in range(self.args[3]):
            cols, w, p = self.group(gi)
            g = rows[..., gi * self.og:(gi + 1) * self.og]
            parts.append(_grad_x(g, w, p, self.shared, cols.shape, dtype))
        n = self.batch if self.shared else self.k * self.batch
        cols = torch.stack(parts).reshape(self.args[3], n, -1, parts[0].shape[-1])
        cols = cols.permute(1, 0, 3, 2).reshape(n, -1, cols.shape[2])
        stride, padding, dilation, _ = self.args
        gx = F.fold(cols, self.x_shape[-2:], self.weight.shape[2:], dilation=dilation,
                    padding=padding, stride=stride)
        return gx.reshape(self.x_shape)

    def grad_w(self, rows, weight_grad):
        """[K, *weight.shape] = dL/d(W*M) * W per module, or with weight_grad the exact
        [*weight.shape] = sum_k dL/d(W*M_k) * M_k."""
        parts = []
        for gi in range(self.args[3]):
            cols, w, p = self.group(gi)
            g = rows[..., gi * self.og:(gi + 1) * self.og]
            parts.append(_weight_grad(g, cols, w, p, self.shared) if weight_grad
                         else _grad_scores(g, cols, w, self.k, self.shared))
        if weight_grad:
            return torch.cat(parts, 0).reshape(self.weight.shape)
        return torch.cat(parts, 1).reshape(self.k, *self.weight.shape)


def _expand_conv(weight, packed):
    """W*M_k [K, *weight.shape] through masked_linear's bit-expansion kernel."""
    return expand(weight.reshape(weight.shape[0], -1), packed).reshape(packed.shape[0],
                                                                        *weight.shape)


def _fused(x, weight, packed, stride, padding, dilation):
    """True when the rows per module (batch x output pixels) take the fused kernels."""
    kh, kw = weight.shape[2:]
    ho = (x.shape[-2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[-1] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return routing.use_fused(x.shape[-4] * max(ho, 0) * max(wo, 0), x.dtype)


def _bank(packed):
    return packed if packed.dim() == 3 else packed[None]


def _forward_conv(x, weight, packed, bias, stride, padding, dilation, groups):
    """[K, B, O, Ho, Wo] for x [B, C, H, W] shared or [K, B, C, H, W]."""
    if _fused(x, weight, packed, stride, padding, dilation):
        return _Problem(x, weight, packed, stride, padding, dilation, groups).forward(bias)
    return tb.conv_expanded(x, weight, _bank(packed), bias, stride, padding, dilation, groups,
                            _expand_conv)


def _backward(grad_out, x, weight, packed, stride, padding, dilation, groups, output_mask):
    if not _fused(x, weight, packed, stride, padding, dilation):
        single = packed.dim() == 2
        g = grad_out[None] if single else grad_out
        gx, gs, gb = tb.conv_backward_expanded(g, x, weight, _bank(packed), stride, padding,
                                               dilation, groups, output_mask, _expand_conv)
        return gx, gs[0] if single and gs is not None else gs, gb
    prob = _Problem(x, weight, packed, stride, padding, dilation, groups)
    rows = prob.grad_rows(grad_out)
    gs = prob.grad_w(rows, False) if output_mask[1] else None
    return (prob.grad_x(rows, x.dtype) if output_mask[0] else None,
            gs if gs is None or packed.dim() == 3 else gs[0],
            rows.reshape(-1, weight.shape[0]).sum(0) if output_mask[2] else None)


@register_op("modsplit_triton::masked_conv2d",
             f"(Tensor x, Tensor weight, Tensor packed, Tensor? bias, {_ARGS}) -> Tensor")
def masked_conv2d(x, weight, packed, bias, stride, padding, dilation, groups):
    """conv2d with weight W*M: x [B, C, H, W], weight [O, C/groups, kh, kw], packed int32
    [O, ceil(C/groups*kh*kw/32)], bias [O] or None -> [B, O, Ho, Wo]."""
    return _forward_conv(x, weight, packed, bias, stride, padding, dilation, groups)[0]


@register_op("modsplit_triton::multi_masked_conv2d",
             f"(Tensor x, Tensor weight, Tensor packed, Tensor? bias, {_ARGS}) -> Tensor")
def multi_masked_conv2d(x, weight, packed, bias, stride, padding, dilation, groups):
    """K modules over one weight: x [B, C, H, W] shared or [K, B, C, H, W], packed int32
    [K, O, words] -> [K, B, O, Ho, Wo]."""
    return _forward_conv(x, weight, packed, bias, stride, padding, dilation, groups)


_BACKWARD_SCHEMA = (f"(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, {_ARGS}, "
                    "bool[3] output_mask) -> (Tensor, Tensor, Tensor)")


@register_op("modsplit_triton::masked_conv2d_backward", _BACKWARD_SCHEMA)
def masked_conv2d_backward(grad_out, x, weight, packed, stride, padding, dilation, groups,
                           output_mask):
    """-> (grad_x, grad_scores = dL/d(W*M) * W [*weight.shape], grad_bias [O]); None where
    output_mask is False."""
    return _backward(grad_out, x, weight, packed, stride, padding, dilation, groups, output_mask)


@register_op("modsplit_triton::multi_masked_conv2d_backward", _BACKWARD_SCHEMA)
def multi_masked_conv2d_backward(grad_out, x, weight, packed, stride, padding, dilation, groups,
                                 output_mask):
    """-> (grad_x shaped like x (summed over modules when shared), grad_scores [K, *weight.shape],
    grad_bias [O]); None where output_mask is False."""
    return _backward(grad_out, x, weight, packed, stride, padding, dilation, groups, output_mask)


@register_op("modsplit_triton::masked_conv2d_weight_grad",
             f"(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, {_ARGS}) -> Tensor")
def masked_conv2d_weight_grad(grad_out, x, weight, packed, stride, padding, dilation, groups):
    """Exact dL/dW [*weight.shape] = sum_k dL/d(W*M_k) * M_k; packed [O, words] or
    [K, O, words]."""
    if _fused(x, weight, packed, stride, padding, dilation):
        prob = _Problem(x, weight, packed, stride, padding, dilation, groups)
        return prob.grad_w(prob.grad_rows(grad_out), True)
    bank, ones = _bank(packed), torch.ones_like(weight)
    g = grad_out[None] if packed.dim() == 2 else grad_out
    _, raw, _ = tb.conv_backward_expanded(g, x, ones, bank, stride, padding, dilation, groups,
                                          [False, True, False], _expand_conv)  # dL/d(W*M_k)
    return sum((raw[k0:k1] * _expand_conv(ones, bank[k0:k1])).sum(0)
               for k0, k1 in tb.module_chunks(bank.shape[0], weight))


def _setup(ctx, inputs, output):
    x, weight, packed, _, *conv_args = inputs
    ctx.conv_args = conv_args
    ctx.save_for_backward(x, weight, packed)


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        x, weight, packed = ctx.saved_tensors
        need_x, need_w, _, need_b = (tuple(ctx.needs_input_grad) + (False,) * 4)[:4]
        gx, _, gb = backward_op(grad_out, x, weight, packed, *ctx.conv_args,
                                [need_x, False, need_b])
        gw = (masked_conv2d_weight_grad(grad_out, x, weight, packed, *ctx.conv_args)
              if need_w else None)
        return gx, gw, None, gb, None, None, None, None
    return backward


masked_conv2d.register_autograd(_make_backward(masked_conv2d_backward), setup_context=_setup)
multi_masked_conv2d.register_autograd(_make_backward(multi_masked_conv2d_backward),
                                      setup_context=_setup)
