"""Pure-PyTorch reference of every modsplit op: the specification the kernels are tested against.

Mask format: for a weight [O, ...] with R = prod(other dims), a packed mask is int32
[O, ceil(R/32)]; bit j (least significant first) of word w keeps flat column 32*w + j of row o;
padding bits are 0. A bank of K modules is [K, O, ceil(R/32)].
"""
import math

import torch
import torch.nn.functional as F

BITS = 32


def words_for(cols: int) -> int:
    return (cols + BITS - 1) // BITS


def keep_count(density: float, n: int) -> int:
    """Entries a layer of n elements keeps: max(1, floor(density * n + 0.5)), at most n."""
    return min(n, max(1, int(math.floor(density * n + 0.5))))


def pack_mask(mask: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """bool [lead..., rest...] (lead = batch_dims + 1 dims) -> int32 [lead..., ceil(R/32)]."""
    lead = mask.shape[: batch_dims + 1]
    m = mask.reshape(*lead, -1).to(torch.int64)
    cols = m.shape[-1]
    words = words_for(cols)
    m = F.pad(m, (0, words * BITS - cols)).reshape(*lead, words, BITS)
    weights = torch.ones(BITS, dtype=torch.int64, device=mask.device) << torch.arange(
        BITS, device=mask.device)
    packed = (m * weights).sum(-1)  # int64 in [0, 2^32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """int32 [lead..., words] -> bool tensor of `shape` (which starts with lead...)."""
    shape = tuple(shape)
    lead = packed.shape[:-1]
    cols = math.prod(shape[len(lead):])
    bits = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(BITS, device=packed.device)) & 1
    return bits.reshape(*lead, -1)[..., :cols].bool().reshape(shape)


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """scores [O, ...] -> packed [O, ceil(R/32)]: keep the keep_count largest |scores|, ties to
    the lower flat index."""
    flat = scores.detach().abs().flatten()
    k = keep_count(density, flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order] = True
    return pack_mask(keep.reshape(scores.shape))


def multi_topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """scores [K, O, ...] -> packed [K, O, ceil(R/32)], one selection per module."""
    return torch.stack([topk_mask(s, density) for s in scores])


def _effective(weight, packed):
    """W * M for packed [O, words] or [K, O, words] -> [O, ...] or [K, O, ...]."""
    shape = tuple(packed.shape[:-1]) + tuple(weight.shape[1:])
    return weight * unpack_mask(packed, shape).to(weight.dtype)


def masked_linear(x, weight, packed, bias=None):
    """x [*, I], weight [O, I], packed [O, ceil(I/32)] -> [*, O]."""
    return F.linear(x, _effective(weight, packed), bias)


def masked_linear_backward(grad_out, x, weight, packed):
    """-> (grad_x [*, I], grad_scores [O, I] = (g^T x) * W, grad_bias [O])."""
    g = grad_out.reshape(-1, weight.shape[0])
    x2 = x.reshape(-1, weight.shape[1])
    return (grad_out @ _effective(weight, packed), (g.T @ x2) * weight, g.sum(0))


def multi_masked_linear(x, weight, packed, bias=None, shared_input=False):
    """x [K, *, I] (or [*, I] with shared_input) -> [K, *, O]."""
    xs = [x] * packed.shape[0] if shared_input else list(x)
    return torch.stack([masked_linear(xk, weight, pk, bias) for xk, pk in zip(xs, packed)])


def multi_masked_linear_backward(grad_out, x, weight, packed, shared_input=False):
    """-> (grad_x shaped like x (summed over K when shared), grad_scores [K, O, I], grad_bias [O])."""
    xs = [x] * packed.shape[0] if shared_input else list(x)
    parts = [masked_linear_backward(g, xk, weight, pk) for g, xk, pk in zip(grad_out, xs, packed)]
    gx = torch.stack([p[0] for p in parts])
    return (gx.sum(0) if shared_input else gx, torch.stack([p[1] for p in parts]),
            torch.stack([p[2] for p in parts]).sum(0))


def multi_masked_linear_grad_scores_(out, grad_out, x, weight, packed, shared_input=False):
    """out [K, O, I] <- multi_masked_linear_backward's grad_scores, in place."""
    out.copy_(multi_masked_linear_backward(grad_out, x, weight, packed, shared_input)[1])


