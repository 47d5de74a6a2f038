"""topk_mask / multi_topk_mask in Triton: exact top-k of |scores| written as packed int32 words.

For a non-negative float, the integer bit pattern orders like the value, so the threshold T (the
n_keep-th largest key) is found by a radix select on 8-bit digits of key = bits(|s|): the int32
bits of |s| as float32 for float32/float16/bfloat16 scores (exact: a half converts to float32
without rounding, so ties stay ties) in four histogram passes (bits 31..24, ..., 7..0), the int64
bits of the float64 |s| for float64 scores in eight passes (casting to float32 would merge
distinct scores into ties and change which are kept), each pass counting the digits of the keys
that match the prefix fixed so far. Every kernel re-derives (prefix, remaining count) from the stored
histograms (_threshold), so no separate select launch is needed. Then entries with key > T are
kept, and the first `need` entries with key == T in flat order (ties to the lower flat index):
one pass counts ties per block of words, the packing pass adds the counts of earlier blocks to an
in-block prefix sum.

Offsets and counts are int64 (a layer may hold more than 2^31 scores). NaN scores are rejected
through a device flag set by the first histogram pass, reported as nan_report.py describes (at
once on the CPU; by a later call, with no host sync, on a GPU unless MODSPLIT_NAN_CHECK=sync).

Shapes: scores float16/bfloat16/float32/float64 [K, O, ...] (K = 1 for topk_mask),
R = prod(...), n = O * R per module; packed int32 [K, O, ceil(R/32)].
"""
import math

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor

from modsplit.reference import keep_count, words_for
from . import nan_report
from .utils import INTERPRET, launcher, register_op

_DIGITS = 256


def _passes(dtype: torch.dtype) -> int:
    """Radix passes of 8 bits: 8 for the int64 keys of float64 scores, else 4."""
    return 8 if dtype == torch.float64 else 4


@triton.jit
def _keys(s_ptr, offs, valid, PASSES: tl.constexpr):
    """Bit patterns of |s| (ordered like |s|) at offs: int64 of float64 when PASSES == 8, else
    int32 of float32 (exact for float16/bfloat16)."""
    if PASSES == 8:
        s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float64)
        return tl.abs(s).to(tl.int64, bitcast=True)
    s = tl.load(s_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return tl.abs(s).to(tl.int32, bitcast=True)


@triton.jit
def _threshold(hist_ptr, n_keep, DONE: tl.constexpr, PASSES: tl.constexpr):
    """(prefix, remaining) after DONE of the PASSES radix passes of one module's histograms
    int64 [PASSES, 256]: prefix holds the top 8*DONE bits of T (int64); remaining (int64) is how
    many keys with that prefix are still to keep."""
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.int64)
    remaining = tl.full([], 0, tl.int64) + n_keep
    for p in tl.static_range(DONE):
        h = tl.load(hist_ptr + p * 256 + bins)
        at_least = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys whose digit >= bin
        digit = tl.max(tl.where(at_least >= remaining, bins, 0), 0).to(tl.int64)
        remaining -= tl.sum(tl.where(bins > digit, h, 0), 0)
        prefix = prefix | (digit << (8 * (PASSES - 1 - p)))
    return prefix, remaining


