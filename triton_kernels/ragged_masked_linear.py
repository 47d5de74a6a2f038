"""ragged_masked_linear and its backward in Triton: K modules over one weight, module k on its
own rows (modsplit.ops.schemas; the specification is modsplit.reference.ragged_masked_linear).

Rows: module k owns output rows offsets[k] .. offsets[k+1] - 1, reading x[rows[t]] (x[t] without
rows), so the work is the T rows the modules take, with no padding to the widest module.

Kernels (one program per tile; module index fastest, so programs sharing a W tile run together
and read it from L2; mask bits expanded in registers from a [BN, BI/32] tile of words by
masked_linear._mask_tile, BI a multiple of 32; fp32 accumulators; tl.dot per reduction step):
  _forward_kernel      y [T, O]. Grid (K * cdiv(widest, BM), cdiv(O, BN)): program (tile, k)
                       computes rows offsets[k] + tile*BM .. of module k and exits at once when
                       the module has fewer rows. (A (K, row tiles, O tiles) grid flattened over
                       its first two axes: CUDA limits grid axes 1 and 2 to 65535 programs, axis
                       0 to 2^31 - 1, and row tiles may be many.)
  _grad_x_kernel       g_k (W*M_k) [T, I], same grid over I tiles. With rows the [T, I] result
                       (fp32) is scattered onto x's rows by torch's index_add_ (atomic adds on a
                       GPU: the order of the adds to a repeated row is not deterministic).
  _grad_scores_kernel  (g_k^T x_k) * W [K, O, I]. Grid (K, cdiv(O, BO), cdiv(I, BI)): each
                       program loops over its module's own rows in BM steps (no padding; a module
                       with no rows writes zeros) and multiplies by W in the epilogue.
  _weight_grad_kernel  the exact weight gradient sum_k (g_k^T x_k) * M_k [O, I], for autograd.
                       Grid (cdiv(O, BO), cdiv(I, BI)), looping over the modules and their rows.

Host sync: the forward and grad_x grids need the widest module's row count, which only offsets'
values give: one int(offsets.diff().max()) per call (a device sync on a GPU), besides the ones of
the argument checks (modsplit.torch_backend.check_ragged reads offsets and rows' range). On fake
tensors (shape propagation; torch.compile tracing the ops into their kernels) values cannot be
read: the checks are skipped and the grid takes T rows per module, a bound whose surplus programs
exit at once. grad_scores and the weight gradient read the offsets inside their kernels only.

dtypes: float32, float16, bfloat16 (x, weight, bias, grad_out share one). float64, which the
checks admit, has no fused Triton kernel (as in masked_linear.py, where routing sends it to the
expanded path): it runs the torch backend's padded, expanded path.

Shapes: x [R, I], weight [O, I], packed int32 [K, O, ceil(I/32)], offsets int64 [K+1] (0 =
offsets[0] <= ... <= offsets[K] = T), rows int64 [T] in [0, R) or None (T = R), bias [O] or None,
grad_out [T, O].
"""
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor, is_fake

from modsplit import torch_backend as tb
from modsplit.reference import unpack_mask

from .masked_linear import _bucket, _configs, _dot, _load2, _mask_tile, _store2
from .utils import INTERPRET, dot_precision, launcher, register_op

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- kernels ------------------------------------------------------------------------------------