def _ragged_slices(offsets):
    o = [int(v) for v in offsets]
    return list(zip(o[:-1], o[1:]))


def ragged_masked_linear(x, weight, packed, offsets, rows=None, bias=None):
    """Module k on its rows: out[t] = x[rows[t]] (W*M_k)^T + b for offsets[k] <= t <
    offsets[k+1]. x [R, I], packed [K, O, words], offsets int64 [K+1], rows int64 [T] or None
    (x's own rows, T = R) -> [T, O]."""
    xs = x if rows is None else x[rows]
    parts = [masked_linear(xs[a:b], weight, packed[k], bias)
             for k, (a, b) in enumerate(_ragged_slices(offsets))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[0])


def ragged_masked_linear_backward(grad_out, x, weight, packed, offsets, rows=None):
    """-> (grad_x like x (with rows: summed over the t with rows[t] = r), grad_scores [K, O, I]
    = (g_k^T x_k) * W, grad_bias [O])."""
    xs = x if rows is None else x[rows]
    parts = [masked_linear_backward(grad_out[a:b], xs[a:b], weight, packed[k])
             for k, (a, b) in enumerate(_ragged_slices(offsets))]
    gx_rows = torch.cat([p[0] for p in parts]) if parts else xs.new_zeros(xs.shape)
    gx = gx_rows if rows is None else torch.zeros_like(x).index_add_(0, rows, gx_rows)
    gs = (torch.stack([p[1] for p in parts]) if parts
          else weight.new_zeros(0, *weight.shape))
    return gx, gs, grad_out.sum(0)


def ragged_masked_linear_grad_scores_(out, grad_out, x, weight, packed, offsets, rows=None):
    """out [K, O, I] <- ragged_masked_linear_backward's grad_scores, in place."""
    out.copy_(ragged_masked_linear_backward(grad_out, x, weight, packed, offsets, rows)[1])


def masked_conv2d(x, weight, packed, bias, stride, padding, dilation, groups):
    """x [B, C, H, W], weight [O, C/groups, kh, kw], packed [O, ceil(C/groups*kh*kw/32)]."""
    return F.conv2d(x, _effective(weight, packed), bias, stride, padding, dilation, groups)


def masked_conv2d_backward(grad_out, x, weight, packed, stride, padding, dilation, groups):
    """-> (grad_x, grad_scores = dL/d(W*M) * W, grad_bias), via autograd of the reference."""
    with torch.enable_grad():  # also when called from a backward pass
        x = x.detach().requires_grad_(True)
        w = _effective(weight, packed).detach().requires_grad_(True)
        b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device,
                        requires_grad=True)
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad_out)
    return gx, gw * weight, gb


def multi_masked_conv2d(x, weight, packed, bias, stride, padding, dilation, groups):
    """x [B, C, H, W] shared or [K, B, C, H, W] -> [K, B, O, Ho, Wo]."""
    xs = [x] * packed.shape[0] if x.dim() == 4 else list(x)
    return torch.stack([masked_conv2d(xk, weight, pk, bias, stride, padding, dilation, groups)
                        for xk, pk in zip(xs, packed)])


def multi_masked_conv2d_backward(grad_out, x, weight, packed, stride, padding, dilation, groups):
    shared = x.dim() == 4
    xs = [x] * packed.shape[0] if shared else list(x)
    parts = [masked_conv2d_backward(g, xk, weight, pk, stride, padding, dilation, groups)
             for g, xk, pk in zip(grad_out, xs, packed)]
    gx = torch.stack([p[0] for p in parts])
    return (gx.sum(0) if shared else gx, torch.stack([p[1] for p in parts]),
            torch.stack([p[2] for p in parts]).sum(0))


def ragged_masked_conv2d(x, weight, packed, offsets, rows, bias, stride, padding, dilation,
                         groups):
    """Module k on its rows: out[t] = conv2d(x[rows[t]], W*M_k) + b for offsets[k] <= t <
    offsets[k+1]. x [R, C, H, W], packed [K, O, words], offsets int64 [K+1], rows int64 [T] or
    None (x's own rows, T = R) -> [T, O, Ho, Wo]."""
    xs = x if rows is None else x[rows]
    return torch.cat([masked_conv2d(xs[a:b], weight, packed[k], bias, stride, padding, dilation,
                                    groups) for k, (a, b) in enumerate(_ragged_slices(offsets))])


