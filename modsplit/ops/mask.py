"""Mask ops: topk_mask, multi_topk_mask, pack_mask, unpack_mask (non-differentiable)."""
import math

import torch

from modsplit.backend import ops_for
from modsplit.reference import words_for


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """scores float [O, ...] -> packed int32 [O, ceil(R/32)]: the max(1, round(density*n)) largest
    |scores| of the layer, ties to the lower flat index. 0 < density <= 1."""
    return ops_for(scores).topk_mask(scores, float(density))


def multi_topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """scores float [K, O, ...] -> packed int32 [K, O, ceil(R/32)], one selection per module."""
    return ops_for(scores).multi_topk_mask(scores, float(density))


def pack_mask(mask: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """bool [lead..., rest...] with lead = batch_dims + 1 dims -> int32 [lead..., ceil(R/32)]."""
    return ops_for(mask).pack_mask(mask, batch_dims)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """int32 [lead..., words] -> bool tensor of `shape` (shape starts with packed's lead dims)."""
    return ops_for(packed).unpack_mask(packed, list(shape))


def _packed_shape(scores, lead_dims):
    if scores.dim() < lead_dims + 2:
        raise ValueError(f"modsplit: scores must have at least {lead_dims + 2} dims, got shape "
                         f"{tuple(scores.shape)}")
    lead = scores.shape[: lead_dims + 1]
    return (*lead, words_for(math.prod(scores.shape[lead_dims + 1:])))


@torch.library.register_fake("modsplit::topk_mask")
def _topk_mask_fake(scores, density):
    return scores.new_empty(_packed_shape(scores, 0), dtype=torch.int32)


@torch.library.register_fake("modsplit::multi_topk_mask")
def _multi_topk_mask_fake(scores, density):
    return scores.new_empty(_packed_shape(scores, 1), dtype=torch.int32)


@torch.library.register_fake("modsplit::pack_mask")
def _pack_mask_fake(mask, batch_dims=0):
    return mask.new_empty(_packed_shape(mask, batch_dims), dtype=torch.int32)


@torch.library.register_fake("modsplit::unpack_mask")
def _unpack_mask_fake(packed, shape):
    return packed.new_empty(shape, dtype=torch.bool)
