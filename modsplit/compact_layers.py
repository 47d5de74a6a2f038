"""CompactLinear / CompactConv2d: K modules' layers stored as the union of their kept weights.

Stored (what a compact file holds per layer; see modsplit.compact):
  union_mask    int32 [O, ceil(R/32)]  packed union of the chosen modules' masks (R = weight[0]
                                       numel), same bit layout as a bank's masks;
  values        float [nnz_u]          the union's weights, row-major over the weight;
  module_masks  int32 [K, ceil(nnz_u/32)]  bit p of row k: module k keeps union entry p;
  bias          float [K, O] or None   (per module: folding hidden units may make them differ).
Prepared once (prepare()): each module's CSR (row_ptr int64 [K, O+1], col_idx int32, values), or,
where the modules keep a larger share of the weight than `dense_above`, dense per-module weights
for BLAS / oneDNN. Inputs arrive module-folded ([K*B, ...], module k owns rows k*B..k*B+B-1) or,
when `shared`, unfolded ([B, ...], the same input for every module); outputs are always folded.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from modsplit import reference as ref
from modsplit.ops import sparse as sparse_ops

# Kept share of a layer's weights above which the dense path (BLAS / oneDNN) is used; measured
# crossovers in benchmarks/RESULTS.md ("Compact composed models").
DENSE_ABOVE = {"linear": 0.3, "conv": 0.35}
# Layers with fewer module weights (K * O * R) than this always take the sparse kernel: for them
# the per-call overhead of BLAS / oneDNN plus separate bias and ReLU ops dominates.
DENSE_MIN_WEIGHTS = 1 << 14


class _CompactLayer(nn.Module):
    """Stored tensors, CSR preparation and the dense/sparse choice shared by both layers."""

    kind = None

    def __init__(self, weight_shape, union_mask, values, module_masks, bias, shared):
        super().__init__()
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.shared, self.relu = bool(shared), False
        self.register_buffer("union_mask", union_mask)
        self.register_buffer("values", values)
        self.register_buffer("module_masks", module_masks)
        self.register_buffer("bias", bias)
        self.n_modules = module_masks.shape[0]
        self.prepare()

    @classmethod
    def from_plain(cls, weight, masks, bias, shared, **conv):
        """From dense weight [O, ...] and bool masks [K, O, ...] of the chosen modules; bias [O]
        or [K, O] or None."""
        union = masks.any(0)
        flat = masks.reshape(masks.shape[0], -1)[:, union.reshape(-1)]
        k, o = masks.shape[0], weight.shape[0]
        if bias is not None and bias.dim() == 1:
            bias = bias.unsqueeze(0).expand(k, o)
        return cls(weight.shape, ref.pack_mask(union), weight[union].contiguous(),
                   ref.pack_mask(flat), None if bias is None else bias.contiguous().clone(),
                   shared, **conv)

    def module_weights(self):
        """Dense weights of the K modules, float [K, *weight_shape] (0 where a module drops)."""
        o, k = self.weight_shape[0], self.n_modules
        union = ref.unpack_mask(self.union_mask, (o, self.union_mask.shape[1] * 32))
        cols = int(torch.Size(self.weight_shape[1:]).numel())
        where = union[:, :cols].reshape(-1).nonzero(as_tuple=True)[0]
        keep = ref.unpack_mask(self.module_masks, (k, self.values.numel()))
        w = torch.zeros(k, o * cols, dtype=self.values.dtype, device=self.values.device)
        w[:, where] = self.values * keep.to(self.values.dtype)
        return w.reshape(k, *self.weight_shape)

    def prepare(self, scale=None, shift=None):
        """Build the run-time structures from the stored tensors (set_weights). scale / shift
        float [O] or [K, O] (optional; [K, O]: one map per module) fold a following per-channel
        affine map (an eval BatchNorm) into the layer: module k's W_k <- scale[k] * W_k (per
        output unit), b_k <- scale[k] * b_k + shift[k]."""
        w, bias, k = self.module_weights(), self.bias, self.n_modules
        if scale is not None:
            o = w.shape[1]
            if scale.shape not in ((o,), (k, o)) or shift.shape != scale.shape:
                raise ValueError(f"modsplit: prepare's scale and shift must both be [{o}] or "
                                 f"[{k}, {o}], got {tuple(scale.shape)} and "
                                 f"{tuple(shift.shape)}")
            scale, shift = scale.reshape(-1, o), shift.reshape(-1, o)  # [1 or K, O]
            w = w * scale.reshape(*scale.shape, *[1] * (w.dim() - 2))
            base = w.new_zeros(k, o) if bias is None else bias
            bias = base * scale + shift
        self.set_weights(w, bias)

    def set_weights(self, w, bias):
        """Run-time structures (non-persistent buffers) for module weights w [K, O', ...] and
        bias [K, O'] or None: CSR (row_ptr int64 [K, O'+1], col_idx int32 [nnz], csr_values
        [nnz]) of the non-zero weights, or the dense w when more than DENSE_ABOVE[kind] of it
        is non-zero (and w has at least DENSE_MIN_WEIGHTS entries). The stored tensors are
        unchanged."""
        k, o = w.shape[0], w.shape[1]
        flat = w.reshape(k, o, -1)
        nz = flat != 0
        dense = (flat.numel() >= DENSE_MIN_WEIGHTS
                 and int(nz.sum()) > DENSE_ABOVE[self.kind] * flat.numel())
        self.register_buffer("run_bias", None if bias is None else bias.contiguous(),
                             persistent=False)
        self.register_buffer("dense", w.contiguous() if dense else None, persistent=False)
        row_ptr = torch.zeros(k * o + 1, dtype=torch.long, device=w.device)
        row_ptr[1:] = nz.sum(2).reshape(-1).cumsum(0)
        self.register_buffer("row_ptr", None if dense else row_ptr.unfold(0, o + 1, o)
                             .contiguous(), persistent=False)
        self.register_buffer("col_idx", None if dense else nz.nonzero(as_tuple=True)[2].to(
            torch.int32), persistent=False)
        self.register_buffer("csr_values", None if dense else flat[nz].contiguous(),
                             persistent=False)
        self._refresh()

    def _refresh(self):
        """Cache the run-time tensors and the sparse kernel (ops.sparse.kernel_for: picked from
        the backend selected now and the layer's device) in plain attributes, so that a call does
        no nn.Module attribute lookup."""
        self.__dict__["_run"] = (self.dense, self.row_ptr, self.col_idx, self.csr_values,
                                 self.run_bias)
        self.__dict__["_kernel"] = sparse_ops.kernel_for(self.values.device, self.kind,
                                                         self.values.dtype)

    def _apply(self, fn, recurse=True):  # .to(device / dtype): refresh the cached tensors
        out = super()._apply(fn, recurse)
        if "_run" in self.__dict__:
            self._refresh()
        return out

    def _modules_input(self, x):
        """x [N, ...] -> [S, N/S, ...]: S = 1 when shared, else K (module-folded rows)."""
        s = 1 if self.shared else self.n_modules
        if x.shape[0] % s:
            raise ValueError(f"modsplit: {type(self).__name__} expects a batch of {s} folded "
                             f"module copies, got batch {x.shape[0]}")
        return x.reshape(s, x.shape[0] // s, *x.shape[1:])

    def extra_repr(self):
        path = "dense" if self.dense is not None else "sparse"
        return (f"modules={self.n_modules}, weight={self.weight_shape}, kept="
                f"{self.values.numel()}, path={path}, shared={self.shared}, relu={self.relu}")


class CompactLinear(_CompactLayer):
    """K modules' Linear layers. Input [N, *, I] (N = K*B folded, or B when shared)
    -> [K*B, *, O]."""

    kind = "linear"

    def forward(self, x):
        dense, row_ptr, col_idx, values, bias = self._run
        xs = self._modules_input(x)
        xs = xs.reshape(xs.shape[0], -1, x.shape[-1])
        if dense is None:
            y = self._kernel(xs, row_ptr, col_idx, values, bias, self.relu)
        else:
            y = torch.matmul(xs, dense.transpose(1, 2))
            if bias is not None:
                y = y + bias.unsqueeze(1)
            y = y.relu() if self.relu else y
        return y.reshape(-1, *x.shape[1:-1], y.shape[-1])


class CompactConv2d(_CompactLayer):
    """K modules' Conv2d layers (groups 1, dilation 1, zero padding). Input [N, C, H, W]
    (N = K*B folded, or B when shared) -> [K*B, O, Ho, Wo]."""

    kind = "conv"

    def __init__(self, weight_shape, union_mask, values, module_masks, bias, shared, stride=(1, 1),
                 padding=(0, 0)):
        self.stride, self.padding = tuple(stride), tuple(padding)
        super().__init__(weight_shape, union_mask, values, module_masks, bias, shared)

    def forward(self, x):
        dense, row_ptr, col_idx, values, bias = self._run
        xs = self._modules_input(x)
        k = self.n_modules
        if dense is None:
            y = self._kernel(xs, row_ptr, col_idx, values, bias, self.weight_shape[2:],
                             self.stride, self.padding, self.relu)
        else:
            s, b, c, h, w = xs.shape
            o = dense.shape[1]
            xg = xs.expand(k, b, c, h, w).transpose(0, 1).reshape(b, k * c, h, w)
            y = F.conv2d(xg, dense.reshape(k * o, c, *dense.shape[3:]),
                         None if bias is None else bias.reshape(-1), self.stride, self.padding,
                         1, k)
            y = y.reshape(b, k, o, *y.shape[2:]).transpose(0, 1)
            y = y.relu() if self.relu else y
        return y.reshape(k * y.shape[1], *y.shape[2:])

    def extra_repr(self):
        return f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}"


class CompactLinearChain(nn.Module):
    """Sparse CompactLinear layers applied one after the other (each feeding only the next) in
    one sparse_linear_chain call; with sigmoid=True a sigmoid follows the last one. Input as the
    first layer's -> output as the last layer's."""

    def __init__(self, layers, sigmoid=False):
        super().__init__()
        if not layers or any(not isinstance(m, CompactLinear) or m.dense is not None
                             for m in layers):
            raise ValueError("modsplit: a chain takes sparse CompactLinear layers")
        self.layers = nn.ModuleList(layers)
        self.sigmoid = bool(sigmoid)
        self.__dict__["_first"] = layers[0]
        self._refresh()

    def _refresh(self):
        acts = [int(m.relu) for m in self.layers]
        acts[-1] = 2 if self.sigmoid else acts[-1]
        packed = ref.pack_chain([(*m._run[1:], a) for m, a in zip(self.layers, acts)])
        self.__dict__["_args"] = tuple(t.to(self.layers[0].values.device) for t in packed)
        first = self.layers[0].values
        self.__dict__["_kernel"] = sparse_ops.kernel_for(first.device, "chain", first.dtype)

    def _apply(self, fn, recurse=True):  # the layers refresh first (children are applied first)
        out = super()._apply(fn, recurse)
        self._refresh()
        return out

    def forward(self, x):
        xs = self._first._modules_input(x)
        y = self._kernel(xs.reshape(xs.shape[0], -1, x.shape[-1]), *self._args)
        return y.reshape(-1, *x.shape[1:-1], y.shape[-1])

    def extra_repr(self):
        return f"layers={len(self.layers)}, sigmoid={self.sigmoid}"
