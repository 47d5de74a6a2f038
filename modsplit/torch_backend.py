"""The "torch" backend: every modsplit op as a pure-PyTorch composite that runs on any device
(CPU, CUDA, MPS, XPU) and under torch.compile.

The functions have the names and signatures of the torch.ops.modsplit ops (modsplit.ops.schemas),
so modsplit.backend.ops_for() returns this module in place of an op namespace. They are the
reference made efficient: no loop over modules. Masked products expand W*M for all K modules
at once and call one batched GEMM (torch.matmul) or one grouped convolution (groups = K*groups,
the modules folded into the channels), which is what a user would write by hand. The modules are
expanded in chunks whose W*M fit in modsplit.routing.scratch_bytes() (256 MiB by default), one
GEMM / convolution per chunk; the Triton backend calls the same *_expanded functions with its
own bit-expansion kernel above its fused-row threshold. topk keeps the
exact contract of the kernels: keep_count(density, n) entries of largest |score| per layer, ties
to the lower flat index.

Memory: the expanded weights of one chunk at a time (under autograd, each chunk is kept for the
backward pass).
"""
import math

import torch
import torch.nn.functional as F

from modsplit import reference as ref
from modsplit import routing
from modsplit.reference import keep_count, words_for

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(cond, message):
    if not cond:
        raise ValueError(f"modsplit: {message}")


def _check_float(name, t):
    _check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    _check(t.dtype in _FLOATS, f"{name} must be float16, bfloat16, float32 or float64, got "
                               f"{t.dtype}")


def _check_packed(packed, lead, weight):
    """packed must be int32 [*lead, O, ceil(R/32)] for a weight [O, ...] on weight's device."""
    want = (*lead, weight.shape[0], words_for(math.prod(weight.shape[1:])))
    _check(packed.dtype == torch.int32, f"packed must be int32, got {packed.dtype}")
    _check(tuple(packed.shape) == want, f"packed must have shape {list(want)} for a weight of "
                                        f"shape {list(weight.shape)}, got {list(packed.shape)}")
    _check(packed.device == weight.device, f"packed is on {packed.device}, weight on "
                                           f"{weight.device}")


def _check_same(x, weight, bias=None):
    _check_float("x", x)
    _check_float("weight", weight)
    _check(x.dtype == weight.dtype, f"x ({x.dtype}) and weight ({weight.dtype}) must have the "
                                    "same dtype")
    _check(x.device == weight.device, f"x is on {x.device}, weight on {weight.device}")
    if bias is not None:
        _check(bias.dtype == weight.dtype and tuple(bias.shape) == (weight.shape[0],),
               f"bias must be {weight.dtype} [{weight.shape[0]}], got {bias.dtype} "
               f"{list(bias.shape)}")


# ---- masks --------------------------------------------------------------------------------------

def _topk_rows(scores: torch.Tensor, density: float) -> torch.Tensor:
    """bool [L, n]: per row, the keep_count(density, n) largest |scores|, ties to the lower
    index. scores [L, n] float."""
    _check_float("scores", scores)
    _check(0 < density <= 1, f"density must be in (0, 1], got {density}")
    key = scores.detach().abs()
    if torch.isnan(key).any():
        raise ValueError("modsplit: scores contain NaN")
    n = key.shape[1]
    k = keep_count(density, n)
    kth = torch.topk(key, k, dim=1, sorted=False).values.amin(1, keepdim=True)  # [L, 1]
    above = key > kth
    tied = key == kth
    room = k - above.sum(1, keepdim=True)  # ties that still fit, first ones by index
    return above | (tied & (torch.cumsum(tied, 1) <= room))


def topk_mask(scores, density):
    """scores [O, ...] -> packed int32 [O, ceil(R/32)]."""
    _check(scores.dim() >= 2, f"scores must have at least 2 dims, got {list(scores.shape)}")
    keep = _topk_rows(scores.reshape(1, -1), float(density))
    return pack_mask(keep.reshape(scores.shape))


def multi_topk_mask(scores, density):
    """scores [K, O, ...] -> packed int32 [K, O, ceil(R/32)], one selection per module."""
    _check(scores.dim() >= 3, f"scores must have at least 3 dims, got {list(scores.shape)}")
    keep = _topk_rows(scores.reshape(scores.shape[0], -1), float(density))
    return pack_mask(keep.reshape(scores.shape), 1)


def pack_mask(mask, batch_dims=0):
    """bool [lead..., rest...] (lead = batch_dims + 1 dims) -> int32 [lead..., ceil(R/32)]."""
    _check(mask.dtype == torch.bool, f"mask must be bool, got {mask.dtype}")
    _check(mask.dim() >= batch_dims + 2, f"mask must have at least {batch_dims + 2} dims, got "
                                         f"{list(mask.shape)}")
    return ref.pack_mask(mask, batch_dims)


def unpack_mask(packed, shape):
    """int32 [lead..., words] -> bool tensor of `shape` (shape starts with lead...)."""
    _check(packed.dtype == torch.int32, f"packed must be int32, got {packed.dtype}")
    shape = [int(s) for s in shape]
    lead = len(packed.shape) - 1
    _check(tuple(shape[:lead]) == tuple(packed.shape[:-1]) and
           words_for(math.prod(shape[lead:])) == packed.shape[-1],
           f"shape {shape} does not match packed {list(packed.shape)}")
    return ref.unpack_mask(packed, shape)


