"""masked_linear / multi_masked_linear and their backwards in Triton.

The mask is never materialised: each [rows, cols] weight tile is loaded once, its bits are
unpacked in the kernel as (word >> (col % 32)) & 1 and applied with tl.where, for a group of up to
KB modules at a time, and the masked tiles go to a batched tl.dot with fp32 accumulation.

Shapes (all float tensors share one dtype: float32, float16 or bfloat16):
  x        [K, M, I] per module, or [M, I] shared by all modules (module stride 0)
  weight   [O, I]
  packed   int32 [K, O, ceil(I/32)] (K = 1 for the single-module ops)
  grad_out [K, M, O]
Kernels:
  _forward_kernel  y[k] = x[k] (W*M_k)^T + b                         -> [K, M, O]
  _grad_x_kernel   grad_x[k] = g[k] (W*M_k)   (summed over k if shared) -> [K, M, I] or [M, I]
  _grad_w_kernel   grad_scores[k] = (g[k]^T x[k]) * W                    -> [K, O, I]
                   or the exact weight grad sum_k (g[k]^T x[k]) * M_k    -> [O, I]
"""
import torch
import triton
import triton.language as tl

from .utils import (INTERPRET, autotune_configs, dot_precision, launcher, next_pow2,
                                  register_op)

_MAX_GROUP = 8  # modules sharing one weight tile per program on a GPU


def _configs(names):
    """GPU configs over the three tile sizes named (output rows, output cols, reduction)."""
    gpu = [triton.Config(dict(zip(names, t)), num_warps=w, num_stages=s)
           for t, w, s in [((16, 64, 64), 4, 4), ((32, 64, 64), 4, 3), ((64, 64, 32), 4, 3),
                           ((64, 128, 32), 8, 3), ((16, 128, 64), 4, 3), ((128, 64, 32), 8, 3)]]
    return autotune_configs(gpu, triton.Config(dict(zip(names, (64, 128, 128))), num_warps=4))


@triton.jit
def _load3(ptr, r0, r1, r2, n0, n1, n2, s0, s1, s2):
    """Tile [len(r0), len(r1), len(r2)] of a strided 3-d tensor, 0 outside [n0, n1, n2]."""
    offs = (r0[:, None, None].to(tl.int64) * s0 + r1[None, :, None].to(tl.int64) * s1
            + r2[None, None, :].to(tl.int64) * s2)
    valid = (r0 < n0)[:, None, None] & (r1 < n1)[None, :, None] & (r2 < n2)[None, None, :]
    return tl.load(ptr + offs, mask=valid, other=0.0)


@triton.jit
def _store3(ptr, value, r0, r1, r2, n0, n1, n2):
    """Stores a tile at [r0, r1, r2] of a contiguous [n0, n1, n2] tensor."""
    offs = (r0[:, None, None].to(tl.int64) * n1 * n2 + r1[None, :, None].to(tl.int64) * n2
            + r2[None, None, :])
    valid = (r0 < n0)[:, None, None] & (r1 < n1)[None, :, None] & (r2 < n2)[None, None, :]
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=valid)


@triton.jit
def _load_w(w_ptr, ro, ci, O, I, swo, swi):
    """Weight tile [len(ro), len(ci)]."""
    valid = (ro < O)[:, None] & (ci < I)[None, :]
    offs = ro[:, None].to(tl.int64) * swo + ci[None, :].to(tl.int64) * swi
    return tl.load(w_ptr + offs, mask=valid, other=0.0)