def ragged_masked_conv2d_backward(grad_out, x, weight, packed, offsets, rows, stride, padding,
                                  dilation, groups):
    """-> (grad_x like x (with rows: summed over the t with rows[t] = r), grad_scores
    [K, *weight.shape] = dL/d(W*M_k) * W (0 * W for a module without rows), grad_bias [O])."""
    xs = x if rows is None else x[rows]
    parts = [masked_conv2d_backward(grad_out[a:b], xs[a:b], weight, packed[k], stride, padding,
                                    dilation, groups)
             for k, (a, b) in enumerate(_ragged_slices(offsets))]
    gx_rows = torch.cat([p[0] for p in parts])
    gx = gx_rows if rows is None else torch.zeros_like(x).index_add_(0, rows, gx_rows)
    return gx, torch.stack([p[1] for p in parts]), grad_out.sum((0, 2, 3))


def csr_to_dense(row_ptr, col_idx, values, cols: int) -> torch.Tensor:
    """CSR of K modules (row_ptr int64 [K, O+1] offsets into col_idx int32 [nnz] and values [nnz])
    -> dense weights [K, O, cols] (entries outside the CSR are 0; repeated columns add up)."""
    k, o = row_ptr.shape[0], row_ptr.shape[1] - 1
    dense = torch.zeros(k * o * cols, dtype=values.dtype, device=values.device)
    lengths = (row_ptr[:, 1:] - row_ptr[:, :-1]).reshape(-1)
    rows = torch.repeat_interleave(torch.arange(k * o, device=values.device), lengths)
    first = torch.repeat_interleave(row_ptr[:, :-1].reshape(-1), lengths)
    before = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    entries = first + torch.arange(first.numel(), device=values.device) - before
    flat = rows * cols + col_idx[entries].long()
    dense.index_add_(0, flat, values[entries])
    return dense.reshape(k, o, cols)


def sparse_linear(x, row_ptr, col_idx, values, bias=None, relu=False):
    """K modules' linear layers from CSR (csr_to_dense): x [S, B, I] (S = 1: shared by every
    module, or S = K), bias [K, O] or None -> y [K, B, O] = x_k W_k^T + b_k, ReLU'd if relu."""
    w = csr_to_dense(row_ptr, col_idx, values, x.shape[-1])
    y = torch.matmul(x, w.transpose(1, 2))
    y = y if bias is None else y + bias.unsqueeze(1)
    return y.relu() if relu else y


def pack_chain(layers):
    """[(row_ptr [K, O+1], col_idx, values, bias [K, O] or None, activation)] (row_ptr offsets
    relative to each layer's own entries; activation 0 none, 1 ReLU, 2 sigmoid) -> (layout int64
    [L, 7], row_ptr, col_idx, values, bias): the packed arguments of sparse_linear_chain (see
    unpack_chain)."""
    rows, rps, cis, vals, biases = [], [], [], [], []
    rp_off = e_off = b_off = 0
    for row_ptr, col_idx, values, bias, activation in layers:
        k, o = row_ptr.shape[0], row_ptr.shape[1] - 1
        rows.append([k, o, rp_off, e_off, col_idx.numel(), -1 if bias is None else b_off,
                     int(activation)])
        rps.append(row_ptr.reshape(-1))
        cis.append(col_idx)
        vals.append(values)
        if bias is not None:
            biases.append(bias.reshape(-1))
            b_off += bias.numel()
        rp_off += row_ptr.numel()
        e_off += col_idx.numel()
    dtype = vals[0].dtype
    return (torch.tensor(rows, dtype=torch.long), torch.cat(rps), torch.cat(cis), torch.cat(vals),
            torch.cat(biases) if biases else torch.zeros(0, dtype=dtype))


