"""topk_mask / multi_topk_mask in Triton: exact top-k of |scores| written as packed int32 words.

For a non-negative float, the int32 bit pattern orders like the value, so the threshold T (the
n_keep-th largest key) is found by a radix select on 8-bit digits of key = bits(|s|): four
histogram passes (bits 31..24, 23..16, 15..8, 7..0), each counting the digits of the keys that
match the prefix fixed so far. Every kernel re-derives (prefix, remaining count) from the stored
histograms (_threshold), so no separate select launch is needed. Then entries with key > T are
kept, and the first `need` entries with key == T in flat order (ties to the lower flat index):
one pass counts ties per block of words, the packing pass adds the counts of earlier blocks to an
in-block prefix sum.

Shapes: scores float32/float16/bfloat16 [K, O, ...] (K = 1 for topk_mask), R = prod(...),
n = O * R per module; packed int32 [K, O, ceil(R/32)].
"""
import math

import torch
import triton
import triton.language as tl

from modsplit.reference import keep_count, words_for
from .utils import INTERPRET, launcher, register_op

_DIGITS = 256
_PASSES = 4


@triton.jit
def _keys(s_ptr, offs, valid):
    """int32 bit patterns of |s| (ordered like |s|) at offs."""
    s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return tl.abs(s).to(tl.int32, bitcast=True)


@triton.jit
def _threshold(hist_ptr, n_keep, PASSES: tl.constexpr):
    """(prefix, remaining) after PASSES radix passes of one module's histograms int32 [4, 256]:
    prefix holds the top 8*PASSES bits of T; remaining is how many keys with that prefix are
    still to keep."""
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.int32)
    remaining = tl.full([], 0, tl.int32) + n_keep
    for p in tl.static_range(PASSES):
        h = tl.load(hist_ptr + p * 256 + bins)
        at_least = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys whose digit >= bin
        digit = tl.max(tl.where(at_least >= remaining, bins, 0), 0)
        remaining -= tl.sum(tl.where(bins > digit, h, 0), 0)
        prefix = prefix | (digit << (24 - 8 * p))
    return prefix, remaining


@triton.jit
def _topk_hist_kernel(s_ptr, hist_ptr, n, n_keep, PASS: tl.constexpr, BLOCK: tl.constexpr,
                      ITERS: tl.constexpr):
    """Adds to hist[k, PASS, :] the histogram of digit PASS of the keys matching the prefix of
    the earlier passes. Grid (cdiv(n, BLOCK * ITERS), K)."""
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    s_ptr += k * n
    hist_ptr += k * (4 * 256)
    prefix, _ = _threshold(hist_ptr, n_keep, PASS)
    SHIFT: tl.constexpr = 24 - 8 * PASS
    counts = tl.zeros([256], dtype=tl.int32)
    for it in range(ITERS):
        offs = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        key = _keys(s_ptr, offs, valid)
        if PASS > 0:
            valid = valid & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        counts += tl.histogram((key >> SHIFT) & 255, 256, mask=valid)
    tl.atomic_add(hist_ptr + PASS * 256 + tl.arange(0, 256), counts)


@triton.jit
def _word_tile(g, rows, words, cols):
    """Flat element offsets and validity of the [BW, 32] tile of words g (flat word indices of
    one module's [rows, words] mask), and the bit index of each column."""
    bit = tl.arange(0, 32)
    o = g // words
    col = (g % words)[:, None] * 32 + bit[None, :]
    valid = (g < rows * words)[:, None] & (col < cols)
    return o[:, None].to(tl.int64) * cols + col, valid, bit


@triton.jit
def _topk_ties_kernel(s_ptr, hist_ptr, ties_ptr, rows, words, cols, n_keep, n_blocks,
                      BW: tl.constexpr):
    """ties[k, b] = number of keys equal to T in word block b. Grid (n_blocks, K)."""
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    s_ptr += k * rows * cols
    hist_ptr += k * (4 * 256)
    threshold, _ = _threshold(hist_ptr, n_keep, 4)
    offs, valid, _ = _word_tile(pid * BW + tl.arange(0, BW), rows, words, cols)
    key = _keys(s_ptr, offs, valid)
    tie = valid & (key == threshold)
    tl.store(ties_ptr + k * n_blocks + pid, tl.sum(tl.sum(tie.to(tl.int32), 1), 0))