def expand(weight, packed):
    """W*M in weight's dtype: packed [O, words] -> [O, ...], [K, O, words] -> [K, O, ...]."""
    shape = (*packed.shape[:-1], *weight.shape[1:])
    return weight * ref.unpack_mask(packed, shape).to(weight.dtype)


def module_chunks(k, weight):
    """(k0, k1) module ranges whose expanded weights fit in routing.scratch_bytes()."""
    step = routing.module_chunk(k, weight.numel() * weight.element_size())
    return [(k0, min(k, k0 + step)) for k0 in range(0, k, step)]


def _cat(parts, dim=0):
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


# ---- the expanded path (shared with the Triton backend, which passes its own expand_fn) ---------

def linear_expanded(x3, weight, packed, bias=None, expand_fn=expand):
    """y [K, N, O] = x_k (W*M_k)^T + b, one GEMM per chunk of modules. x3 [1, N, I] (shared by
    all modules) or [K, N, I]; packed [K, O, words]. A shared input makes one [N, c*O] GEMM per
    chunk of c modules; per-module inputs one batched GEMM."""
    k, o = packed.shape[0], weight.shape[0]
    parts = []
    for k0, k1 in module_chunks(k, weight):
        c, w = k1 - k0, expand_fn(weight, packed[k0:k1])  # [c, O, I]
        if x3.shape[0] == 1:
            b = None if bias is None else bias.repeat(c)
            parts.append(F.linear(x3[0], w.reshape(c * o, -1), b).reshape(-1, c, o)
                         .transpose(0, 1))
        elif bias is None:
            parts.append(torch.bmm(x3[k0:k1], w.transpose(1, 2)))
        else:
            parts.append(torch.baddbmm(bias, x3[k0:k1], w.transpose(1, 2)))
    return _cat(parts)


def linear_grad_x_expanded(g3, weight, packed, shared, expand_fn=expand):
    """grad_x [K, N, I] = g_k (W*M_k), or [N, I] summed over the modules when shared (one
    [N, c*O] x [c*O, I] GEMM per chunk). g3 [K, N, O]."""
    o = weight.shape[0]
    parts, total = [], None
    for k0, k1 in module_chunks(packed.shape[0], weight):
        c, w = k1 - k0, expand_fn(weight, packed[k0:k1])
        if shared:
            gk = g3[k0:k1].transpose(0, 1).reshape(-1, c * o)
            part = gk @ w.reshape(c * o, -1)
            total = part if total is None else total + part
        else:
            parts.append(torch.bmm(g3[k0:k1], w))
    return total if shared else _cat(parts)


def linear_grad_scores(g3, x3, weight):
    """grad_scores [K, O, I] = (g_k^T x_k) * W: no mask, one GEMM (one [K*O, N] x [N, I] GEMM for
    a shared x3 [1, N, I]) and one elementwise product. g3 [K, N, O]."""
    k, (o, i) = g3.shape[0], weight.shape
    if x3.shape[0] == 1:
        gt = g3.transpose(0, 1).reshape(-1, k * o).T  # [K*O, N]
        return (gt @ x3[0]).reshape(k, o, i) * weight
    return torch.bmm(g3.transpose(1, 2), x3) * weight


# ---- linear -------------------------------------------------------------------------------------

def masked_linear(x, weight, packed, bias=None):
    """x [*, I], weight [O, I], packed [O, ceil(I/32)] -> [*, O]."""
    _check_same(x, weight, bias)
    _check(x.shape[-1] == weight.shape[1], f"x has {x.shape[-1]} features, weight {weight.shape[1]}")
    _check_packed(packed, (), weight)
    return F.linear(x, expand(weight, packed), bias)


def masked_linear_backward(grad_out, x, weight, packed, output_mask):
    """-> (grad_x [*, I], grad_scores [O, I] = (g^T x) * W, grad_bias [O]); None where
    output_mask is False."""
    o, i = weight.shape
    g2 = grad_out.reshape(-1, o)
    gx = (grad_out @ expand(weight, packed)) if output_mask[0] else None
    gs = (g2.T @ x.reshape(-1, i)) * weight if output_mask[1] else None
    gb = g2.sum(0) if output_mask[2] else None
    return gx, gs, gb


def _module_rows(x, k, shared_input):
    """x as [K or 1, N, I] rows (a shared input is one block broadcast over the modules)."""
    return x.reshape(1, -1, x.shape[-1]) if shared_input else x.reshape(k, -1, x.shape[-1])


def multi_masked_linear(x, weight, packed, bias=None, shared_input=False):
    """x [K, *, I] (or [*, I] with shared_input), packed [K, O, words] -> [K, *, O]. Modules are
    expanded in chunks of at most routing.scratch_bytes() (one GEMM per chunk)."""
    _check_same(x, weight, bias)
    _check(packed.dim() == 3, f"packed must be [K, O, words], got {list(packed.shape)}")
    k = packed.shape[0]
    _check_packed(packed, (k,), weight)
    _check(x.shape[-1] == weight.shape[1], f"x has {x.shape[-1]} features, weight {weight.shape[1]}")
    _check(shared_input or (x.dim() >= 2 and x.shape[0] == k),
           f"x must be [K={k}, *, I] when shared_input=False, got {list(x.shape)}")
    y = linear_expanded(_module_rows(x, k, shared_input), weight, packed, bias)
    batch = x.shape[:-1] if shared_input else x.shape[1:-1]
    return y.reshape(k, *batch, weight.shape[0])