@triton.jit
def _topk_hist_kernel(s_ptr, hist_ptr, nan_ptr, n, n_keep, PASS: tl.constexpr,
                      PASSES: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Adds to hist[k, PASS, :] the histogram of digit PASS of the keys matching the prefix of
    the earlier passes; the first pass sets nan[0] when a key is NaN. Grid
    (cdiv(n, BLOCK * ITERS), K)."""
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    s_ptr += k * n
    hist_ptr += k * (PASSES * 256)
    prefix, _ = _threshold(hist_ptr, n_keep, PASS, PASSES)
    SHIFT: tl.constexpr = 8 * (PASSES - 1 - PASS)
    counts = tl.zeros([256], dtype=tl.int32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for it in range(ITERS):
        offs = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        key = _keys(s_ptr, offs, valid, PASSES)
        if PASS == 0:  # a NaN's bits exceed those of +inf
            if PASSES == 8:
                nan |= (valid & (key > 0x7FF0000000000000)).to(tl.int32)
            else:
                nan |= (valid & (key > 0x7F800000)).to(tl.int32)
        if PASS > 0:
            valid = valid & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)).to(key.dtype))
        counts += tl.histogram(((key >> SHIFT) & 255).to(tl.int32), 256, mask=valid)
    tl.atomic_add(hist_ptr + PASS * 256 + tl.arange(0, 256), counts.to(tl.int64))
    if PASS == 0:
        if tl.max(nan, 0) > 0:
            tl.atomic_or(nan_ptr, 1)


@triton.jit
def _word_tile(g, rows, words, cols):
    """Flat element offsets and validity of the [BW, 32] tile of words g (flat word indices of
    one module's [rows, words] mask), and the bit index of each column."""
    bit = tl.arange(0, 32)
    g = g.to(tl.int64)
    o = g // words
    col = (g % words)[:, None] * 32 + bit[None, :]
    valid = (g < rows * words)[:, None] & (col < cols)
    return o[:, None].to(tl.int64) * cols + col, valid, bit


@triton.jit
def _topk_ties_kernel(s_ptr, hist_ptr, ties_ptr, rows, words, cols, n_keep, n_blocks,
                      PASSES: tl.constexpr, BW: tl.constexpr):
    """ties[k, b] = number of keys equal to T in word block b. Grid (n_blocks, K)."""
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    s_ptr += k * rows * cols
    hist_ptr += k * (PASSES * 256)
    threshold, _ = _threshold(hist_ptr, n_keep, PASSES, PASSES)
    offs, valid, _ = _word_tile(pid * BW + tl.arange(0, BW), rows, words, cols)
    key = _keys(s_ptr, offs, valid, PASSES)
    tie = valid & (key == threshold.to(key.dtype))
    tl.store(ties_ptr + k * n_blocks + pid, tl.sum(tl.sum(tie.to(tl.int32), 1), 0))


@triton.jit
def _topk_pack_kernel(s_ptr, hist_ptr, ties_ptr, out_ptr, rows, words, cols, n_keep, n_blocks,
                      PASSES: tl.constexpr, BW: tl.constexpr, BP: tl.constexpr):
    """Writes the packed words of block pid: key > T, or key == T among the first `need` ties in
    flat order. Grid (n_blocks, K)."""
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    s_ptr += k * rows * cols
    hist_ptr += k * (PASSES * 256)
    ties_ptr += k * n_blocks
    threshold, need = _threshold(hist_ptr, n_keep, PASSES, PASSES)
    before = tl.full([], 0, tl.int64)  # ties in earlier blocks
    for b0 in range(0, pid, BP):
        b = b0 + tl.arange(0, BP)
        before += tl.sum(tl.load(ties_ptr + b, mask=b < pid, other=0).to(tl.int64), 0)
    g = pid * BW + tl.arange(0, BW)
    offs, valid, bit = _word_tile(g, rows, words, cols)
    key = _keys(s_ptr, offs, valid, PASSES)
    threshold = threshold.to(key.dtype)
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
    passes = _passes(s.dtype)
    hist = torch.zeros((lead, passes, _DIGITS), dtype=torch.int64, device=scores.device)
    fake = isinstance(s, FakeTensor)  # shape propagation / tracing: no report
    nan = torch.zeros(1, dtype=torch.int32, device=s.device) if fake else \
        nan_report.flag_for(s.device)
    block = 4096 if INTERPRET else 2048
    iters = 1 if INTERPRET else min(16, triton.next_power_of_2(triton.cdiv(n, block * 64)))
    grid = (triton.cdiv(n, block * iters), lead)
    for p in range(passes):
        launcher(_topk_hist_kernel)[grid](s, hist, nan, n, n_keep, PASS=p, PASSES=passes,
                                          BLOCK=block, ITERS=iters)
    bw = 128 if INTERPRET else 64  # words per block: 32 * bw keys
    n_blocks = triton.cdiv(rows * words, bw)
    ties = torch.empty((lead, n_blocks), dtype=torch.int32, device=scores.device)
    grid = (n_blocks, lead)
    launcher(_topk_ties_kernel)[grid](s, hist, ties, rows, words, cols, n_keep, n_blocks,
                                      PASSES=passes, BW=bw)
    launcher(_topk_pack_kernel)[grid](s, hist, ties, out, rows, words, cols, n_keep, n_blocks,
                                      PASSES=passes, BW=bw, BP=1024)
    if not fake:
        nan_report.after_launch(s.device, nan)
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
