"""masked_linear and multi_masked_linear: fake impls, autograd, Python wrappers.

Autograd of the op itself is the exact derivative (grad of weight is (g^T x) * M); the
straight-through score gradient of edge-popup lives in modsplit.functional.
"""
import torch

from modsplit import torch_backend
from modsplit.backend import ops_for, uses_cpu_kernel
from modsplit.reference import unpack_mask as _unpack_ref

_ops = torch.ops.modsplit


def masked_linear(x, weight, packed, bias=None):
    """y = x (W*M)^T + b. x [*, I] float, weight [O, I], packed int32 [O, ceil(I/32)],
    bias [O] or None -> [*, O]. W*M is never materialised by the fast kernels."""
    return ops_for(x).masked_linear(x, weight, packed, bias)


def multi_masked_linear(x, weight, packed, bias=None, shared_input=False):
    """K modules over one weight. x [K, *, I] (or [*, I] shared by all modules when
    shared_input=True), weight [O, I], packed int32 [K, O, ceil(I/32)] -> [K, *, O]."""
    return ops_for(x).multi_masked_linear(x, weight, packed, bias, shared_input)


def multi_masked_linear_grad_scores_(out, grad_out, x, weight, packed, shared_input=False):
    """out float [K, O, I] <- the score gradient (g^T x) * W of multi_masked_linear (the second
    output of its backward), written in place; grad_out [K, *, O], x and the rest as for
    multi_masked_linear. A caller that keeps out between steps reuses its memory. The C++
    kernel for float32 / float64 CPU tensors ("auto" / "cpu" backend), the torch backend's
    twin elsewhere."""
    if uses_cpu_kernel(x):
        torch.ops.modsplit.multi_masked_linear_grad_scores_(out, grad_out, x, weight, packed,
                                                            shared_input)
    else:
        torch_backend.multi_masked_linear_grad_scores_(out, grad_out, x, weight, packed,
                                                       shared_input)
    return out


@torch.library.register_fake("modsplit::multi_masked_linear_grad_scores_")
def _multi_masked_linear_grad_scores_fake(out, grad_out, x, weight, packed, shared_input):
    return None


@torch.library.register_fake("modsplit::masked_linear")
def _masked_linear_fake(x, weight, packed, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("modsplit::masked_linear_backward")
def _masked_linear_backward_fake(grad_out, x, weight, packed, output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty(weight.shape) if output_mask[1] else None,
            weight.new_empty(weight.shape[:1]) if output_mask[2] else None)


@torch.library.register_fake("modsplit::multi_masked_linear")
def _multi_masked_linear_fake(x, weight, packed, bias=None, shared_input=False):
    batch = x.shape[:-1] if shared_input else x.shape[1:-1]
    return x.new_empty((packed.shape[0], *batch, weight.shape[0]))


@torch.library.register_fake("modsplit::multi_masked_linear_backward")
def _multi_masked_linear_backward_fake(grad_out, x, weight, packed, shared_input, output_mask):
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty((packed.shape[0], *weight.shape)) if output_mask[1] else None,
            weight.new_empty(weight.shape[:1]) if output_mask[2] else None)


def _exact_weight_grad(grad_out, x, packed, weight):
    """dL/dW of y = x (W*M)^T: (g^T x) * M, summed over modules for a bank."""
    o, i = weight.shape
    if packed.dim() == 2:
        g2, x2 = grad_out.reshape(-1, o), x.reshape(-1, i)
        return (g2.T @ x2) * _unpack_ref(packed, (o, i)).to(weight.dtype)
    k = packed.shape[0]
    g3 = grad_out.reshape(k, -1, o)
    x3 = x.reshape(1, -1, i).expand(k, -1, -1) if x.dim() < grad_out.dim() else x.reshape(k, -1, i)
    return ((g3.transpose(1, 2) @ x3) * _unpack_ref(packed, (k, o, i)).to(weight.dtype)).sum(0)


def _needs(ctx, n):
    """ctx.needs_input_grad padded to the op's n positional inputs: the dispatcher drops trailing
    arguments equal to their defaults (bias=None, shared_input=False) before autograd sees them."""
    return tuple(ctx.needs_input_grad) + (False,) * (n - len(ctx.needs_input_grad))


def _setup(ctx, inputs, output):
    x, weight, packed = inputs[:3]
    ctx.shared_input = inputs[4] if len(inputs) > 4 else False
    ctx.save_for_backward(x, weight, packed)


def _masked_linear_backward(ctx, grad_out):
    x, weight, packed = ctx.saved_tensors
    need_x, need_w, _, need_b = _needs(ctx, 4)
    gx, _, gb = _ops.masked_linear_backward(grad_out, x, weight, packed, [need_x, False, need_b])
    gw = _exact_weight_grad(grad_out, x, packed, weight) if need_w else None
    return gx, gw, None, gb


def _multi_masked_linear_backward(ctx, grad_out):
    x, weight, packed = ctx.saved_tensors
    need_x, need_w, _, need_b, _ = _needs(ctx, 5)
    gx, _, gb = _ops.multi_masked_linear_backward(grad_out, x, weight, packed, ctx.shared_input,
                                                  [need_x, False, need_b])
    gw = _exact_weight_grad(grad_out, x, packed, weight) if need_w else None
    return gx, gw, None, gb, None


torch.library.register_autograd("modsplit::masked_linear", _masked_linear_backward,
                                setup_context=_setup)
torch.library.register_autograd("modsplit::multi_masked_linear", _multi_masked_linear_backward,
                                setup_context=_setup)