def multi_masked_linear_backward(grad_out, x, weight, packed, shared_input, output_mask):
    """-> (grad_x shaped like x (summed over K when shared), grad_scores [K, O, I], grad_bias
    [O]); None where output_mask is False."""
    k, o = packed.shape[0], weight.shape[0]
    g3 = grad_out.reshape(k, -1, o)
    gx = linear_grad_x_expanded(g3, weight, packed, shared_input).reshape(x.shape) \
        if output_mask[0] else None
    gs = linear_grad_scores(g3, _module_rows(x, k, shared_input), weight) \
        if output_mask[1] else None
    gb = g3.sum((0, 1)) if output_mask[2] else None
    return gx, gs, gb


def multi_masked_linear_grad_scores_(out, grad_out, x, weight, packed, shared_input):
    """out [K, O, I] <- multi_masked_linear_backward's grad_scores, in place."""
    out.copy_(multi_masked_linear_backward(grad_out, x, weight, packed, shared_input,
                                           [False, True, False])[1])


# ---- ragged per-module row sets ------------------------------------------------------------------

def check_ragged(x, weight, packed, offsets, rows, bias=None):
    """Validate ragged_masked_linear's arguments (modsplit.ops.schemas); returns (K, T). Reads
    offsets' values (one device sync on a GPU)."""
    _check_same(x, weight, bias)
    _check(x.dim() == 2, f"x must be [R, I], got {list(x.shape)}")
    _check(x.shape[1] == weight.shape[1], f"x has {x.shape[1]} features, weight {weight.shape[1]}")
    _check(packed.dim() == 3, f"packed must be [K, O, words], got {list(packed.shape)}")
    _check_packed(packed, (packed.shape[0],), weight)
    return _check_ragged_rows(x, packed.shape[0], offsets, rows)


def _check_ragged_rows(x, k, offsets, rows):
    """Validate offsets int64 [K+1] (rising from 0 to T) and rows (int64 [T] in [0, R), or None:
    T = R) for x [R, ...]; returns (K, T)."""
    _check(isinstance(offsets, torch.Tensor) and offsets.dtype == torch.int64
           and tuple(offsets.shape) == (k + 1,),
           f"offsets must be int64 [K+1={k + 1}], got "
           f"{getattr(offsets, 'dtype', type(offsets).__name__)} "
           f"{list(getattr(offsets, 'shape', []))}")
    _check(offsets.device == x.device, f"offsets is on {offsets.device}, x on {x.device}")
    if rows is not None:
        _check(isinstance(rows, torch.Tensor) and rows.dtype == torch.int64 and rows.dim() == 1,
               f"rows must be an int64 vector, got {getattr(rows, 'dtype', type(rows).__name__)}"
               f" {list(getattr(rows, 'shape', []))}")
        _check(rows.device == x.device, f"rows is on {rows.device}, x on {x.device}")
        _check(rows.numel() == 0 or (int(rows.min()) >= 0 and int(rows.max()) < x.shape[0]),
               f"rows must lie in [0, {x.shape[0]}) (the rows of x)")
    t = x.shape[0] if rows is None else rows.shape[0]
    off = offsets.cpu()
    _check(int(off[0]) == 0 and int(off[-1]) == t and bool((off[1:] >= off[:-1]).all()),
           f"offsets must rise from 0 to {t} (the rows the modules take), got "
           f"{off.tolist()[:8]}{' ...' if k > 7 else ''}")
    return k, t


def _ragged_layout(offsets, t):
    """(module int64 [T], position int64 [T], widest module m): row t is row position[t] of
    module module[t] in the [K, m, *] padded layout."""
    k = offsets.shape[0] - 1
    counts = offsets.diff()
    module = torch.repeat_interleave(torch.arange(k, device=offsets.device), counts,
                                     output_size=t)
    position = torch.arange(t, device=offsets.device) - offsets[module]
    return module, position, int(counts.max()) if k else 0


def _pad_rows(v, module, position, k, m):
    """v [T, C] -> [K, m, C], zero where a module has fewer than m rows."""
    out = v.new_zeros(k, m, v.shape[1])
    out[module, position] = v
    return out


def ragged_masked_linear(x, weight, packed, offsets, rows=None, bias=None):
    """x [R, I], packed [K, O, words], offsets int64 [K+1], rows int64 [T] or None -> [T, O]:
    module k on its rows (modsplit.ops.schemas). The rows are padded to the widest module,
    [K, m, I], then one batched GEMM per chunk of modules (linear_expanded)."""
    k, t = check_ragged(x, weight, packed, offsets, rows, bias)
    module, position, m = _ragged_layout(offsets, t)
    xs = x if rows is None else x.index_select(0, rows)
    if t == 0 or weight.shape[0] == 0:
        return x.new_zeros(t, weight.shape[0])
    y = linear_expanded(_pad_rows(xs, module, position, k, m), weight, packed, bias)
    return y[module, position]


