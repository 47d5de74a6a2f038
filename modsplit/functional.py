"""Score-differentiable masked layers (edge-popup's straight-through estimator).

The mask is M = topk(|S|); the forward uses W*M; the backward sends grad_S = dL/d(W*M) * W * sign(S)
(GetSubnet passes the gradient straight through, |S| multiplies it by sign(S)). The packed mask is
passed in so that callers compute it once per step with multi_topk_mask.
"""
import contextlib

import torch

from modsplit.backend import ops_for
from modsplit.ops.conv import _pair


_RAW = [False]  # raw_score_grad() in force: backward leaves grad_S before sgn(S)


@contextlib.contextmanager
def raw_score_grad(enabled: bool = True):
    """Within the block, the masked layers' forwards record that their backward returns the
    score gradient WITHOUT the straight-through factor sgn(S), i.e. dL/d(W*M) * W. For an
    optimizer that multiplies sgn(S) in itself (score_update.CoTrainSGD with raw_grad=True):
    one pass over the scores less per layer and step."""
    previous = _RAW[0]
    _RAW[0] = bool(enabled)
    try:
        yield
    finally:
        _RAW[0] = previous


def _check_scores(scores, weight, packed):
    """scores must be [K, *weight.shape] with K = packed.shape[0]: the backward writes one score
    gradient per module, so a mismatch would otherwise surface late or be summed silently."""
    want = (packed.shape[0], *weight.shape)
    if tuple(scores.shape) != want:
        raise RuntimeError(f"modsplit: scores must have shape [K, *weight.shape] = {list(want)}, "
                           f"got {list(scores.shape)}")


class _MultiMaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scores, packed, bias, shared_input):
        _check_scores(scores, weight, packed)
        ctx.save_for_backward(x, weight, scores, packed)
        ctx.shared_input, ctx.raw = shared_input, _RAW[0]
        ctx.ops = ops_for(x)  # the backward runs on the forward's backend
        return ctx.ops.multi_masked_linear(x, weight, packed, bias, shared_input)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scores, packed = ctx.saved_tensors
        need_x, _, need_s, _, need_b, _ = ctx.needs_input_grad
        gx, gs, gb = ctx.ops.multi_masked_linear_backward(
            grad_out.contiguous(), x, weight, packed, ctx.shared_input, [need_x, need_s, need_b])
        if gs is not None and not ctx.raw:
            gs = gs * scores.sign()
        return gx, None, gs, None, gb, None


class _RaggedMaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scores, packed, offsets, rows, bias):
        _check_scores(scores, weight, packed)
        ctx.save_for_backward(x, weight, scores, packed, offsets,
                              *([] if rows is None else [rows]))
        ctx.has_rows, ctx.raw = rows is not None, _RAW[0]
        ctx.ops = ops_for(x)  # the backward runs on the forward's backend
        return ctx.ops.ragged_masked_linear(x, weight, packed, offsets, rows, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scores, packed, offsets, *rest = ctx.saved_tensors
        need_x, _, need_s, _, _, _, need_b = ctx.needs_input_grad
        gx, gs, gb = ctx.ops.ragged_masked_linear_backward(
            grad_out.contiguous(), x, weight, packed, offsets, rest[0] if ctx.has_rows else None,
            [need_x, need_s, need_b])
        if gs is not None and not ctx.raw:
            gs = gs * scores.sign()
        return gx, None, gs, None, None, None, gb


class _MultiMaskedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scores, packed, bias, stride, padding, dilation, groups):
        _check_scores(scores, weight, packed)
        ctx.save_for_backward(x, weight, scores, packed)
        ctx.conv_args, ctx.raw = (stride, padding, dilation, groups), _RAW[0]
        ctx.ops = ops_for(x)  # the backward runs on the forward's backend
        return ctx.ops.multi_masked_conv2d(x, weight, packed, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scores, packed = ctx.saved_tensors
        need_x, _, need_s, _, need_b = ctx.needs_input_grad[:5]
        gx, gs, gb = ctx.ops.multi_masked_conv2d_backward(
            grad_out.contiguous(), x, weight, packed, *ctx.conv_args, [need_x, need_s, need_b])
        if gs is not None and not ctx.raw:
            gs = gs * scores.sign()
        return gx, None, gs, None, gb, None, None, None, None


class _RaggedMaskedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scores, packed, offsets, rows, bias, stride, padding, dilation,
                groups):
        _check_scores(scores, weight, packed)
        ctx.save_for_backward(x, weight, scores, packed, offsets,
                              *([] if rows is None else [rows]))
        ctx.has_rows, ctx.raw = rows is not None, _RAW[0]
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.ops = ops_for(x)  # the backward runs on the forward's backend
        return ctx.ops.ragged_masked_conv2d(x, weight, packed, offsets, rows, bias,
                                            *ctx.conv_args)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scores, packed, offsets, *rest = ctx.saved_tensors
        need_x, _, need_s, _, _, _, need_b = ctx.needs_input_grad[:7]
        gx, gs, gb = ctx.ops.ragged_masked_conv2d_backward(
            grad_out.contiguous(), x, weight, packed, offsets, rest[0] if ctx.has_rows else None,
            *ctx.conv_args, [need_x, need_s, need_b])
        if gs is not None and not ctx.raw:
            gs = gs * scores.sign()
        return gx, None, gs, None, None, None, gb, None, None, None, None


def multi_masked_linear(x, weight, scores, packed, bias=None, shared_input=False):
    """K modules' masked linear with the straight-through score gradient.

    x [K, *, I] (or [*, I] with shared_input), weight [O, I] (frozen), scores float [K, O, I],
    packed int32 [K, O, ceil(I/32)] = multi_topk_mask(scores, density) -> [K, *, O].
    """
    return _MultiMaskedLinear.apply(x, weight, scores, packed, bias, shared_input)


def ragged_masked_linear(x, weight, scores, packed, offsets, rows=None, bias=None):
    """ops.ragged_masked_linear (module k on its own rows) with the straight-through score
    gradient. x [R, I], weight [O, I] (frozen), scores float [K, O, I], packed int32
    [K, O, ceil(I/32)], offsets int64 [K+1], rows int64 [T] or None -> [T, O]."""
    return _RaggedMaskedLinear.apply(x, weight, scores, packed, offsets, rows, bias)


def multi_masked_conv2d(x, weight, scores, packed, bias=None, stride=1, padding=0, dilation=1,
                        groups=1):
    """K modules' masked conv2d with the straight-through score gradient.

    x [K, B, C, H, W] (or shared [B, C, H, W]), weight [O, C/groups, kh, kw], scores
    [K, *weight.shape], packed int32 [K, O, words] -> [K, B, O, Ho, Wo].
    """
    return _MultiMaskedConv2d.apply(x, weight, scores, packed, bias, _pair(stride), _pair(padding),
                                    _pair(dilation), int(groups))


def ragged_masked_conv2d(x, weight, scores, packed, offsets, rows=None, bias=None, stride=1,
                         padding=0, dilation=1, groups=1):
    """ops.ragged_masked_conv2d (module k on its own rows) with the straight-through score
    gradient. x [R, C, H, W], weight [O, C/groups, kh, kw] (frozen), scores [K, *weight.shape],
    packed int32 [K, O, words], offsets int64 [K+1], rows int64 [T] or None -> [T, O, Ho, Wo]."""
    return _RaggedMaskedConv2d.apply(x, weight, scores, packed, offsets, rows, bias, _pair(stride),
                                     _pair(padding), _pair(dilation), int(groups))