@triton.jit
def _bits(p_ptr, rk, ro, ci, K, O, I, WORDS):
    """Mask bits (bool) [len(rk), len(ro), len(ci)] of modules rk, rows ro, columns ci."""
    valid = (rk < K)[:, None, None] & (ro < O)[None, :, None] & (ci < I)[None, None, :]
    offs = ((rk[:, None, None].to(tl.int64) * O + ro[None, :, None]) * WORDS
            + (ci // 32)[None, None, :])
    words = tl.load(p_ptr + offs, mask=valid, other=0)
    return ((words >> (ci % 32)[None, None, :]) & 1) != 0


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b (batched); UPCAST (interpreter) computes in fp32, where bf16 dots fail."""
    if UPCAST:
        a = a.to(tl.float32)
    b = b.to(a.dtype)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    return tl.dot(a, b, acc)


@triton.autotune(configs=_configs(("BM", "BN", "BI")), key=["M", "O", "I", "KB"])
@triton.jit
def _forward_kernel(x_ptr, w_ptr, p_ptr, b_ptr, y_ptr, K, M, O, I, WORDS, sxk, sxm, sxi, swo, swi,
                    HAS_BIAS: tl.constexpr, KB: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BI: tl.constexpr):
    """y [K, M, O] = x (W*M)^T + b. Grid (cdiv(M, BM) * cdiv(O, BN), cdiv(K, KB))."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(O, BN)
    rm = (pid // n_tiles) * BM + tl.arange(0, BM)
    rn = (pid % n_tiles) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * KB + tl.arange(0, KB)
    acc = tl.zeros([KB, BM, BN], dtype=tl.float32)
    for i0 in range(0, I, BI):
        ci = i0 + tl.arange(0, BI)
        x = _load3(x_ptr, rk, rm, ci, K, M, I, sxk, sxm, sxi)
        w = _load_w(w_ptr, rn, ci, O, I, swo, swi)
        wm = tl.where(_bits(p_ptr, rk, rn, ci, K, O, I, WORDS), w[None, :, :], 0.0)
        acc = _dot(x, tl.permute(wm, (0, 2, 1)), acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < O, other=0.0).to(tl.float32)[None, None, :]
    _store3(y_ptr, acc, rk, rm, rn, K, M, O)


@triton.autotune(configs=_configs(("BM", "BI", "BO")), key=["M", "O", "I", "KB", "SHARED"])
@triton.jit
def _grad_x_kernel(g_ptr, w_ptr, p_ptr, gx_ptr, K, M, O, I, WORDS, sgk, sgm, sgo, swo, swi,
                   SHARED: tl.constexpr, KB: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BM: tl.constexpr, BI: tl.constexpr,
                   BO: tl.constexpr):
    """grad_x [K, M, I] = g (W*M), or [M, I] summed over all K modules when SHARED.
    Grid (cdiv(M, BM) * cdiv(I, BI), 1 if SHARED else cdiv(K, KB))."""
    pid = tl.program_id(0)
    i_tiles = tl.cdiv(I, BI)
    rm = (pid // i_tiles) * BM + tl.arange(0, BM)
    ci = (pid % i_tiles) * BI + tl.arange(0, BI)
    k_first = tl.program_id(1) * KB
    k_end = K if SHARED else k_first + KB
    total = tl.zeros([BM, BI], dtype=tl.float32)
    for k0 in range(k_first, k_end, KB):
        rk = k0 + tl.arange(0, KB)
        acc = tl.zeros([KB, BM, BI], dtype=tl.float32)
        for o0 in range(0, O, BO):
            ro = o0 + tl.arange(0, BO)
            g = _load3(g_ptr, rk, rm, ro, K, M, O, sgk, sgm, sgo)
            w = _load_w(w_ptr, ro, ci, O, I, swo, swi)
            wm = tl.where(_bits(p_ptr, rk, ro, ci, K, O, I, WORDS), w[None, :, :], 0.0)
            acc = _dot(g, wm, acc, UPCAST, PRECISION)
        if SHARED:
            total += tl.sum(acc, 0)
        else:
            _store3(gx_ptr, acc, rk, rm, ci, K, M, I)
    if SHARED:
        _store3(gx_ptr, total[None, :, :], tl.arange(0, 1), rm, ci, 1, M, I)


@triton.autotune(configs=_configs(("BO", "BI", "BM")), key=["M", "O", "I", "KB", "WEIGHT_GRAD"])
@triton.jit
def _grad_w_kernel(g_ptr, x_ptr, w_ptr, p_ptr, out_ptr, K, M, O, I, WORDS, sgk, sgm, sgo,
                   sxk, sxm, sxi, swo, swi, WEIGHT_GRAD: tl.constexpr, KB: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, BO: tl.constexpr,
                   BI: tl.constexpr, BM: tl.constexpr):
    """grad_scores [K, O, I] = (g^T x) * W, or with WEIGHT_GRAD the exact weight gradient
    [O, I] = sum_k (g_k^T x_k) * M_k. Grid (cdiv(O, BO) * cdiv(I, BI), 1 if WEIGHT_GRAD else
    cdiv(K, KB))."""
    pid = tl.program_id(0)
    i_tiles = tl.cdiv(I, BI)
    ro = (pid // i_tiles) * BO + tl.arange(0, BO)
    ci = (pid % i_tiles) * BI + tl.arange(0, BI)
    w = _load_w(w_ptr, ro, ci, O, I, swo, swi).to(tl.float32)
    k_first = tl.program_id(1) * KB
    k_end = K if WEIGHT_GRAD else k_first + KB
    total = tl.zeros([BO, BI], dtype=tl.float32)
    for k0 in range(k_first, k_end, KB):
        rk = k0 + tl.arange(0, KB)
        acc = tl.zeros([KB, BO, BI], dtype=tl.float32)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            gt = _load3(g_ptr, rk, ro, rm, K, O, M, sgk, sgo, sgm)
            x = _load3(x_ptr, rk, rm, ci, K, M, I, sxk, sxm, sxi)
            acc = _dot(gt, x, acc, UPCAST, PRECISION)
        if WEIGHT_GRAD:
            total += tl.sum(tl.where(_bits(p_ptr, rk, ro, ci, K, O, I, WORDS), acc, 0.0), 0)
        else:
            _store3(out_ptr, acc * w[None, :, :], rk, ro, ci, K, O, I)
    if WEIGHT_GRAD:
        _store3(out_ptr, total[None, :, :], tl.arange(0, 1), ro, ci, 1, O, I)


def _group(k: int) -> int:
    return next_pow2(k) if INTERPRET else min(next_pow2(k), _MAX_GROUP)


def _as_modules(x, k, shared):
    """x [K, *, I] -> ([K, M, I] view or copy, module stride); shared [*, I] -> ([1, M, I], 0)."""
    x3 = x.reshape(1 if shared else k, -1, x.shape[-1])
    return x3, 0 if shared else x3.stride(0)


def _forward(x, weight, packed, bias, shared):
    """x [K, *, I] (or shared [*, I]), packed [K, O, words] -> y [K, M, O]."""
    k, (o, i) = packed.shape[0], weight.shape
    x3, sxk = _as_modules(x, k, shared)
    m = x3.shape[1]
    y = torch.empty((k, m, o), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    kb = _group(k)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(o, meta["BN"]),  # noqa: E731
                         triton.cdiv(k, kb))
    launcher(_forward_kernel)[grid](
        x3, weight, packed.contiguous(), weight if bias is None else bias, y, k, m, o, i,
        packed.shape[-1], sxk, x3.stride(1), x3.stride(2), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, KB=kb, UPCAST=INTERPRET, PRECISION=dot_precision())
    return y


def _grad_x(grad_out, weight, packed, shared, x_shape, dtype):
    """grad_out [K, *, O] -> grad_x [K, M, I], or [M, I] summed over modules when shared."""
    k, (o, i) = packed.shape[0], weight.shape
    g3 = grad_out.reshape(k, -1, o)
    m = g3.shape[1]
    gx = torch.empty(x_shape, dtype=dtype, device=grad_out.device)
    if gx.numel() == 0:
        return gx
    if o == 0:
        return gx.zero_()
    kb = _group(k)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(i, meta["BI"]),  # noqa: E731
                         1 if shared else triton.cdiv(k, kb))
    launcher(_grad_x_kernel)[grid](
        g3, weight, packed.contiguous(), gx, k, m, o, i, packed.shape[-1], g3.stride(0),
        g3.stride(1), g3.stride(2), weight.stride(0), weight.stride(1), SHARED=shared, KB=kb,
        UPCAST=INTERPRET, PRECISION=dot_precision())
    return gx


def _grad_w(grad_out, x, weight, packed, shared, weight_grad):
    """(g^T x) * W per module -> [K, O, I], or with weight_grad sum_k (g^T x) * M_k -> [O, I]."""
    k, (o, i) = packed.shape[0], weight.shape
    g3 = grad_out.reshape(k, -1, o)
    x3, sxk = _as_modules(x, k, shared)
    m = g3.shape[1]
    out = torch.empty((o, i) if weight_grad else (k, o, i), dtype=weight.dtype,
                      device=weight.device)
    if out.numel() == 0:
        return out
    kb = _group(k)
    grid = lambda meta: (triton.cdiv(o, meta["BO"]) * triton.cdiv(i, meta["BI"]),  # noqa: E731
                         1 if weight_grad else triton.cdiv(k, kb))
    launcher(_grad_w_kernel)[grid](
        g3, x3, weight, packed.contiguous(), out, k, m, o, i, packed.shape[-1], g3.stride(0),
        g3.stride(1), g3.stride(2), sxk, x3.stride(1), x3.stride(2), weight.stride(0),
        weight.stride(1), WEIGHT_GRAD=weight_grad, KB=kb, UPCAST=INTERPRET,
        PRECISION=dot_precision())
    return out


def _bias_grad(grad_out, weight):
    return grad_out.reshape(-1, weight.shape[0]).sum(0)


@register_op("modsplit_triton::masked_linear",
             "(Tensor x, Tensor weight, Tensor packed, Tensor? bias=None) -> Tensor")
def masked_linear(x, weight, packed, bias=None):
    """y = x (W*M)^T + b. x [*, I], weight [O, I], packed int32 [O, ceil(I/32)], bias [O] or
    None -> [*, O]."""
    y = _forward(x, weight, packed[None], bias, shared=True)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@register_op("modsplit_triton::masked_linear_backward",
             "(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, bool[3] output_mask)"
             " -> (Tensor, Tensor, Tensor)")
def masked_linear_backward(grad_out, x, weight, packed, output_mask):
    """-> (grad_x [*, I], grad_scores [O, I] = (g^T x) * W, grad_bias [O]); None where
    output_mask is False."""
    p = packed[None]
    return (_grad_x(grad_out, weight, p, True, x.shape, x.dtype) if output_mask[0] else None,
            _grad_w(grad_out, x, weight, p, True, False)[0] if output_mask[1] else None,
            _bias_grad(grad_out, weight) if output_mask[2] else None)


@register_op("modsplit_triton::multi_masked_linear",
             "(Tensor x, Tensor weight, Tensor packed, Tensor? bias=None, "
             "bool shared_input=False) -> Tensor")
def multi_masked_linear(x, weight, packed, bias=None, shared_input=False):
    """K modules over one weight. x [K, *, I] (or [*, I] with shared_input), weight [O, I],
    packed int32 [K, O, ceil(I/32)] -> [K, *, O]."""
    y = _forward(x, weight, packed, bias, shared_input)
    batch = x.shape[:-1] if shared_input else x.shape[1:-1]
    return y.reshape(packed.shape[0], *batch, weight.shape[0])


@register_op("modsplit_triton::multi_masked_linear_backward",
             "(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, bool shared_input, "
             "bool[3] output_mask) -> (Tensor, Tensor, Tensor)")
def multi_masked_linear_backward(grad_out, x, weight, packed, shared_input, output_mask):
    """-> (grad_x shaped like x (summed over modules when shared), grad_scores [K, O, I],
    grad_bias [O]); None where output_mask is False."""
    return (
        _grad_x(grad_out, weight, packed, shared_input, x.shape, x.dtype)
        if output_mask[0] else None,
        _grad_w(grad_out, x, weight, packed, shared_input, False) if output_mask[1] else None,
        _bias_grad(grad_out, weight) if output_mask[2] else None)


@register_op("modsplit_triton::masked_linear_weight_grad",
             "(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, bool shared_input)"
             " -> Tensor")
def masked_linear_weight_grad(grad_out, x, weight, packed, shared_input):
    """Exact dL/dW [O, I] = sum_k (g_k^T x_k) * M_k; packed [O, words] (one module, x [*, I])
    or [K, O, words] (x [K, *, I], or [*, I] with shared_input)."""
    single = packed.dim() == 2
    return _grad_w(grad_out, x, weight, packed[None] if single else packed,
                   single or shared_input, True)


def _needs(ctx):
    """needs_input_grad of (x, weight, packed, bias); it only covers the arguments passed."""
    return (tuple(ctx.needs_input_grad) + (False,) * 4)[:4]


def _setup(ctx, inputs, output):
    x, weight, packed = inputs[:3]
    ctx.shared_input = inputs[4] if len(inputs) > 4 else False
    ctx.save_for_backward(x, weight, packed)


def _masked_linear_backward(ctx, grad_out):
    x, weight, packed = ctx.saved_tensors
    need_x, need_w, _, need_b = _needs(ctx)
    gx, _, gb = masked_linear_backward(grad_out, x, weight, packed, [need_x, False, need_b])
    gw = masked_linear_weight_grad(grad_out, x, weight, packed, False) if need_w else None
    return gx, gw, None, gb


def _multi_masked_linear_backward(ctx, grad_out):
    x, weight, packed = ctx.saved_tensors
    need_x, need_w, _, need_b = _needs(ctx)
    gx, _, gb = multi_masked_linear_backward(grad_out, x, weight, packed, ctx.shared_input,
                                             [need_x, False, need_b])
    gw = (masked_linear_weight_grad(grad_out, x, weight, packed, ctx.shared_input)
          if need_w else None)
    return gx, gw, None, gb, None


masked_linear.register_autograd(_masked_linear_backward, setup_context=_setup)
multi_masked_linear.register_autograd(_multi_masked_linear_backward, setup_context=_setup)