def ragged_masked_linear_backward(grad_out, x, weight, packed, offsets, rows, output_mask):
    """-> (grad_x like x, grad_scores [K, O, I], grad_bias [O]); None where output_mask is
    False. Padded as ragged_masked_linear (padding rows add zeros)."""
    k, t = check_ragged(x, weight, packed, offsets, rows)
    _check(tuple(grad_out.shape) == (t, weight.shape[0]) and grad_out.dtype == x.dtype,
           f"grad_out must be {x.dtype} [{t}, {weight.shape[0]}], got {grad_out.dtype} "
           f"{list(grad_out.shape)}")
    module, position, m = _ragged_layout(offsets, t)
    g3 = _pad_rows(grad_out, module, position, k, m)
    gx = gs = None
    if output_mask[0]:
        gx_rows = linear_grad_x_expanded(g3, weight, packed, False)[module, position] \
            if k * m * weight.shape[0] else x.new_zeros(t, x.shape[1])
        gx = gx_rows if rows is None else torch.zeros_like(x).index_add_(0, rows, gx_rows)
    if output_mask[1]:
        xs = x if rows is None else x.index_select(0, rows)
        gs = linear_grad_scores(g3, _pad_rows(xs, module, position, k, m), weight)
    gb = grad_out.sum(0) if output_mask[2] else None
    return gx, gs, gb


def ragged_masked_linear_grad_scores_(out, grad_out, x, weight, packed, offsets, rows):
    """out [K, O, I] <- ragged_masked_linear_backward's grad_scores, in place."""
    out.copy_(ragged_masked_linear_backward(grad_out, x, weight, packed, offsets, rows,
                                            [False, True, False])[1])


def conv_out_hw(x, weight, stride, padding, dilation):
    """[Ho, Wo] of a convolution of x [..., H, W] by weight [O, C/groups, kh, kw]."""
    return [(x.shape[-2 + d] + 2 * padding[d] - dilation[d] * (weight.shape[2 + d] - 1) - 1)
            // stride[d] + 1 for d in range(2)]


def check_ragged_conv(x, weight, packed, offsets, rows, bias, groups):
    """Validate ragged_masked_conv2d's arguments; returns (K, T)."""
    _check(x.dim() == 4, f"x must be [R, C, H, W], got {list(x.shape)}")
    _check(packed.dim() == 3, f"packed must be [K, O, words], got {list(packed.shape)}")
    _check_conv(x, weight, packed, bias, (packed.shape[0],), groups)
    return _check_ragged_rows(x, packed.shape[0], offsets, rows)


def ragged_conv_forward(x, offsets, rows, out_shape, module_out):
    """ragged_masked_conv2d's module loop (this twin's and the Triton backend's): out of
    out_shape [T, O, Ho, Wo], module_out(k, xk [n, C, H, W]) -> [n, O, Ho, Wo] for every module
    k with n > 0 rows (x[rows[offsets[k]:offsets[k+1]]], or x's own rows)."""
    xs = x if rows is None else x.index_select(0, rows)
    bounds = offsets.tolist()
    out = x.new_empty(out_shape)  # every row is some module's
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            out[a:b] = module_out(k, xs[a:b])
    return out


def ragged_conv_backward(grad_out, x, weight, offsets, rows, output_mask, module_grads):
    """Its backward loop: (grad_x like x, grad_scores [K, *weight.shape] (0 * W for a module
    without rows), grad_bias [O]), None where output_mask is False; module_grads(k, xk, gk
    [n, O, Ho, Wo]) -> (grad_x of xk, grad_scores [*weight.shape]), None where not requested."""
    k = offsets.shape[0] - 1
    xs = x if rows is None else x.index_select(0, rows)
    bounds = offsets.tolist()
    gx_rows = xs.new_zeros(xs.shape) if output_mask[0] else None
    gs = weight.new_empty((k, *weight.shape)) if output_mask[1] else None
    for m, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b == a:
            if gs is not None:
                gs[m] = weight * 0
            continue
        gx, gsm = module_grads(m, xs[a:b], grad_out[a:b])
        if gx is not None:
            gx_rows[a:b] = gx
        if gsm is not None:
            gs[m] = gsm
    gx = None
    if output_mask[0]:
        gx = gx_rows if rows is None else torch.zeros_like(x).index_add_(0, rows, gx_rows)
    return gx, gs, grad_out.sum((0, 2, 3)) if output_mask[2] else None


def ragged_masked_conv2d(x, weight, packed, offsets, rows, bias, stride, padding, dilation,
                         groups):
    """x [R, C, H, W], packed [K, O, words], offsets int64 [K+1], rows int64 [T] or None ->
    [T, O, Ho, Wo]: module k on its rows (modsplit.ops.schemas), one conv_expanded call per
    module with rows."""
    _, t = check_ragged_conv(x, weight, packed, offsets, rows, bias, groups)
    hw = conv_out_hw(x, weight, stride, padding, dilation)
    _check(min(hw) > 0, f"the kernel {list(weight.shape[2:])} (dilation {list(dilation)}) does "
                        f"not fit the padded input {list(x.shape[2:])} (padding {list(padding)})")
    return ragged_conv_forward(
        x, offsets, rows, (t, weight.shape[0], *hw),
        lambda k, xk: conv_expanded(xk, weight, packed[k:k + 1], bias, stride, padding,
                                    dilation, groups)[0])


def ragged_masked_conv2d_backward(grad_out, x, weight, packed, offsets, rows, stride, padding,
                                  dilation, groups, output_mask):
    """-> (grad_x like x, grad_scores [K, *weight.shape] (0 * W for a module without rows),
    grad_bias [O]); None where output_mask is False. One conv_backward_expanded call per module
    with rows."""
    _, t = check_ragged_conv(x, weight, packed, offsets, rows, None, groups)
    _check(grad_out.dim() == 4 and grad_out.shape[:2] == (t, weight.shape[0])
           and grad_out.dtype == x.dtype,
           f"grad_out must be {x.dtype} [{t}, {weight.shape[0]}, Ho, Wo], got {grad_out.dtype} "
           f"{list(grad_out.shape)}")

    def module_grads(k, xk, gk):
        gx, gs, _ = conv_backward_expanded(gk[None], xk, weight, packed[k:k + 1], stride, padding,
                                           dilation, groups, [output_mask[0], output_mask[1],
                                                              False])
        return gx, None if gs is None else gs[0]

    return ragged_conv_backward(grad_out, x, weight, offsets, rows, output_mask, module_grads)


# ---- conv ---------------------------------------------------------------------------------------

def _check_conv(x, weight, packed, bias, lead, groups):
    _check_same(x, weight, bias)
    _check(weight.dim() == 4, f"weight must be [O, C/groups, kh, kw], got {list(weight.shape)}")
    _check(groups >= 1 and weight.shape[0] % groups == 0,
           f"groups ({groups}) must divide the {weight.shape[0]} output channels")
    _check(x.shape[-3] == weight.shape[1] * groups,
           f"x has {x.shape[-3]} channels, weight expects {weight.shape[1] * groups}")
    _check_packed(packed, lead, weight)


def masked_conv2d(x, weight, packed, bias, stride, padding, dilation, groups):
    """x [B, C, H, W], weight [O, C/groups, kh, kw], packed [O, words] -> [B, O, Ho, Wo]."""
    _check(x.dim() == 4, f"x must be [B, C, H, W], got {list(x.shape)}")
    _check_conv(x, weight, packed, bias, (), groups)
    return F.conv2d(x, expand(weight, packed), bias, stride, padding, dilation, groups)


def masked_conv2d_backward(grad_out, x, weight, packed, stride, padding, dilation, groups,
                           output_mask):
    """-> (grad_x, grad_scores = dL/d(W*M) * W, grad_bias); None where output_mask is False."""
    gx, gw, gb = _conv_grads(grad_out, x, expand(weight, packed), stride, padding, dilation,
                             groups, output_mask)
    return gx, (gw * weight if gw is not None else None), gb


def _conv_grads(grad_out, x, w, stride, padding, dilation, groups, output_mask):
    """(grad_x, grad_w, grad_bias) of F.conv2d(x, w, b, ...) for grad_out, through
    torch.ops.aten.convolution_backward (cuDNN / oneDNN where available)."""
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad_out, x, w, [w.shape[0]], list(stride), list(padding), list(dilation), False, [0, 0],
        groups, list(output_mask))
    return gx, gw, gb


