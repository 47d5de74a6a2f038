"""Triton implementations of every modsplit op, registered as torch.ops.modsplit_triton.<name>
with the same names and schemas as torch.ops.modsplit (modsplit.backend selects between them).

One op family per module, each with its kernels and its op wrappers (torch.library.triton_op;
an opaque custom_op under the interpreter, see utils.register_op):
  topk_mask.py      topk_mask, multi_topk_mask (radix select on the bits of |s|)
  pack_mask.py      pack_mask, unpack_mask
  masked_linear.py  masked_linear, multi_masked_linear and their backwards
  masked_conv2d.py  masked_conv2d, multi_masked_conv2d and their backwards (unfold + GEMM)
  ragged_masked_linear.py  ragged_masked_linear and its backward (each module on its own rows)
  ragged_masked_conv2d.py  ragged_masked_conv2d and its backward (per module, masked_conv2d.py)
"""
from . import (masked_conv2d, masked_linear, pack_mask, ragged_masked_conv2d,  # noqa: F401
               ragged_masked_linear, topk_mask)
from .utils import INTERPRET  # noqa: F401
