"""Multi-module masked layers: K supermasks over one frozen nn.Linear / nn.Conv2d weight.

Activations carry the module dim folded into the batch dim: a layer receives [K*B, ...] (module k
owns rows k*B .. k*B+B-1), views it as [K, B, ...], runs the fused multi-module op and folds the
result back to [K*B, ...]. Everything between masked layers (BatchNorm, pooling, activations,
skip connections, flatten) therefore runs untouched on the folded batch.
Shared input: while `shared_rows` is B (MultiModuleNet.forward sets it for the duration of a
pass), a layer that receives [B, ...] instead of [K*B, ...] takes it as the input every module
shares (the network's input, before any masked layer): the op reads it once (one GEMM / one conv
over all K modules' weights, no K-fold copy) and the layer returns the folded [K*B, ...].
Ragged rows: while `ragged_offsets` is set (int64 [K+1], MultiModuleNet.forward_ragged), module k
owns rows offsets[k] .. offsets[k+1] - 1 of a [T, ...] input, which runs through the ragged ops
(ops.ragged_masked_linear / ragged_masked_conv2d: each module on its own rows, no padding).

Each layer holds
  weight, bias   the trained tensors, frozen (parameters with requires_grad=False, so the layer's
                 state_dict keys match the dense layer's);
  scores         float nn.Parameter [K, *weight.shape] while the masks are being learned; the
                 mask of module k is multi_topk_mask(scores, density)[k] (top |score| per layer);
  fixed_masks    int32 buffer [K, O, ceil(R/32)] instead of scores once freeze_masks() was called
                 (a decomposed bank keeps packed masks only).
`active` (None or a list of module indices) restricts the forward pass to those modules; the
input then holds len(active) folded copies.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from modsplit import functional as MF
from modsplit import ops


def _kaiming_std(weight: torch.Tensor) -> float:
    """Kaiming-normal std (ReLU gain) for the fan-in of weight [O, ...]."""
    return math.sqrt(2.0) / math.sqrt(weight[0].numel())


def init_scores(weight: torch.Tensor, n_modules: int, shared_init: bool = True,
                generator: torch.Generator = None) -> torch.Tensor:
    """Kaiming-normal (ReLU gain, fan_in of weight) scores float [n_modules, *weight.shape].
    shared_init: every module starts from the same draw (initial score sharing)."""
    draws = 1 if shared_init else n_modules
    s = torch.randn((draws, *weight.shape), generator=generator, dtype=weight.dtype) * \
        _kaiming_std(weight)
    return s.expand(n_modules, *weight.shape).clone().to(weight.device)


SCORE_INITS = ("kaiming", "magnitude")


def magnitude_scores(weight: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """Scores float [K, *weight.shape] whose top-|score| masks start as (nearly) the layer's
    top-|W| weights, a magnitude-pruned subnetwork: |W| rescaled to the Kaiming score scale
    (init_scores' std), plus 1% of `draw` (init_scores' scores, [K, *weight.shape]) to break
    ties and, without shared_init, to tell the modules apart."""
    w = weight.detach().abs()
    return (w / w.std().clamp_min(1e-12) * _kaiming_std(weight)).unsqueeze(0) + 0.01 * draw


class _MaskedMixin:
    """Score / mask bookkeeping shared by MaskedLinear and MaskedConv2d."""

    def _setup_masking(self, n_modules: int, density: float, shared_init: bool, generator):
        if n_modules < 1:
            raise ValueError(f"modsplit: n_modules must be >= 1, got {n_modules}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"modsplit: density must be in (0, 1], got {density}")
        self.n_modules, self.density, self.active = int(n_modules), float(density), None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scores = nn.Parameter(init_scores(self.weight.detach(), n_modules, shared_init,
                                               generator))
        self.register_buffer("fixed_masks", None)
        self._mask_cache = None
        self.shared_rows = None
        self.ragged_offsets = None

    @classmethod
    def from_dense(cls, layer, n_modules: int, density: float, shared_init: bool = True,
                   generator: torch.Generator = None, score_init: str = "kaiming"):
        """A masked copy of a trained dense layer (weight and bias copied, then frozen).
        score_init: "kaiming" (init_scores) or "magnitude" (magnitude_scores of the copied
        weight, over the same draw)."""
        if score_init not in SCORE_INITS:
            raise ValueError(f"modsplit: score_init must be one of {SCORE_INITS}, got "
                             f"{score_init!r}")
        new = cls._empty_like(layer, n_modules, density, shared_init, generator)
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
            if score_init == "magnitude":
                new.scores.copy_(magnitude_scores(new.weight, new.scores))
        return new

    def masks(self) -> torch.Tensor:
        """Packed masks int32 [K, O, ceil(R/32)] of all K modules. Cached while the scores are
        unchanged (keyed on the scores' storage and version counter)."""
        if self.fixed_masks is not None:
            return self.fixed_masks
        key = (self.scores.data_ptr(), self.scores._version, self.density)
        if self._mask_cache is None or self._mask_cache[0] != key:
            self._mask_cache = (key, ops.multi_topk_mask(self.scores.detach(), self.density))
        return self._mask_cache[1]

    def cache_masks(self, packed: torch.Tensor):
        """Adopt packed int32 [K, O, ceil(R/32)], computed elsewhere as the top-k masks of the
        current scores (CoTrainSGD.next_masks), as masks() until the scores change."""
        self._mask_cache = ((self.scores.data_ptr(), self.scores._version, self.density), packed)

    def freeze_masks(self, packed: torch.Tensor = None):
        """Replace the scores by fixed packed masks int32 [K, O, ceil(R/32)] (default: the
        current top-k masks). The layer then has no trainable tensor."""
        packed = self.masks() if packed is None else packed
        expected = (self.n_modules, self.weight.shape[0],
                    (self.weight[0].numel() + 31) // 32)
        if tuple(packed.shape) != expected or packed.dtype != torch.int32:
            raise ValueError(f"modsplit: masks must be int32 {expected}, got {packed.dtype} "
                             f"{tuple(packed.shape)}")
        self.register_parameter("scores", None)
        self.fixed_masks = packed.to(self.weight.device).contiguous()
        self._mask_cache = None

    def _selected(self):
        """(scores or None, packed) of the active modules."""
        packed, scores = self.masks(), self.scores
        if self.active is not None:
            idx = torch.as_tensor(self.active, dtype=torch.long, device=packed.device)
            packed = packed.index_select(0, idx)
            scores = None if scores is None else scores.index_select(0, idx)
        return scores, packed

    def _unfold(self, x, k):
        """(x viewed as [K, B, ...], False), or (x, True) for a shared input [B, ...]."""
        shared_rows = getattr(self, "shared_rows", None)  # absent in layers pickled before it
        if k > 1 and shared_rows is not None and x.shape[0] == shared_rows:
            return x, True
        if x.shape[0] % k:
            raise ValueError(f"modsplit: {type(self).__name__} expects the batch dim to hold {k} "
                             f"folded module copies, got batch {x.shape[0]}")
        return x.reshape(k, x.shape[0] // k, *x.shape[1:]), False

    def _ragged(self, k):
        """The ragged row offsets int64 [K+1] in force, or None."""
        offsets = getattr(self, "ragged_offsets", None)  # absent in layers pickled before it
        if offsets is not None and offsets.shape != (k + 1,):
            raise ValueError(f"modsplit: {type(self).__name__} holds {k} active modules, but "
                             f"ragged_offsets has shape {tuple(offsets.shape)}")
        return offsets

    def extra_repr(self):
        return f"{super().extra_repr()}, n_modules={self.n_modules}, density={self.density}"


class MaskedLinear(_MaskedMixin, nn.Linear):
    """nn.Linear with K learnable supermasks. Input [K*B, *, in_features] (module-folded batch)
    -> [K*B, *, out_features]; K = n_modules, or len(active) when a subset is active."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 n_modules: int, density: float, shared_init: bool = True,
                 generator: torch.Generator = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._setup_masking(n_modules, density, shared_init, generator)

    @classmethod
    def _empty_like(cls, layer, n_modules, density, shared_init, generator):
        return cls(layer.in_features, layer.out_features, layer.bias is not None,
                   layer.weight.device, layer.weight.dtype, n_modules=n_modules, density=density,
                   shared_init=shared_init, generator=generator)

    def forward(self, x):
        scores, packed = self._selected()
        offsets = self._ragged(packed.shape[0])
        if offsets is not None:
            return self._forward_ragged(x, scores, packed, offsets)
        xk, shared = self._unfold(x, packed.shape[0])
        if scores is None:
            y = ops.multi_masked_linear(xk, self.weight, packed, self.bias, shared)
        else:
            y = MF.multi_masked_linear(xk, self.weight, scores, packed, self.bias, shared)
        return y.reshape(-1, *y.shape[2:])

    def _forward_ragged(self, x, scores, packed, offsets):
        """x [T, *, I] -> [T, *, O]: the rows of x[t] (all of its * positions) are module k's
        for offsets[k] <= t < offsets[k+1]."""
        h, off = x.reshape(-1, x.shape[-1]), offsets * math.prod(x.shape[1:-1])
        if scores is None:
            y = ops.ragged_masked_linear(h, self.weight, packed, off, None, self.bias)
        else:
            y = MF.ragged_masked_linear(h, self.weight, scores, packed, off, None, self.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """nn.Conv2d with K learnable supermasks. Input [K*B, C, H, W] (module-folded batch)
    -> [K*B, O, Ho, Wo]. Non-zero padding modes and string paddings are applied by F.pad."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 n_modules: int, density: float, shared_init: bool = True,
                 generator: torch.Generator = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        self._setup_masking(n_modules, density, shared_init, generator)

    @classmethod
    def _empty_like(cls, layer, n_modules, density, shared_init, generator):
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                   layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                   layer.padding_mode, layer.weight.device, layer.weight.dtype,
                   n_modules=n_modules, density=density, shared_init=shared_init,
                   generator=generator)

    def _padded(self, x):
        """(input, padding passed to the op): explicit F.pad for non-zero modes and 'same'."""
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return x, self.padding
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._reversed_padding_repeated_twice, mode=mode), (0, 0)

    def forward(self, x):
        scores, packed = self._selected()
        x, padding = self._padded(x)
        args = (self.bias, self.stride, padding, self.dilation, self.groups)
        offsets = self._ragged(packed.shape[0])
        if offsets is not None:  # x [T, C, H, W] -> [T, O, Ho, Wo]
            if scores is None:
                return ops.ragged_masked_conv2d(x, self.weight, packed, offsets, None, *args)
            return MF.ragged_masked_conv2d(x, self.weight, scores, packed, offsets, None, *args)
        xk, _ = self._unfold(x, packed.shape[0])  # the op takes a 4-d x as shared
        if scores is None:
            y = ops.multi_masked_conv2d(xk, self.weight, packed, *args)
        else:
            y = MF.multi_masked_conv2d(xk, self.weight, scores, packed, *args)
        return y.reshape(-1, *y.shape[2:])