def _fold(x, k, shared):
    """x [B, C, H, W] shared or [K, B, C, H, W] -> the conv input [B, K*C, H, W] of the folded
    grouped convolution (a shared input is repeated K times)."""
    if shared:
        return x.repeat(1, k, 1, 1)
    return x.transpose(0, 1).reshape(x.shape[1], k * x.shape[2], *x.shape[3:])


def conv_expanded(x, weight, packed, bias, stride, padding, dilation, groups, expand_fn=expand):
    """[K, B, O, Ho, Wo]: per chunk of c modules, one convolution with groups = c*groups over
    the module-folded channels. x [B, C, H, W] shared or [K, B, C, H, W]; packed [K, O, words]."""
    o, shared = weight.shape[0], x.dim() == 4
    parts = []
    for k0, k1 in module_chunks(packed.shape[0], weight):
        c = k1 - k0
        w = expand_fn(weight, packed[k0:k1]).reshape(c * o, *weight.shape[1:])
        b = bias.repeat(c) if bias is not None else None
        y = F.conv2d(_fold(x if shared else x[k0:k1], c, shared), w, b, stride, padding,
                     dilation, c * groups)
        parts.append(y.reshape(y.shape[0], c, o, *y.shape[2:]).transpose(0, 1))
    return _cat(parts)


def conv_backward_expanded(grad_out, x, weight, packed, stride, padding, dilation, groups,
                           output_mask, expand_fn=expand):
    """(grad_x shaped like x (summed over K when shared), grad_scores [K, *weight.shape],
    grad_bias [O]) of conv_expanded for grad_out [K, B, O, Ho, Wo], chunk by chunk through
    aten.convolution_backward; None where output_mask is False."""
    o, shared = weight.shape[0], x.dim() == 4
    gxs, gss, gbs = [], [], []
    for k0, k1 in module_chunks(packed.shape[0], weight):
        c = k1 - k0
        w = expand_fn(weight, packed[k0:k1]).reshape(c * o, *weight.shape[1:])
        go = grad_out[k0:k1]
        g = go.transpose(0, 1).reshape(go.shape[1], c * o, *go.shape[3:])
        gx, gw, gb = _conv_grads(g, _fold(x if shared else x[k0:k1], c, shared), w, stride,
                                 padding, dilation, c * groups, output_mask)
        if gx is not None:
            gx = gx.reshape(x.shape[-4], c, *x.shape[-3:])
            gxs.append(gx.sum(1) if shared else gx.transpose(0, 1))
        if gw is not None:
            gss.append(gw.reshape(c, *weight.shape) * weight)
        if gb is not None:
            gbs.append(gb.reshape(c, o).sum(0))
    gx = (sum(gxs) if shared else _cat(gxs)) if output_mask[0] else None
    return (gx, _cat(gss) if output_mask[1] else None,
            sum(gbs) if output_mask[2] else None)


