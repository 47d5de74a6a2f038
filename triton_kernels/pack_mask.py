"""pack_mask / unpack_mask in Triton.

pack_mask: bool [lead..., rest...] -> int32 [lead..., ceil(R/32)], R = prod(rest); bit j (LSB
first) of word w of a row is column 32*w + j; padding bits 0. unpack_mask is its inverse.
"""
import math

import torch
import triton
import triton.language as tl

from modsplit.reference import words_for
from .utils import INTERPRET, launcher, register_op


@triton.jit
def _pack_kernel(mask_ptr, out_ptr, rows, words, cols, BW: tl.constexpr):
    """mask uint8 [rows, cols] (0/1) -> out int32 [rows, words]; BW words per program."""
    g = tl.program_id(0) * BW + tl.arange(0, BW)
    bit = tl.arange(0, 32)
    col = (g % words)[:, None] * 32 + bit[None, :]
    valid = (g < rows * words)[:, None] & (col < cols)
    offs = (g // words)[:, None].to(tl.int64) * cols + col
    m = tl.load(mask_ptr + offs, mask=valid, other=0)
    packed = tl.sum((m != 0).to(tl.int32) << bit[None, :], 1)
    tl.store(out_ptr + g, packed, mask=g < rows * words)


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, total, words, cols, BLOCK: tl.constexpr):
    """packed int32 [rows, words] -> out uint8 [rows, cols] (0/1), total = rows * cols."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = e < total
    row = e // cols
    col = e % cols
    word = tl.load(packed_ptr + row * words + col // 32, mask=valid, other=0)
    tl.store(out_ptr + e, ((word >> (col % 32).to(tl.int32)) & 1).to(tl.uint8), mask=valid)


@register_op("modsplit_triton::pack_mask", "(Tensor mask, int batch_dims=0) -> Tensor")
def pack_mask(mask: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """bool [lead..., rest...] with lead = batch_dims + 1 dims -> int32 [lead..., ceil(R/32)]."""
    if mask.dim() < batch_dims + 2:
        raise ValueError(f"modsplit: mask must have at least {batch_dims + 2} dims, got shape "
                         f"{tuple(mask.shape)}")
    lead = mask.shape[: batch_dims + 1]
    rows, cols = math.prod(lead), math.prod(mask.shape[batch_dims + 1:])
    words = words_for(cols)
    m = (mask if mask.dtype == torch.bool else mask != 0).reshape(rows, cols).contiguous()
    out = torch.empty((*lead, words), dtype=torch.int32, device=mask.device)
    bw = 128 if INTERPRET else 32
    if rows * words:
        launcher(_pack_kernel)[(triton.cdiv(rows * words, bw),)](
            m.view(torch.uint8), out, rows, words, cols, BW=bw)
    return out


@register_op("modsplit_triton::unpack_mask", "(Tensor packed, SymInt[] shape) -> Tensor")
def unpack_mask(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """int32 [lead..., words] -> bool tensor of `shape` (shape starts with packed's lead dims)."""
    shape = list(shape)
    lead = packed.dim() - 1
    if list(packed.shape[:lead]) != shape[:lead]:
        raise ValueError(f"modsplit: shape {shape} must start with packed's lead dims "
                         f"{list(packed.shape[:lead])}")
    cols = math.prod(shape[lead:])
    out = torch.empty(shape, dtype=torch.uint8, device=packed.device)
    total = out.numel()
    block = 8192 if INTERPRET else 1024
    if total:
        launcher(_unpack_kernel)[(triton.cdiv(total, block),)](
            packed.contiguous(), out, total, packed.shape[-1], cols, BLOCK=block)
    return out.view(torch.bool)