def unpack_chain(layout, row_ptr, col_idx, values, bias):
    """Inverse of pack_chain: layout row l = (K, O, row_ptr offset, entry offset, nnz, bias offset
    or -1, activation) -> [(row_ptr [K, O+1], col_idx, values, bias or None, activation)]."""
    layers = []
    for k, o, rp_off, e_off, nnz, b_off, activation in layout.tolist():
        layers.append((row_ptr[rp_off:rp_off + k * (o + 1)].reshape(k, o + 1),
                       col_idx[e_off:e_off + nnz], values[e_off:e_off + nnz],
                       None if b_off < 0 else bias[b_off:b_off + k * o].reshape(k, o),
                       activation))
    return layers


def sparse_linear_chain(x, layout, row_ptr, col_idx, values, bias):
    """sparse_linear layer after layer, each followed by its activation (layers packed by
    pack_chain): x [S, B, I] -> [K, B, O_last]."""
    for rp, ci, v, b, activation in unpack_chain(layout, row_ptr, col_idx, values, bias):
        x = sparse_linear(x, rp, ci, v, b, activation == 1)
        x = x.sigmoid() if activation == 2 else x
    return x


def sparse_conv2d(x, row_ptr, col_idx, values, bias, kernel_size, stride, padding, relu=False):
    """K modules' convolutions (groups 1, dilation 1) from CSR over the flat [C, kh, kw] columns:
    x [S, B, C, H, W] (S = 1 or K), bias [K, O] or None -> [K, B, O, Ho, Wo], ReLU'd if relu."""
    k, c = row_ptr.shape[0], x.shape[2]
    w = csr_to_dense(row_ptr, col_idx, values, c * kernel_size[0] * kernel_size[1])
    w = w.reshape(k, -1, c, *kernel_size)
    xs = [x[0]] * k if x.shape[0] == 1 else list(x)
    y = torch.stack([F.conv2d(xk, wk, None if bias is None else bias[i], stride, padding)
                     for i, (xk, wk) in enumerate(zip(xs, w))])
    return y.relu() if relu else y


def cotrain_sgd_step_(scores, momentum_buffer, grad, anchor, lr, momentum, weight_decay,
                      stem_coef, nesterov, init_buffer, sign_grad):
    """The co-training score update, in place, with torch.optim.SGD's own tensor ops
    (single-tensor path, dampening 0): the gradient is g + sgn(S - A) * stem_coef, with
    g = grad * sgn(S) when sign_grad (grad is then the masked ops' score gradient before the
    straight-through sgn(S), as modsplit.functional.raw_score_grad leaves it), else grad (what
    autograd accumulates for the stemming term alpha/(L*M*N) * sum |S - A| with p = 1), then
    weight decay, momentum (the buffer is set to the gradient when init_buffer), Nesterov and
    the step S -= lr * g. scores, momentum_buffer (updated in place), grad, anchor (or None):
    float [K, ...], one shape. Returns float64 [K], the sums of |S - A| over the old scores
    per module (zeros without anchor)."""
    g = grad * scores.sign() if sign_grad else grad
    stem = torch.zeros(scores.shape[0], dtype=torch.float64, device=scores.device)
    if anchor is not None:
        d = scores - anchor
        stem = d.abs().flatten(1).sum(1, dtype=torch.float64)
        g = g + d.sgn() * stem_coef
    if weight_decay != 0:
        g = g.add(scores, alpha=weight_decay)
    if init_buffer:
        momentum_buffer.copy_(g)
    else:
        momentum_buffer.mul_(momentum).add_(g)
    g = g.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    scores.add_(g, alpha=-lr)
    return stem


# Half-width of the next top-k bracket, as a fraction of the threshold: the least one, and the
# first one (no previous threshold). See cotrain_sgd_topk_step_.
BRACKET_MIN_HALF_WIDTH = 1.0 / 1024
BRACKET_FIRST_HALF_WIDTH = 1.0 / 256


def cotrain_sgd_topk_step_(scores, momentum_buffer, grad, anchor, lr, momentum, weight_decay,
                           stem_coef, nesterov, init_buffer, sign_grad, density, bracket):
    """cotrain_sgd_step_ followed by the top-k mask of the updated scores: returns (stem
    float64 [K], packed int32 [K, O, ceil(R/32)] = multi_topk_mask(scores, density)), and
    updates the bracket in place (update_topk_bracket_)."""
    stem = cotrain_sgd_step_(scores, momentum_buffer, grad, anchor, lr, momentum, weight_decay,
                             stem_coef, nesterov, init_buffer, sign_grad)
    update_topk_bracket_(scores, density, bracket)
    return stem, multi_topk_mask(scores, density)