def multi_masked_conv2d(x, weight, packed, bias, stride, padding, dilation, groups):
    """x [B, C, H, W] shared or [K, B, C, H, W], packed [K, O, words] -> [K, B, O, Ho, Wo]:
    one convolution with groups = K*groups over the module-folded channels per chunk of modules
    (routing.scratch_bytes())."""
    _check(x.dim() in (4, 5), f"x must be [B, C, H, W] or [K, B, C, H, W], got {list(x.shape)}")
    _check(packed.dim() == 3, f"packed must be [K, O, words], got {list(packed.shape)}")
    k = packed.shape[0]
    _check(x.dim() == 4 or x.shape[0] == k, f"x has {x.shape[0]} modules, packed {k}")
    _check_conv(x, weight, packed, bias, (k,), groups)
    return conv_expanded(x, weight, packed, bias, stride, padding, dilation, groups)


def multi_masked_conv2d_backward(grad_out, x, weight, packed, stride, padding, dilation, groups,
                                 output_mask):
    """-> (grad_x shaped like x (summed over K when shared), grad_scores [K, *weight.shape],
    grad_bias [O]); None where output_mask is False."""
    return conv_backward_expanded(grad_out, x, weight, packed, stride, padding, dilation, groups,
                                  output_mask)


# ---- co-training score update -------------------------------------------------------------------

def cotrain_sgd_step_(scores, momentum_buffer, grad, anchor, lr, momentum, weight_decay,
                      stem_coef, nesterov, init_buffer, sign_grad):
    """modsplit.score_update's fused SGD step, as torch.optim.SGD's own tensor ops (the
    reference, reference.cotrain_sgd_step_, after the same argument checks as the kernels)."""
    _check_float("scores", scores)
    for name, t in (("momentum_buffer", momentum_buffer), ("grad", grad), ("anchor", anchor)):
        if t is None and name == "anchor":
            continue
        shape_ok = isinstance(t, torch.Tensor) and (
            t.shape == scores.shape or (name == "anchor" and t.dim() == scores.dim()
                                        and t.shape[0] == 1 and t.shape[1:] == scores.shape[1:]))
        _check(shape_ok and
               t.dtype == scores.dtype and t.device == scores.device,
               f"{name} must be a {scores.dtype} tensor of shape {list(scores.shape)}"
               f"{' (or a leading dim of 1)' if name == 'anchor' else ''} on "
               f"{scores.device}, got {t.dtype if isinstance(t, torch.Tensor) else type(t)} "
               f"{list(t.shape) if isinstance(t, torch.Tensor) else ''}")
    _check(scores.dim() >= 2 and scores.numel() > 0,
           f"scores must be a non-empty [K, ...] bank, got {list(scores.shape)}")
    _check(not nesterov or momentum > 0, f"nesterov needs momentum > 0, got {momentum}")
    return ref.cotrain_sgd_step_(scores, momentum_buffer, grad, anchor, lr, momentum,
                                 weight_decay, stem_coef, nesterov, init_buffer, sign_grad)


def cotrain_sgd_topk_step_(scores, momentum_buffer, grad, anchor, lr, momentum, weight_decay,
                           stem_coef, nesterov, init_buffer, sign_grad, density, bracket):
    """cotrain_sgd_step_ fused with the next top-k mask (reference.cotrain_sgd_topk_step_, after
    the same argument checks as the kernel) -> (stem float64 [K], packed int32 [K, O, W])."""
    _check(isinstance(scores, torch.Tensor) and scores.dim() >= 3,
           f"scores must be a [K, O, ...] bank of at least 3 dims, got "
           f"{list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)}")
    _check(0 < density <= 1, f"density must be in (0, 1], got {density}")
    _check(isinstance(bracket, torch.Tensor) and bracket.dtype == torch.float64
           and bracket.device.type == "cpu" and tuple(bracket.shape) == (scores.shape[0], 2),
           f"bracket must be a float64 CPU tensor of shape [{scores.shape[0]}, 2], got "
           f"{bracket.dtype if isinstance(bracket, torch.Tensor) else type(bracket)} "
           f"{list(bracket.shape) if isinstance(bracket, torch.Tensor) else ''}")
    stem = cotrain_sgd_step_(scores, momentum_buffer, grad, anchor, lr, momentum, weight_decay,
                             stem_coef, nesterov, init_buffer, sign_grad)
    ref.update_topk_bracket_(scores, density, bracket)
    return stem, multi_topk_mask(scores, density)


# ---- compact (CSR) inference ops ---------------------------------------------------------------

