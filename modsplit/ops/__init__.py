"""Python entry points of the torch.ops.modsplit ops, with fake impls and autograd registered.

Every op has a pure-PyTorch twin in modsplit.reference with the same signature.
"""
from modsplit.ops import schemas  # noqa: F401  (defines the op schemas; must come first)
from modsplit import _extension  # noqa: F401,I001  (registers the C++/CUDA kernels)
from modsplit.ops.affine import channel_affine
from modsplit.ops.conv import masked_conv2d, multi_masked_conv2d
from modsplit.ops.graft import graft_cross_entropy
from modsplit.ops.linear import (masked_linear, multi_masked_linear,
                                 multi_masked_linear_grad_scores_)
from modsplit.ops.mask import multi_topk_mask, pack_mask, topk_mask, unpack_mask
from modsplit.ops.norm import module_batch_norm
from modsplit.ops.pool import max_pool2x2
from modsplit.ops.ragged import (ragged_masked_conv2d, ragged_masked_linear,
                                 ragged_masked_linear_grad_scores_)
from modsplit.ops.sparse import sparse_conv2d, sparse_linear, sparse_linear_chain

__all__ = [
    "topk_mask", "multi_topk_mask", "pack_mask", "unpack_mask", "masked_linear",
    "multi_masked_linear", "masked_conv2d", "multi_masked_conv2d", "sparse_linear",
    "sparse_linear_chain", "sparse_conv2d", "module_batch_norm", "channel_affine", "max_pool2x2",
    "graft_cross_entropy", "multi_masked_linear_grad_scores_", "ragged_masked_linear",
    "ragged_masked_linear_grad_scores_", "ragged_masked_conv2d",
]
