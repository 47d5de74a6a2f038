"""masked_linear / multi_masked_linear and their backwards in Triton, routed like the CUDA ops.

Routing (modsplit.routing): batches of at most fused_max_rows(dtype) rows per module (16 by
default) take the fused kernels below, which read W and the packed bits and never write W*M;
larger batches take the expanded path: _expand_kernel writes W*M_k in the input's dtype for a
chunk of modules (bounded by routing.scratch_bytes()), then torch.matmul / bmm (cuBLAS on a GPU)
does the GEMM (modsplit.torch_backend.linear_expanded / linear_grad_x_expanded).
grad_scores = (g^T x) * W needs no mask: always one torch GEMM and one elementwise product.

Fused kernels: one program per (output tile, module), module index fastest so that the programs
sharing a W tile run together and read it from L2; each does a 2-D tl.dot per reduction step (a
3-D dot falls back to older MMA instructions on Hopper). Mask bits come from a [BN, BI/32] tile
of words loaded once and expanded in registers ((word >> j) & 1 for j < 32; bits are packed along
the reduction dimension I, so BI is a multiple of 32). Autotune keys bucket the batch size
(next power of two, at least 16), so a new batch size reuses the tuned config.

Shapes (all float tensors share one dtype: float32, float16 or bfloat16):
  x        [K, M, I] per module, or [M, I] shared by all modules (module stride 0)
  weight   [O, I]
  packed   int32 [K, O, ceil(I/32)] (K = 1 for the single-module ops)
  grad_out [K, M, O]
"""
import torch
import triton
import triton.language as tl

from modsplit import routing
from modsplit import torch_backend as tb

from .utils import INTERPRET, autotune_configs, dot_precision, launcher, next_pow2, register_op


def _configs(names):
    """GPU configs over the three tile sizes named (output rows, output cols, reduction); the
    reduction tile is a multiple of 32 (whole mask words)."""
    gpu = [triton.Config(dict(zip(names, t)), num_warps=w, num_stages=s)
           for t, w, s in [((16, 64, 64), 4, 4), ((16, 128, 64), 4, 3), ((16, 64, 128), 4, 4),
                           ((32, 64, 64), 4, 3), ((64, 64, 64), 4, 3), ((64, 128, 64), 8, 3)]]
    return autotune_configs(gpu, triton.Config(dict(zip(names, (16, 64, 64))), num_warps=4))


def _bucket(m: int) -> int:
    """Autotune key of a batch of m rows: the next power of two, at least 16."""
    return max(16, next_pow2(m))


@triton.jit
def _mask_tile(p_ptr, ro, i0, O, WORDS, BO: tl.constexpr, BI: tl.constexpr):
    """bool [BO, BI]: bits of rows ro, columns i0 .. i0 + BI (i0 a multiple of 32), from the
    [BO, BI // 32] tile of words of one module's packed [O, WORDS] mask."""
    rw = i0 // 32 + tl.arange(0, BI // 32)
    valid = (ro < O)[:, None] & (rw < WORDS)[None, :]
    words = tl.load(p_ptr + ro[:, None].to(tl.int64) * WORDS + rw[None, :], mask=valid, other=0)
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, [BO, BI]) != 0


@triton.jit
def _load2(ptr, r0, r1, n0, n1, s0, s1):
    """Tile [len(r0), len(r1)] of a strided 2-d tensor, 0 outside [n0, n1]."""
    valid = (r0 < n0)[:, None] & (r1 < n1)[None, :]
    offs = r0[:, None].to(tl.int64) * s0 + r1[None, :].to(tl.int64) * s1
    return tl.load(ptr + offs, mask=valid, other=0.0)


