"""sparse_linear, sparse_linear_chain and sparse_conv2d: the CSR inference ops of a compact composed model
(modsplit.compact). Fake impls and Python wrappers; no autograd (inference only).

Only the CPU has compiled kernels of these ops; elsewhere (CUDA, Triton, no modsplit._C) they run
on the "torch" backend.
"""
import torch

from modsplit import torch_backend
from modsplit.backend import ops_for

_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_HAS_KERNEL = {}  # device type -> whether modsplit._C registered these ops for it


def _has_kernel(device_type):
    if device_type not in _HAS_KERNEL:
        key = _KEYS.get(device_type)
        _HAS_KERNEL[device_type] = key is not None and \
            torch._C._dispatch_has_kernel_for_dispatch_key("modsplit::sparse_linear", key)
    return _HAS_KERNEL[device_type]


def _ns(x):
    ns = ops_for(x)
    return ns if ns is torch.ops.modsplit and _has_kernel(x.device.type) else torch_backend


def kernel_for(device: torch.device, kind: str, dtype: torch.dtype = torch.float32):
    """The function a compact layer calls, fixed once (at load or .to()): the compiled op
    ("linear": sparse_linear, "conv": sparse_conv2d, "chain": sparse_linear_chain) when the
    backend selected now runs the device on modsplit._C, it has these kernels and dtype is
    float32 or float64; else the torch backend's twin (float16 / bfloat16 too)."""
    ns = _ns(torch.empty(0, device=device))
    if dtype not in (torch.float32, torch.float64):
        ns = torch_backend
    name = {"linear": "sparse_linear", "conv": "sparse_conv2d",
            "chain": "sparse_linear_chain"}[kind]
    return getattr(ns, name).default if ns is torch.ops.modsplit else getattr(ns, name)


def sparse_linear(x, row_ptr, col_idx, values, bias=None, relu=False):
    """K modules' linear layers held as CSR. x float [S, B, I] (S = 1: one input shared by every
    module, or S = K), row_ptr int64 [K, O+1] (offsets into col_idx / values), col_idx int32
    [nnz] (input feature of each kept weight), values [nnz] (x's dtype), bias [K, O] or None
    -> y [K, B, O] = x_k W_k^T + b_k, with ReLU applied when relu=True."""
    return _ns(x).sparse_linear(x, row_ptr, col_idx, values, bias, relu)


def sparse_linear_chain(x, layout, row_ptr, col_idx, values, bias):
    """sparse_linear applied layer after layer in one call, each followed by its activation
    (none, ReLU or sigmoid), the layers packed into flat tensors by
    modsplit.reference.pack_chain (layout int64 [L, 7]). x [S, B, I] -> [K, B, O_last]."""
    return _ns(x).sparse_linear_chain(x, layout, row_ptr, col_idx, values, bias)


def sparse_conv2d(x, row_ptr, col_idx, values, bias, kernel_size, stride, padding, relu=False):
    """K modules' convolutions (groups 1, dilation 1, zero padding) held as CSR over the flat
    (c, i, j) columns of an [O, C, kh, kw] weight. x float [S, B, C, H, W] (S = 1 or K), bias
    [K, O] or None -> [K, B, O, Ho, Wo], with ReLU applied when relu=True."""
    return _ns(x).sparse_conv2d(x, row_ptr, col_idx, values, bias, list(kernel_size),
                                list(stride), list(padding), relu)


@torch.library.register_fake("modsplit::sparse_linear")
def _sparse_linear_fake(x, row_ptr, col_idx, values, bias=None, relu=False):
    return x.new_empty((row_ptr.shape[0], x.shape[1], row_ptr.shape[1] - 1))


@torch.library.register_fake("modsplit::sparse_linear_chain")
def _sparse_linear_chain_fake(x, layout, row_ptr, col_idx, values, bias):
    ctx = torch.library.get_ctx()
    k, o = ctx.new_dynamic_size(), ctx.new_dynamic_size()  # read from layout's values
    return x.new_empty((k, x.shape[1], o))


@torch.library.register_fake("modsplit::sparse_conv2d")
def _sparse_conv2d_fake(x, row_ptr, col_idx, values, bias, kernel_size, stride, padding,
                        relu=False):
    ho = (x.shape[3] + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
    wo = (x.shape[4] + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
    return x.new_empty((row_ptr.shape[0], x.shape[1], row_ptr.shape[1] - 1, ho, wo))