def _check_csr(x, row_ptr, col_idx, values, bias, dims):
    _check_float("x", x)
    _check(x.dim() == dims, f"x must have {dims} dims ([S, B, ...], S = 1 or K), got "
                            f"{list(x.shape)}")
    _check(row_ptr.dtype == torch.int64 and row_ptr.dim() == 2,
           f"row_ptr must be int64 [K, O+1], got {row_ptr.dtype} {list(row_ptr.shape)}")
    _check(col_idx.dtype == torch.int32 and col_idx.dim() == 1,
           f"col_idx must be int32 [nnz], got {col_idx.dtype} {list(col_idx.shape)}")
    _check(values.dtype == x.dtype and tuple(values.shape) == tuple(col_idx.shape),
           f"values must be {x.dtype} [{col_idx.numel()}], got {values.dtype} "
           f"{list(values.shape)}")
    k, o = row_ptr.shape[0], row_ptr.shape[1] - 1
    _check(x.shape[0] in (1, k), f"x must hold 1 (shared) or K={k} module inputs in dim 0, got "
                                 f"{list(x.shape)}")
    _check(bias is None or (tuple(bias.shape) == (k, o) and bias.dtype == x.dtype),
           f"bias must be {x.dtype} [K={k}, O={o}], got "
           f"{None if bias is None else (bias.dtype, list(bias.shape))}")


def sparse_linear(x, row_ptr, col_idx, values, bias=None, relu=False):
    """x [S, B, I] -> [K, B, O]: the CSR weights expanded to dense [K, O, I], one batched GEMM."""
    _check_csr(x, row_ptr, col_idx, values, bias, 3)
    return ref.sparse_linear(x, row_ptr, col_idx, values, bias, relu)


def sparse_linear_chain(x, layout, row_ptr, col_idx, values, bias):
    """sparse_linear layer after layer (packed by reference.pack_chain): x [S, B, I] ->
    [K, B, O_last]."""
    _check(layout.dtype == torch.int64 and layout.dim() == 2 and layout.shape[1] == 7
           and layout.shape[0] >= 1, f"layout must be int64 [L>=1, 7], got {layout.dtype} "
                                     f"{list(layout.shape)}")
    for rp, ci, v, b, activation in ref.unpack_chain(layout, row_ptr, col_idx, values, bias):
        x = sparse_linear(x, rp, ci, v, b, activation == 1)
        x = x.sigmoid() if activation == 2 else x
    return x


def sparse_conv2d(x, row_ptr, col_idx, values, bias, kernel_size, stride, padding, relu=False):
    """x [S, B, C, H, W] -> [K, B, O, Ho, Wo]: dense [K, O, C, kh, kw] weights, one grouped
    convolution over the modules."""
    _check_csr(x, row_ptr, col_idx, values, bias, 5)
    k, (s, b, c, h, w) = row_ptr.shape[0], x.shape
    weight = ref.csr_to_dense(row_ptr, col_idx, values, c * kernel_size[0] * kernel_size[1])
    o = weight.shape[1]
    xs = x.expand(k, b, c, h, w).transpose(0, 1).reshape(b, k * c, h, w)
    y = F.conv2d(xs, weight.reshape(k * o, c, *kernel_size),
                 None if bias is None else bias.reshape(-1), stride, padding, 1, k)
    y = y.reshape(b, k, o, *y.shape[2:]).transpose(0, 1)
    return y.relu() if relu else y


# ---- per-module BatchNorm (training mode) -------------------------------------------------------

def _check_module_norm(x, groups, weight, bias=None, offsets=None):
    _check_float("x", x)
    _check(x.dim() >= 2, f"x must be [G*N, C, *], got shape {list(x.shape)}")
    if offsets is None:
        _check(groups >= 1 and x.shape[0] % groups == 0 and x.numel() > 0,
               f"groups={groups} must be positive and divide the rows of x (shape "
               f"{list(x.shape)})")
    else:
        _check(groups >= 1 and x.numel() > 0,
               f"groups={groups} must be positive and x (shape {list(x.shape)}) non-empty")
        _check_ragged_rows(x, groups, offsets, None)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check(t.dtype == x.dtype and tuple(t.shape) == (x.shape[1],) and t.device == x.device,
                   f"{name} must be {x.dtype} [{x.shape[1]}] on {x.device}, got {t.dtype} "
                   f"{list(t.shape)} on {t.device}")