def update_topk_bracket_(scores, density, bracket):
    """The bracket float64 [K, 2] the fused step keeps per module, updated in place for the
    scores float [K, O, ...]: the threshold (the keep-th largest |S|; NaN when every entry is
    kept) and the half-width of the next step's bracket around it: max(4 |threshold - previous
    threshold|, threshold / 1024), at least doubled when the new threshold left the previous
    bracket, threshold / 256 when there was no previous threshold. The bracket only speeds up
    the CPU kernel's select; the mask never depends on it."""
    flat = scores.detach().abs().flatten(1)
    keep = keep_count(density, flat.shape[1])
    if keep == flat.shape[1]:  # every entry kept: no threshold
        bracket.fill_(float("nan"))
        return
    tau = flat.topk(keep, dim=1).values[:, -1].to(torch.float64).cpu()
    tau_old, half_old = bracket[:, 0].clone(), bracket[:, 1].clone()
    known = tau_old.isfinite() & half_old.isfinite() & (tau_old >= 0) & (half_old >= 0)
    half = torch.where(known, torch.maximum(4 * (tau - tau_old).abs(),
                                            BRACKET_MIN_HALF_WIDTH * tau),
                       BRACKET_FIRST_HALF_WIDTH * tau)
    missed = known & ((tau < tau_old - half_old) | (tau > tau_old + half_old))
    bracket[:, 0] = tau
    bracket[:, 1] = torch.where(missed, torch.maximum(half, 2 * half_old), half)