@triton.jit
def _topk_pack_kernel(s_ptr, hist_ptr, ties_ptr, out_ptr, rows, words, cols, n_keep, n_blocks,
                      BW: tl.constexpr, BP: tl.constexpr):
    """Writes the packed words of block pid: key > T, or key == T among the first `need` ties in
    flat order. Grid (n_blocks, K)."""
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    s_ptr += k * rows * cols
    hist_ptr += k * (4 * 256)
    ties_ptr += k * n_blocks
    threshold, need = _threshold(hist_ptr, n_keep, 4)
    before = tl.full([], 0, tl.int32)  # ties in earlier blocks
    for b0 in range(0, pid, BP):
        b = b0 + tl.arange(0, BP)
        before += tl.sum(tl.load(ties_ptr + b, mask=b < pid, other=0), 0)
    g = pid * BW + tl.arange(0, BW)
    offs, valid, bit = _word_tile(g, rows, words, cols)
    key = _keys(s_ptr, offs, valid)
    tie = (valid & (key == threshold)).to(tl.int32)
    flat_tie = tl.reshape(tie, [BW * 32])
    rank = tl.reshape(tl.cumsum(flat_tie, 0) - flat_tie, [BW, 32])  # ties before, in block
    keep = valid & ((key > threshold) | ((tie != 0) & (before + rank < need)))
    packed = tl.sum(keep.to(tl.int32) << bit[None, :], 1)
    tl.store(out_ptr + k * rows * words + g, packed, mask=g < rows * words)


def _launch(scores: torch.Tensor, density: float, lead: int) -> torch.Tensor:
    """scores [K, O, ...] (lead = K, or 1 for a single layer) -> packed int32 [K, O, words]."""
    rows = scores.shape[1]
    cols = math.prod(scores.shape[2:])
    words = words_for(cols)
    n = rows * cols
    s = scores.detach().reshape(lead, n).contiguous()
    out = torch.empty((lead, rows, words), dtype=torch.int32, device=scores.device)
    if lead == 0 or n == 0:
        return out
    n_keep = keep_count(density, n)
    hist = torch.zeros((lead, _PASSES, _DIGITS), dtype=torch.int32, device=scores.device)
    block = 4096 if INTERPRET else 2048
    iters = 1 if INTERPRET else min(16, triton.next_power_of_2(triton.cdiv(n, block * 64)))
    grid = (triton.cdiv(n, block * iters), lead)
    for p in range(_PASSES):
        launcher(_topk_hist_kernel)[grid](s, hist, n, n_keep, PASS=p, BLOCK=block,
                                             ITERS=iters)
    bw = 128 if INTERPRET else 64  # words per block: 32 * bw keys
    n_blocks = triton.cdiv(rows * words, bw)
    ties = torch.empty((lead, n_blocks), dtype=torch.int32, device=scores.device)
    grid = (n_blocks, lead)
    launcher(_topk_ties_kernel)[grid](s, hist, ties, rows, words, cols, n_keep, n_blocks, BW=bw)
    launcher(_topk_pack_kernel)[grid](s, hist, ties, out, rows, words, cols, n_keep, n_blocks,
                                         BW=bw, BP=1024)
    return out


@register_op("modsplit_triton::topk_mask", "(Tensor scores, float density) -> Tensor")
def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """scores float [O, ...] -> packed int32 [O, ceil(R/32)]: the keep_count(density, n) largest
    |scores|, ties to the lower flat index."""
    if scores.dim() < 2:
        raise ValueError(f"modsplit: scores must have at least 2 dims, got {tuple(scores.shape)}")
    return _launch(scores.unsqueeze(0), density, 1)[0]


@register_op("modsplit_triton::multi_topk_mask", "(Tensor scores, float density) -> Tensor")
def multi_topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """scores float [K, O, ...] -> packed int32 [K, O, ceil(R/32)], one selection per module."""
    if scores.dim() < 3:
        raise ValueError(f"modsplit: scores must have at least 3 dims, got {tuple(scores.shape)}")
    return _launch(scores, density, scores.shape[0])