def _stats_dtype(x):
    """float16 / bfloat16 statistics are computed in float32 (as nn.BatchNorm does)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def module_batch_norm(x, groups, weight, bias, eps, relu=False, offsets=None):
    """reference.module_batch_norm after the kernels' argument checks; float16 / bfloat16 run in
    float32 (y in x's dtype, mean / invstd float32)."""
    _check_module_norm(x, groups, weight, bias, offsets)
    _check(eps >= 0, f"eps must be >= 0, got {eps}")
    up = [None if t is None else t.to(_stats_dtype(x)) for t in (x, weight, bias)]
    y, mean, invstd = ref.module_batch_norm(up[0], groups, *up[1:], eps, relu, offsets)
    return y.to(x.dtype), mean, invstd


def module_batch_norm_backward(grad_y, x, groups, weight, mean, invstd, output_mask, out=None,
                               offsets=None):
    """reference.module_batch_norm_backward -> (grad_x, grad_weight, grad_bias), None where
    output_mask is False."""
    _check_module_norm(x, groups, weight, None, offsets)
    _check(grad_y.shape == x.shape and grad_y.dtype == x.dtype,
           f"grad_y must be {x.dtype} {list(x.shape)}, got {grad_y.dtype} {list(grad_y.shape)}")
    stats = (groups, x.shape[1])
    for name, t in (("mean", mean), ("invstd", invstd)):
        _check(tuple(t.shape) == stats and t.dtype == _stats_dtype(x),
               f"{name} must be {_stats_dtype(x)} {list(stats)}, got {t.dtype} {list(t.shape)}")
    if out is not None:
        _check(out.shape == x.shape and out.dtype == x.dtype,
               f"out must be {x.dtype} {list(x.shape)}, got {out.dtype} {list(out.shape)}")
    up = [None if t is None else t.to(_stats_dtype(x)) for t in (grad_y, x, weight, out)]
    grads = ref.module_batch_norm_backward(up[0], up[1], groups, up[2], mean, invstd, up[3],
                                           offsets)
    return tuple(g.to(x.dtype) if want else None for g, want in zip(grads, output_mask))


def _check_affine(t, name, groups, scale):
    _check_float(name, t)
    _check(t.dim() >= 2, f"{name} must be [G*N, C, *], got shape {list(t.shape)}")
    _check(groups >= 1 and t.shape[0] % groups == 0,
           f"groups={groups} must be positive and divide the rows of {name} (shape "
           f"{list(t.shape)})")
    want = (groups, t.shape[1])
    _check(tuple(scale.shape) == want and scale.dtype == t.dtype and scale.device == t.device,
           f"scale must be {t.dtype} {list(want)} on {t.device}, got {scale.dtype} "
           f"{list(scale.shape)} on {scale.device}")


def channel_affine(x, groups, scale, shift, relu=False):
    """reference.channel_affine after the kernels' argument checks (any float dtype;
    differentiable through its ATen ops)."""
    _check_affine(x, "x", groups, scale)
    _check(shift.shape == scale.shape and shift.dtype == x.dtype and shift.device == x.device,
           f"shift must be {x.dtype} {list(scale.shape)} on {x.device}, got {shift.dtype} "
           f"{list(shift.shape)} on {shift.device}")
    return ref.channel_affine(x, groups, scale, shift, relu)


def channel_affine_backward(grad_y, out, groups, scale, relu):
    """reference.channel_affine_backward after the kernels' argument checks."""
    _check_affine(grad_y, "grad_y", groups, scale)
    if relu:
        _check(out is not None, "channel_affine_backward with relu needs out (the forward's "
                                "output)")
        _check(out.shape == grad_y.shape and out.dtype == grad_y.dtype,
               f"out must be {grad_y.dtype} {list(grad_y.shape)}, got {out.dtype} "
               f"{list(out.shape)}")
    return ref.channel_affine_backward(grad_y, out, groups, scale, relu)


def max_pool2x2(x):
    """reference.max_pool2x2 through ATen's max_pool2d (same scan rule), its int64 flat indices
    turned into window positions; y is differentiable through ATen's autograd."""
    _check_float("x", x)
    _check(x.dim() == 4 and x.shape[2] >= 2 and x.shape[3] >= 2,
           f"x must be [N, C, H, W] with H, W >= 2, got shape {list(x.shape)}")
    y, flat = F.max_pool2d(x, 2, return_indices=True)
    w = x.shape[3]
    rows = torch.arange(y.shape[2], device=x.device)[:, None]
    cols = torch.arange(y.shape[3], device=x.device)
    k = (flat.div(w, rounding_mode="floor") - 2 * rows) * 2 + (flat.remainder(w) - 2 * cols)
    return y, k.to(torch.uint8)


def max_pool2x2_backward(grad_y, indices, input_size):
    """reference.max_pool2x2_backward after the kernels' argument checks."""
    _check_float("grad_y", grad_y)
    _check(grad_y.dim() == 4, f"grad_y must be [N, C, H/2, W/2], got shape "
                              f"{list(grad_y.shape)}")
    h, w = (int(v) for v in input_size)
    _check(h // 2 == grad_y.shape[2] and w // 2 == grad_y.shape[3] and h >= 2 and w >= 2,
           f"input_size {[h, w]} does not pool to grad_y's shape {list(grad_y.shape)}")
    _check(indices.dtype == torch.uint8 and indices.shape == grad_y.shape,
           f"indices must be uint8 {list(grad_y.shape)}, got {indices.dtype} "
           f"{list(indices.shape)}")
    return ref.max_pool2x2_backward(grad_y, indices, (h, w))


def graft_cross_entropy(logits, weight, bias, positive, row_weight, scale):
    """reference.graft_cross_entropy after the kernels' argument checks (any float dtype;
    differentiable through its ATen ops)."""
    _check_float("logits", logits)
    _check(logits.dim() == 3, f"logits must be [K, R, N], got shape {list(logits.shape)}")
    k, r, n = logits.shape
    for name, t, shape in (("weight", weight, (k, n, 2)), ("bias", bias, (k, 2)),
                           ("row_weight", row_weight, (k, r))):
        _check(tuple(t.shape) == shape and t.dtype == logits.dtype,
               f"{name} must be {logits.dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    _check(positive.dtype == torch.bool and tuple(positive.shape) == (k, r),
           f"positive must be bool [{k}, {r}], got {positive.dtype} {list(positive.shape)}")
    return ref.graft_cross_entropy(logits, weight, bias, positive, row_weight, scale)