@triton.jit
def _module_tile(off_ptr, K, BM: tl.constexpr):
    """(k, t0, end) of this program: program_id(0) = tile * K + k, rows t0 = offsets[k] +
    tile * BM .. of module k, whose rows end at end = offsets[k+1] (int64)."""
    pid = tl.program_id(0)
    k = pid % K
    t0 = tl.load(off_ptr + k) + (pid // K) * BM
    return k, t0, tl.load(off_ptr + k + 1)


@triton.jit
def _source_rows(rows_ptr, rt, end, R, HAS_ROWS: tl.constexpr):
    """int64 [BM]: the rows of x [R, I] read by output rows rt: rows[rt] (rt itself without
    rows), and R, out of range so that _load2 skips them, from end on."""
    valid = rt < end
    if HAS_ROWS:
        src = tl.load(rows_ptr + rt, mask=valid, other=0)
    else:
        src = rt
    return tl.where(valid, src, R)


@triton.jit
def _module_gtx(g_ptr, x_ptr, rows_ptr, start, end, ro, ci, R, O, I, sgt, sgo, sxr, sxi,
                HAS_ROWS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BO: tl.constexpr, BI: tl.constexpr, BM: tl.constexpr):
    """fp32 [BO, BI]: the tile (ro, ci) of g_k^T x_k over module rows start .. end - 1, in
    BM-row steps."""
    acc = tl.zeros([BO, BI], dtype=tl.float32)
    for m0 in range(0, (end - start).to(tl.int32), BM):
        rt = start + m0 + tl.arange(0, BM)
        gt = _load2(g_ptr, ro, rt, O, end, sgo, sgt)  # [BO, BM]
        x = _load2(x_ptr, _source_rows(rows_ptr, rt, end, R, HAS_ROWS), ci, R, I, sxr, sxi)
        acc = _dot(gt, x, acc, UPCAST, PRECISION)
    return acc


@triton.autotune(configs=_configs(("BM", "BN", "BI")), key=["M_BUCKET", "O", "I", "HAS_ROWS"])
@triton.jit
def _forward_kernel(x_ptr, w_ptr, p_ptr, b_ptr, off_ptr, rows_ptr, y_ptr, K, R, O, I, WORDS,
                    sxr, sxi, swo, swi, sb, M_BUCKET, HAS_ROWS: tl.constexpr,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BI: tl.constexpr):
    """y [T, O]: row t of module k = x[rows[t]] (W*M_k)^T + b. Grid (K * cdiv(widest, BM),
    cdiv(O, BN))."""
    k, t0, end = _module_tile(off_ptr, K, BM)
    if t0 >= end:
        return
    rt = t0 + tl.arange(0, BM)
    src = _source_rows(rows_ptr, rt, end, R, HAS_ROWS)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    pk_ptr = p_ptr + k.to(tl.int64) * O * WORDS
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i0 in range(0, I, BI):
        ci = i0 + tl.arange(0, BI)
        x = _load2(x_ptr, src, ci, R, I, sxr, sxi)
        w = _load2(w_ptr, rn, ci, O, I, swo, swi)
        wm = tl.where(_mask_tile(pk_ptr, rn, i0, O, WORDS, BN, BI), w, 0.0)
        acc = _dot(x, tl.trans(wm), acc, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn.to(tl.int64) * sb, mask=rn < O, other=0.0).to(tl.float32)[None, :]
    _store2(y_ptr, acc, rt, rn, end, O)


@triton.autotune(configs=_configs(("BM", "BI", "BO")), key=["M_BUCKET", "O", "I"])
@triton.jit
def _grad_x_kernel(g_ptr, w_ptr, p_ptr, off_ptr, out_ptr, K, O, I, WORDS, sgt, sgo, swo, swi,
                   M_BUCKET, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr,
                   BI: tl.constexpr, BO: tl.constexpr):
    """out [T, I]: row t of module k = g[t] (W*M_k). Grid (K * cdiv(widest, BM),
    cdiv(I, BI))."""
    k, t0, end = _module_tile(off_ptr, K, BM)
    if t0 >= end:
        return
    rt = t0 + tl.arange(0, BM)
    i0 = tl.program_id(1) * BI
    ci = i0 + tl.arange(0, BI)
    pk_ptr = p_ptr + k.to(tl.int64) * O * WORDS
    acc = tl.zeros([BM, BI], dtype=tl.float32)
    for o0 in range(0, O, BO):
        ro = o0 + tl.arange(0, BO)
        g = _load2(g_ptr, rt, ro, end, O, sgt, sgo)
        w = _load2(w_ptr, ro, ci, O, I, swo, swi)
        wm = tl.where(_mask_tile(pk_ptr, ro, i0, O, WORDS, BO, BI), w, 0.0)
        acc = _dot(g, wm, acc, UPCAST, PRECISION)
    _store2(out_ptr, acc, rt, ci, end, I)


@triton.autotune(configs=_configs(("BO", "BI", "BM")), key=["M_BUCKET", "O", "I", "HAS_ROWS"])
@triton.jit
def _grad_scores_kernel(g_ptr, x_ptr, w_ptr, off_ptr, rows_ptr, out_ptr, R, O, I, sgt, sgo, sxr,
                        sxi, swo, swi, M_BUCKET, HAS_ROWS: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                        BM: tl.constexpr):
    """out [K, O, I] = (g_k^T x_k) * W. Grid (K, cdiv(O, BO), cdiv(I, BI))."""
    k = tl.program_id(0)
    ro = tl.program_id(1) * BO + tl.arange(0, BO)
    ci = tl.program_id(2) * BI + tl.arange(0, BI)
    acc = _module_gtx(g_ptr, x_ptr, rows_ptr, tl.load(off_ptr + k), tl.load(off_ptr + k + 1),
                      ro, ci, R, O, I, sgt, sgo, sxr, sxi, HAS_ROWS, UPCAST, PRECISION, BO, BI,
                      BM)
    w = _load2(w_ptr, ro, ci, O, I, swo, swi).to(tl.float32)
    _store2(out_ptr + k.to(tl.int64) * O * I, acc * w, ro, ci, O, I)


@triton.autotune(configs=_configs(("BO", "BI", "BM")), key=["M_BUCKET", "O", "I", "HAS_ROWS"])
@triton.jit
def _weight_grad_kernel(g_ptr, x_ptr, p_ptr, off_ptr, rows_ptr, out_ptr, K, R, O, I, WORDS, sgt,
                        sgo, sxr, sxi, M_BUCKET, HAS_ROWS: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                        BM: tl.constexpr):
    """out [O, I] = sum_k (g_k^T x_k) * M_k. Grid (cdiv(O, BO), cdiv(I, BI))."""
    ro = tl.program_id(0) * BO + tl.arange(0, BO)
    i0 = tl.program_id(1) * BI
    ci = i0 + tl.arange(0, BI)
    total = tl.zeros([BO, BI], dtype=tl.float32)
    for k in range(0, K):
        acc = _module_gtx(g_ptr, x_ptr, rows_ptr, tl.load(off_ptr + k), tl.load(off_ptr + k + 1),
                          ro, ci, R, O, I, sgt, sgo, sxr, sxi, HAS_ROWS, UPCAST, PRECISION, BO,
                          BI, BM)
        bits = _mask_tile(p_ptr + tl.cast(k, tl.int64) * O * WORDS, ro, i0, O, WORDS, BO, BI)
        total += tl.where(bits, acc, 0.0)
    _store2(out_ptr, total, ro, ci, O, I)


# ---- host side ----------------------------------------------------------------------------------

def _traced(*tensors) -> bool:
    """Whether the op runs on fake tensors (shape propagation, torch.compile tracing), whose
    values cannot be read."""
    return any(t is not None and is_fake(t) for t in tensors)


def _check(x, weight, packed, offsets, rows, bias=None):
    """(K, T, traced): modsplit.torch_backend.check_ragged's checks (ValueError naming the
    argument) and its (K, T); on fake tensors only the shapes, without the checks."""
    traced = _traced(x, offsets, rows)
    if traced:
        return packed.shape[0], x.shape[0] if rows is None else rows.shape[0], True
    return (*tb.check_ragged(x, weight, packed, offsets, rows, bias), False)


def _check_grad_out(grad_out, x, t, o):
    if tuple(grad_out.shape) != (t, o) or grad_out.dtype != x.dtype:
        raise ValueError(f"modsplit: grad_out must be {x.dtype} [{t}, {o}], got "
                         f"{grad_out.dtype} {list(grad_out.shape)}")


def _widest(offsets, t, traced) -> int:
    """Rows of the widest module, the grids' row extent: one host read of offsets (a device
    sync on a GPU); T, a bound, when traced."""
    if traced:
        return t
    return int(offsets.diff().max()) if offsets.shape[0] > 1 else 0


def _row_grid(k, widest, n, tile):
    """Grid of the row-tile kernels: (K * cdiv(widest, BM), cdiv(n, meta[tile]))."""
    return lambda meta: (k * triton.cdiv(widest, meta["BM"]), triton.cdiv(n, meta[tile]))


def _rows_arg(x, rows):
    """The rows pointer of the kernels: rows, or x as an unread placeholder without rows."""
    return x if rows is None else rows.contiguous()


def _unfused(fn, empty, x, *args):
    """float64 (no fused Triton kernel, as in masked_linear.py): the torch backend's expanded
    path fn(x, *args); empty() (outputs of the right shapes) on FakeTensors, where that path's
    reads of offsets cannot run."""
    return empty() if isinstance(x, FakeTensor) else fn(x, *args)


def _forward(x, weight, packed, offsets, rows, bias, k, t, traced):
    """y [T, O] in x's dtype (x float16 / bfloat16 / float32)."""
    o, i = weight.shape
    y = torch.empty((t, o), dtype=x.dtype, device=x.device)
    widest = _widest(offsets, t, traced)
    if y.numel() == 0 or widest == 0:
        return y
    launcher(_forward_kernel)[_row_grid(k, widest, o, "BN")](
        x, weight, packed.contiguous(), weight if bias is None else bias, offsets.contiguous(),
        _rows_arg(x, rows), y, k, x.shape[0], o, i, packed.shape[-1],
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        0 if bias is None else bias.stride(0), _bucket(widest), HAS_ROWS=rows is not None,
        HAS_BIAS=bias is not None, UPCAST=INTERPRET, PRECISION=dot_precision())
    return y


def _grad_x(grad_out, x, weight, packed, offsets, rows, k, t, traced):
    """grad_x shaped like x (contiguous, x's dtype): g_k (W*M_k) per row; with rows, summed onto
    x's rows by torch's index_add_, in fp32."""
    o, i = weight.shape
    # The kernel writes every row (the modules' rows cover 0 .. T - 1) unless O = 0.
    out = (torch.empty if o else torch.zeros)(
        (t, i), dtype=x.dtype if rows is None else torch.float32, device=x.device)
    widest = _widest(offsets, t, traced)
    if out.numel() and o:
        launcher(_grad_x_kernel)[_row_grid(k, widest, i, "BI")](
            grad_out, weight, packed.contiguous(), offsets.contiguous(), out, k, o, i,
            packed.shape[-1], grad_out.stride(0), grad_out.stride(1), weight.stride(0),
            weight.stride(1), _bucket(widest), UPCAST=INTERPRET, PRECISION=dot_precision())
    if rows is None:
        return out
    return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(
        0, rows, out).to(x.dtype)


def _grad_scores(grad_out, x, weight, offsets, rows, k, t):
    """(g_k^T x_k) * W [K, O, I] in weight's dtype; zero for a module without rows."""
    o, i = weight.shape
    out = torch.empty((k, o, i), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    grid = lambda meta: (k, triton.cdiv(o, meta["BO"]), triton.cdiv(i, meta["BI"]))  # noqa: E731
    launcher(_grad_scores_kernel)[grid](
        grad_out, x, weight, offsets.contiguous(), _rows_arg(x, rows), out, x.shape[0], o, i,
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), weight.stride(0),
        weight.stride(1), _bucket(t // k), HAS_ROWS=rows is not None, UPCAST=INTERPRET,
        PRECISION=dot_precision())
    return out


def _weight_grad(grad_out, x, weight, packed, offsets, rows, k, t):
    """sum_k (g_k^T x_k) * M_k [O, I] in weight's dtype."""
    o, i = weight.shape
    out = torch.empty((o, i), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    grid = lambda meta: (triton.cdiv(o, meta["BO"]), triton.cdiv(i, meta["BI"]))  # noqa: E731
    launcher(_weight_grad_kernel)[grid](
        grad_out, x, packed.contiguous(), offsets.contiguous(), _rows_arg(x, rows), out, k,
        x.shape[0], o, i, packed.shape[-1], grad_out.stride(0), grad_out.stride(1), x.stride(0),
        x.stride(1), _bucket(t // max(k, 1)), HAS_ROWS=rows is not None, UPCAST=INTERPRET,
        PRECISION=dot_precision())
    return out


def _weight_grad_unfused(grad_out, x, weight, packed, offsets, rows):
    """float64 sum_k (g_k^T x_k) * M_k: the torch backend's g_k^T x_k (its grad_scores with a
    weight of ones) times the unpacked masks."""
    ones = torch.ones_like(weight)
    raw = tb.ragged_masked_linear_backward(grad_out, x, ones, packed, offsets, rows,
                                           [False, True, False])[1]
    if raw.numel() == 0:
        return torch.zeros_like(weight)
    return (raw * unpack_mask(packed, raw.shape).to(raw.dtype)).sum(0)


def _empty_grads(x, weight, k, output_mask):
    """Outputs of the right shapes for ragged_masked_linear_backward's output_mask."""
    return (x.new_empty(x.shape) if output_mask[0] else None,
            weight.new_empty((k, *weight.shape)) if output_mask[1] else None,
            weight.new_empty(weight.shape[:1]) if output_mask[2] else None)


# ---- ops ----------------------------------------------------------------------------------------

@register_op("modsplit_triton::ragged_masked_linear",
             "(Tensor x, Tensor weight, Tensor packed, Tensor offsets, Tensor? rows=None, "
             "Tensor? bias=None) -> Tensor")
def ragged_masked_linear(x, weight, packed, offsets, rows=None, bias=None):
    """out[t] = x[rows[t]] (W*M_k)^T + b for offsets[k] <= t < offsets[k+1]. x [R, I], weight
    [O, I], packed int32 [K, O, ceil(I/32)], offsets int64 [K+1], rows int64 [T] or None (T = R),
    bias [O] or None -> [T, O] in x's dtype."""
    k, t, traced = _check(x, weight, packed, offsets, rows, bias)
    if x.dtype not in _FUSED_DTYPES:
        return _unfused(tb.ragged_masked_linear, lambda: x.new_empty(t, weight.shape[0]), x,
                        weight, packed, offsets, rows, bias)
    return _forward(x, weight, packed, offsets, rows, bias, k, t, traced)


@register_op("modsplit_triton::ragged_masked_linear_backward",
             "(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, Tensor offsets, "
             "Tensor? rows, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")
def ragged_masked_linear_backward(grad_out, x, weight, packed, offsets, rows, output_mask):
    """grad_out [T, O] -> (grad_x shaped like x (with rows: summed over the t with rows[t] = r),
    grad_scores [K, O, I] = (g_k^T x_k) * W, grad_bias [O]); None where output_mask is False."""
    k, t, traced = _check(x, weight, packed, offsets, rows)
    _check_grad_out(grad_out, x, t, weight.shape[0])
    if x.dtype not in _FUSED_DTYPES:
        return _unfused(tb.ragged_masked_linear_backward,
                        lambda: _empty_grads(x, weight, k, output_mask), grad_out, x, weight,
                        packed, offsets, rows, output_mask)
    return (_grad_x(grad_out, x, weight, packed, offsets, rows, k, t, traced)
            if output_mask[0] else None,
            _grad_scores(grad_out, x, weight, offsets, rows, k, t) if output_mask[1] else None,
            grad_out.sum(0) if output_mask[2] else None)


@register_op("modsplit_triton::ragged_masked_linear_weight_grad",
             "(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, Tensor offsets, "
             "Tensor? rows) -> Tensor")
def ragged_masked_linear_weight_grad(grad_out, x, weight, packed, offsets, rows):
    """Exact dL/dW [O, I] = sum_k (g_k^T x_k) * M_k of the ragged product (autograd's weight
    gradient); arguments as ragged_masked_linear_backward's."""
    k, t, _ = _check(x, weight, packed, offsets, rows)
    _check_grad_out(grad_out, x, t, weight.shape[0])
    if x.dtype not in _FUSED_DTYPES:
        return _unfused(_weight_grad_unfused, lambda: weight.new_empty(weight.shape), grad_out,
                        x, weight, packed, offsets, rows)
    return _weight_grad(grad_out, x, weight, packed, offsets, rows, k, t)


# ---- autograd -----------------------------------------------------------------------------------

def _setup(ctx, inputs, output):
    x, weight, packed, offsets = inputs[:4]
    rows = inputs[4] if len(inputs) > 4 else None
    ctx.has_rows = rows is not None
    ctx.save_for_backward(x, weight, packed, offsets, *([rows] if ctx.has_rows else []))


def _backward(ctx, grad_out):
    """Gradients of (x, weight, packed, offsets, rows, bias): grad_x and grad_bias from the
    backward op, the exact weight gradient sum_k (g_k^T x_k) * M_k."""
    x, weight, packed, offsets, *rest = ctx.saved_tensors
    rows = rest[0] if ctx.has_rows else None
    # needs_input_grad covers the arguments passed: the dispatcher drops trailing defaults.
    need_x, need_w, _, _, _, need_b = (tuple(ctx.needs_input_grad) + (False,) * 6)[:6]
    grad_out = grad_out.contiguous()
    gx, _, gb = ragged_masked_linear_backward(grad_out, x, weight, packed, offsets, rows,
                                              [need_x, False, need_b])
    gw = (ragged_masked_linear_weight_grad(grad_out, x, weight, packed, offsets, rows)
          if need_w else None)
    return gx, gw, None, None, None, gb


ragged_masked_linear.register_autograd(_backward, setup_context=_setup)