@triton.jit
def _store2(ptr, value, r0, r1, n0, n1):
    """Stores a tile at [r0, r1] of a contiguous [n0, n1] tensor."""
    valid = (r0 < n0)[:, None] & (r1 < n1)[None, :]
    tl.store(ptr + r0[:, None].to(tl.int64) * n1 + r1[None, :], value.to(ptr.dtype.element_ty),
             mask=valid)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b; UPCAST (interpreter) computes in fp32, where bf16 dots fail."""
    if UPCAST:
        a = a.to(tl.float32)
    b = b.to(a.dtype)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    return tl.dot(a, b, acc)


@triton.autotune(configs=_configs(("BM", "BN", "BI")), key=["M_BUCKET", "O", "I"])
@triton.jit
def _forward_kernel(x_ptr, w_ptr, p_ptr, b_ptr, y_ptr, K, M, O, I, WORDS, sxk, sxm, sxi, swo, swi,
                    sb, M_BUCKET, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BI: tl.constexpr):
    """y [K, M, O] = x_k (W*M_k)^T + b. Grid (cdiv(M, BM) * cdiv(O, BN) * K,)."""
    pid = tl.program_id(0)
    k = pid % K
    tile = pid // K
    n_tiles = tl.cdiv(O, BN)
    rm = (tile // n_tiles) * BM + tl.arange(0, BM)
    rn = (tile % n_tiles) * BN + tl.arange(0, BN)
    x_ptr += k.to(tl.int64) * sxk
    p_ptr += k.to(tl.int64) * O * WORDS
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i0 in range(0, I, BI):
        ci = i0 + tl.arange(0, BI)
        x = _load2(x_ptr, rm, ci, M, I, sxm, sxi)
        w = _load2(w_ptr, rn, ci, O, I, swo, swi)
        wm = tl.where(_mask_tile(p_ptr, rn, i0, O, WORDS, BN, BI), w, 0.0)
        acc = _dot(x, tl.trans(wm), acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn.to(tl.int64) * sb, mask=rn < O, other=0.0).to(tl.float32)[None, :]
    _store2(y_ptr + k.to(tl.int64) * M * O, acc, rm, rn, M, O)


@triton.autotune(configs=_configs(("BM", "BI", "BO")), key=["M_BUCKET", "O", "I", "SHARED"])
@triton.jit
def _grad_x_kernel(g_ptr, w_ptr, p_ptr, gx_ptr, K, M, O, I, WORDS, sgk, sgm, sgo, swo, swi,
                   M_BUCKET, SHARED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BM: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr):
    """grad_x [K, M, I] = g_k (W*M_k), or [M, I] summed over all K modules when SHARED.
    Grid (cdiv(M, BM) * cdiv(I, BI) * (1 if SHARED else K),)."""
    pid = tl.program_id(0)
    if SHARED:
        k_first = 0
        k_end = K
        tile = pid
        out_ptr = gx_ptr
    else:
        k_first = pid % K
        k_end = k_first + 1
        tile = pid // K
        out_ptr = gx_ptr + k_first.to(tl.int64) * M * I
    i_tiles = tl.cdiv(I, BI)
    rm = (tile // i_tiles) * BM + tl.arange(0, BM)
    i0 = (tile % i_tiles) * BI
    ci = i0 + tl.arange(0, BI)
    acc = tl.zeros([BM, BI], dtype=tl.float32)
    for k in range(k_first, k_end):
        gk_ptr = g_ptr + k * sgk
        pk_ptr = p_ptr + k * O * WORDS
        for o0 in range(0, O, BO):
            ro = o0 + tl.arange(0, BO)
            g = _load2(gk_ptr, rm, ro, M, O, sgm, sgo)
            w = _load2(w_ptr, ro, ci, O, I, swo, swi)
            wm = tl.where(_mask_tile(pk_ptr, ro, i0, O, WORDS, BO, BI), w, 0.0)
            acc = _dot(g, wm, acc, UPCAST, PRECISION)
    _store2(out_ptr, acc, rm, ci, M, I)


@triton.autotune(configs=_configs(("BO", "BI", "BM")), key=["M_BUCKET", "O", "I"])
@triton.jit
def _weight_grad_kernel(g_ptr, x_ptr, p_ptr, out_ptr, K, M, O, I, WORDS, sgk, sgm, sgo, sxk, sxm,
                        sxi, M_BUCKET, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BO: tl.constexpr, BI: tl.constexpr, BM: tl.constexpr):
    """The exact weight gradient [O, I] = sum_k (g_k^T x_k) * M_k. Grid (cdiv(O, BO) *
    cdiv(I, BI),)."""
    pid = tl.program_id(0)
    i_tiles = tl.cdiv(I, BI)
    ro = (pid // i_tiles) * BO + tl.arange(0, BO)
    i0 = (pid % i_tiles) * BI
    ci = i0 + tl.arange(0, BI)
    total = tl.zeros([BO, BI], dtype=tl.float32)
    for k in range(0, K):
        acc = tl.zeros([BO, BI], dtype=tl.float32)
        for m0 in range(0, M, BM):
            rm = m0 + tl.arange(0, BM)
            gt = _load2(g_ptr + k * sgk, ro, rm, O, M, sgo, sgm)
            x = _load2(x_ptr + k * sxk, rm, ci, M, I, sxm, sxi)
            acc = _dot(gt, x, acc, UPCAST, PRECISION)
        bits = _mask_tile(p_ptr + k * O * WORDS, ro, i0, O, WORDS, BO, BI)
        total += tl.where(bits, acc, 0.0)
    _store2(out_ptr, total, ro, ci, O, I)


@triton.jit
def _expand_kernel(w_ptr, p_ptr, out_ptr, O, I, WORDS, swo, swi, BO: tl.constexpr,
                   BI: tl.constexpr):
    """out [K, O, I] = W * M_k in W's dtype. Grid (cdiv(O, BO) * cdiv(I, BI), K)."""
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    i_tiles = tl.cdiv(I, BI)
    ro = (pid // i_tiles) * BO + tl.arange(0, BO)
    i0 = (pid % i_tiles) * BI
    ci = i0 + tl.arange(0, BI)
    w = _load2(w_ptr, ro, ci, O, I, swo, swi)
    wm = tl.where(_mask_tile(p_ptr + k * O * WORDS, ro, i0, O, WORDS, BO, BI), w, 0.0)
    _store2(out_ptr + k * O * I, wm, ro, ci, O, I)


def expand(weight, packed):
    """W*M_k [K, O, I] in weight's dtype from weight [O, I] and packed int32 [K, O, words]: the
    bit-expansion kernel of the expanded path."""
    k, (o, i) = packed.shape[0], weight.shape
    out = torch.empty((k, o, i), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    bo, bi = (64, 128) if INTERPRET else (32, 128)
    grid = (triton.cdiv(o, bo) * triton.cdiv(i, bi), k)
    launcher(_expand_kernel)[grid](weight, packed.contiguous(), out, o, i, packed.shape[-1],
                                   weight.stride(0), weight.stride(1), BO=bo, BI=bi)
    return out


def _as_modules(x, k, shared):
    """x [K, *, I] -> ([K, M, I] view or copy, module stride); shared [*, I] -> ([1, M, I], 0)."""
    x3 = x.reshape(1 if shared else k, -1, x.shape[-1])
    return x3, 0 if shared else x3.stride(0)


def _forward(x, weight, packed, bias, shared):
    """x [K, *, I] (or shared [*, I]), packed [K, O, words] -> y [K, M, O]."""
    k, (o, i) = packed.shape[0], weight.shape
    x3, sxk = _as_modules(x, k, shared)
    m = x3.shape[1]
    if k * m * o and not routing.use_fused(m, x.dtype):
        return tb.linear_expanded(x3, weight, packed, bias, expand)
    y = torch.empty((k, m, o), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(o, meta["BN"]) * k,)  # noqa: E731
    launcher(_forward_kernel)[grid](
        x3, weight, packed.contiguous(), weight if bias is None else bias, y, k, m, o, i,
        packed.shape[-1], sxk, x3.stride(1), x3.stride(2), weight.stride(0), weight.stride(1),
        0 if bias is None else bias.stride(0), _bucket(m), HAS_BIAS=bias is not None,
        UPCAST=INTERPRET, PRECISION=dot_precision())
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
    if not routing.use_fused(m, dtype):
        return tb.linear_grad_x_expanded(g3, weight, packed, shared, expand).reshape(x_shape)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(i, meta["BI"])  # noqa: E731
                         * (1 if shared else k),)
    launcher(_grad_x_kernel)[grid](
        g3, weight, packed.contiguous(), gx, k, m, o, i, packed.shape[-1], g3.stride(0),
        g3.stride(1), g3.stride(2), weight.stride(0), weight.stride(1), _bucket(m),
        SHARED=shared, UPCAST=INTERPRET, PRECISION=dot_precision())
    return gx


def _grad_scores(grad_out, x, weight, k, shared):
    """(g_k^T x_k) * W [K, O, I]: one torch GEMM and one elementwise product (no mask)."""
    g3 = grad_out.reshape(k, -1, weight.shape[0])
    return tb.linear_grad_scores(g3, _as_modules(x, k, shared)[0], weight)


def _weight_grad(grad_out, x, weight, packed, shared):
    """Exact dL/dW [O, I] = sum_k (g_k^T x_k) * M_k."""
    k, (o, i) = packed.shape[0], weight.shape
    g3 = grad_out.reshape(k, -1, o)
    x3, sxk = _as_modules(x, k, shared)
    m = g3.shape[1]
    out = torch.empty((o, i), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    if not routing.use_fused(m, weight.dtype):
        ones = torch.ones_like(weight)
        raw = tb.linear_grad_scores(g3, x3, ones)  # [K, O, I] = g_k^T x_k
        return sum((raw[k0:k1] * expand(ones, packed[k0:k1])).sum(0)
                   for k0, k1 in tb.module_chunks(k, weight))
    grid = lambda meta: (triton.cdiv(o, meta["BO"]) * triton.cdiv(i, meta["BI"]),)  # noqa: E731
    launcher(_weight_grad_kernel)[grid](
        g3, x3, packed.contiguous(), out, k, m, o, i, packed.shape[-1], g3.stride(0),
        g3.stride(1), g3.stride(2), sxk, x3.stride(1), x3.stride(2), _bucket(m),
        UPCAST=INTERPRET, PRECISION=dot_precision())
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
            _grad_scores(grad_out, x, weight, 1, True)[0] if output_mask[1] else None,
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
    k = packed.shape[0]
    return (
        _grad_x(grad_out, weight, packed, shared_input, x.shape, x.dtype)
        if output_mask[0] else None,
        _grad_scores(grad_out, x, weight, k, shared_input) if output_mask[1] else None,
        _bias_grad(grad_out, weight) if output_mask[2] else None)


@register_op("modsplit_triton::masked_linear_weight_grad",
             "(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, bool shared_input)"
             " -> Tensor")
def masked_linear_weight_grad(grad_out, x, weight, packed, shared_input):
    """Exact dL/dW [O, I] = sum_k (g_k^T x_k) * M_k; packed [O, words] (one module, x [*, I])
    or [K, O, words] (x [K, *, I], or [*, I] with shared_input)."""
    single = packed.dim() == 2
    return _weight_grad(grad_out, x, weight, packed[None] if single else packed,
                        single or shared_input)


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