def _groups_view(x, groups):
    """x [G*N, C, *] -> [G, N, C, S] (S = the product of the trailing dims, 1 without any)."""
    return x.reshape(groups, x.shape[0] // groups, x.shape[1], -1)


def module_batch_norm(x, groups, weight, bias, eps, relu=False, offsets=None):
    """Training-mode BatchNorm with one set of batch statistics per group of rows: x float
    [G*N, C, *] (G module groups of N rows each, C channels), weight / bias [C] or None ->
    (y like x, mean [G, C], invstd [G, C]) with the biased variance, as nn.BatchNorm in
    training mode computes per group; relu: torch.relu(y). offsets int64 [G+1]: ragged groups
    (group g holds rows offsets[g] .. offsets[g+1] - 1; one without rows: mean 0, invstd
    1/sqrt(1 + eps))."""
    if offsets is not None:
        parts = [module_batch_norm(x[a:b], 1, weight, bias, eps, relu) if b > a else
                 (x[a:b], x.new_zeros(1, x.shape[1]),
                  x.new_full((1, x.shape[1]), (1 + eps) ** -0.5))
                 for a, b in _ragged_slices(offsets)]
        return tuple(torch.cat(t) for t in zip(*parts))
    xg = _groups_view(x, groups)
    var, mean = torch.var_mean(xg, dim=(1, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    y = (xg - mean[:, None, :, None]) * invstd[:, None, :, None]
    if weight is not None:
        y = y * weight[:, None]
    if bias is not None:
        y = y + bias[:, None]
    if relu:
        y = torch.relu(y)
    return y.reshape(x.shape), mean, invstd


def module_batch_norm_backward(grad_y, x, groups, weight, mean, invstd, out=None, offsets=None):
    """-> (grad_x like x, grad_weight [C], grad_bias [C]) of module_batch_norm; out: its
    output under relu (grad_y counts where out > 0: torch's ReLU gradient rule); offsets: its
    ragged groups."""
    if offsets is not None:
        parts = [module_batch_norm_backward(grad_y[a:b], x[a:b], 1, weight, mean[g:g + 1],
                                            invstd[g:g + 1], None if out is None else out[a:b])
                 for g, (a, b) in enumerate(_ragged_slices(offsets)) if b > a]
        if not parts:
            zero = x.new_zeros(x.shape[1])
            return torch.zeros_like(x), zero, zero
        return (torch.cat([p[0] for p in parts]), sum(p[1] for p in parts),
                sum(p[2] for p in parts))
    if out is not None:
        grad_y = torch.where(out <= 0, torch.zeros_like(grad_y), grad_y)
    xg, gy = _groups_view(x, groups), _groups_view(grad_y, groups)
    n = xg.shape[1] * xg.shape[3]
    xhat = (xg - mean[:, None, :, None]) * invstd[:, None, :, None]
    g = gy if weight is None else gy * weight[:, None]
    mean_g = g.sum((1, 3), keepdim=True) / n
    mean_gx = (g * xhat).sum((1, 3), keepdim=True) / n
    grad_x = invstd[:, None, :, None] * (g - mean_g - xhat * mean_gx)
    return grad_x.reshape(x.shape), (gy * xhat).sum((0, 1, 3)), gy.sum((0, 1, 3))


def channel_affine(x, groups, scale, shift, relu=False):
    """A per-(group, channel) affine map: x float [G*N, C, *] (G groups of N rows), scale / shift
    [G, C] -> y like x, y = x * scale[g, c] + shift[g, c] on group g's rows, then torch.relu
    with relu (BatchNorm in eval mode, then ReLU)."""
    xg = _groups_view(x, groups)
    y = xg * scale[:, None, :, None] + shift[:, None, :, None]
    return (torch.relu(y) if relu else y).reshape(x.shape)


def channel_affine_backward(grad_y, out, groups, scale, relu):
    """-> grad_x like grad_y of channel_affine: grad_y * scale[g, c], zero where the forward's
    output out <= 0 with relu (torch's ReLU gradient rule: a NaN output passes its gradient)."""
    g = _groups_view(grad_y, groups) * scale[:, None, :, None]
    if relu:
        g = torch.where(_groups_view(out, groups) <= 0, torch.zeros_like(g), g)
    return g.reshape(grad_y.shape)


def max_pool2x2(x):
    """nn.MaxPool2d(2) keeping window positions: x float [N, C, H, W] -> (y [N, C, H/2, W/2],
    indices uint8 [N, C, H/2, W/2] = 2 * dy + dx of each maximum). The positions (0,0), (0,1),
    (1,0), (1,1) are scanned from -inf; a larger or NaN value replaces the maximum (ties keep
    the first position, NaN propagates), as ATen's max_pool2d does."""
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    win = (x[:, :, :2 * ho, :2 * wo].reshape(n, c, ho, 2, wo, 2).permute(0, 1, 2, 4, 3, 5)
           .reshape(n, c, ho, wo, 4))
    m = torch.full((n, c, ho, wo), -math.inf, dtype=x.dtype, device=x.device)
    k = torch.zeros((n, c, ho, wo), dtype=torch.uint8, device=x.device)
    for j in range(4):
        v = win[..., j]
        upd = (v > m) | torch.isnan(v)
        m = torch.where(upd, v, m)
        k = torch.where(upd, torch.full_like(k, j), k)
    return m, k


def max_pool2x2_backward(grad_y, indices, input_size):
    """-> grad_x float [N, C, H, W] (input_size = (H, W)) of max_pool2x2: each output's gradient
    at its window's recorded position, zero elsewhere."""
    h, w = (int(v) for v in input_size)
    n, c, ho, wo = grad_y.shape
    hit = indices.long()[..., None] == torch.arange(4, device=grad_y.device)
    win = torch.where(hit, grad_y[..., None], torch.zeros((), dtype=grad_y.dtype,
                                                          device=grad_y.device))
    win = win.reshape(n, c, ho, wo, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * ho, 2 * wo)
    return F.pad(win, (0, w - 2 * wo, 0, h - 2 * ho))


def graft_cross_entropy(logits, weight, bias, positive, row_weight, scale):
    """Co-training's grafting layers and class-weighted cross-entropy: logits float [K, R, N]
    (module k's network output on its R rows), weight [K, N, 2], bias [K, 2], positive bool
    [K, R], row_weight [K, R] -> (out [K, R, 2] = logits @ weight + bias, ce [K] = scale *
    sum_r row_weight * cross_entropy(out[k, r], target 0 where positive else 1))."""
    out = torch.baddbmm(bias.unsqueeze(1), logits, weight)
    ce = F.cross_entropy(out.flatten(0, 1), (~positive).long().flatten(),
                         reduction="none").view_as(positive)
    return out, scale * (row_weight * ce).sum(1)
