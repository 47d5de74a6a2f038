"""export_composed(): a ComposedModel -> a plain nn.Module holding only the union subnetwork.

What the export guarantees:
  * only standard torch ops (no modsplit op, no compiled extension);
  * each masked layer keeps the union of the chosen modules' masks: weights outside it are
    zero; each module still runs with its own mask, W * M_k, held as a bool buffer (the union
    alone would change the modules' outputs), so predictions equal the composed model's (up to
    float rounding in near-ties);
  * every per-module BatchNorm (modsplit.module_norm.ModuleBatchNorm) becomes a
    PlainModuleBatchNorm holding only the chosen modules' eval affine maps (module k's rows:
    x * scale[k] + shift[k]); one that reads the network's input (before any masked layer) gets
    that input repeated for every module, so each module uses its own statistics, where the
    composed model, reading it once, uses the first chosen module's: they agree when the
    modules' statistics of that layer do;
  * in every nn.Sequential, the hidden units between two Linear layers separated only by
    elementwise modules and eval BatchNorm1d layers over those units (nn.BatchNorm1d with
    running statistics, or a PlainModuleBatchNorm) are removed when no chosen module uses their
    outgoing edges, or when they have no incoming edge (their constant output, per module, is
    folded into the next layer's per-module bias); the BatchNorms lose the same units. Conv
    channels are not removed: conv weights are only zeroed.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from modsplit import ops
from modsplit.voting import ClassVoter
from modsplit.convert import repeat_folded
from modsplit.layers import MaskedConv2d, MaskedLinear
from modsplit.module_norm import ModuleBatchNorm

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout)


def _module_masks(layer, modules):
    """bool [len(modules), *weight.shape] masks of the chosen modules of a masked layer."""
    packed = layer.masks()[torch.as_tensor(modules, dtype=torch.long, device=layer.weight.device)]
    return ops.unpack_mask(packed, (len(modules), *layer.weight.shape))


class PlainMultiLinear(nn.Module):
    """K modules' linear layers in plain torch: module k computes x_k (W * M_k)^T + b_k.
    weight float [O, I] (zero outside the union of the masks), masks bool buffer [K, O, I],
    bias float [K, O] or None. Input [K*B, *, I] (module-folded batch) -> [K*B, *, O]."""

    def __init__(self, weight, masks, bias):
        super().__init__()
        self.weight = nn.Parameter(weight * masks.any(0), requires_grad=False)
        self.register_buffer("masks", masks)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        k = self.masks.shape[0]
        w = self.weight * self.masks
        y = torch.bmm(x.reshape(k, -1, x.shape[-1]), w.transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        return y.reshape(*x.shape[:-1], w.shape[1])

    def extra_repr(self):
        k, o, i = self.masks.shape
        return f"modules={k}, in_features={i}, out_features={o}, bias={self.bias is not None}"

    def keep_units(self, rows=None, cols=None):
        """Keep only the output units `rows` / input features `cols` (bool [O] / [I])."""
        w, m, b = self.weight.data, self.masks, None if self.bias is None else self.bias.data
        if rows is not None:
            w, m, b = w[rows], m[:, rows], None if b is None else b[:, rows]
        if cols is not None:
            w, m = w[:, cols], m[:, :, cols]
        self.weight = nn.Parameter(w, requires_grad=False)
        self.masks = m
        if b is not None:
            self.bias = nn.Parameter(b, requires_grad=False)


class PlainMultiConv2d(nn.Module):
    """K modules' conv2d in plain torch, run as one grouped convolution over the modules.
    weight float [O, C/g, kh, kw] (zero outside the union), masks bool buffer [K, *weight.shape],
    bias [O] or None. Input [K*B, C, H, W] -> [K*B, O, Ho, Wo]."""

    def __init__(self, layer: MaskedConv2d, masks):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach() * masks.any(0), requires_grad=False)
        self.register_buffer("masks", masks)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(),
                                                                 requires_grad=False)
        self.stride, self.dilation, self.groups = layer.stride, layer.dilation, layer.groups
        explicit = layer.padding_mode != "zeros" or isinstance(layer.padding, str)
        self.pre_pad = tuple(layer._reversed_padding_repeated_twice) if explicit else None
        self.pad_mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        self.padding = (0, 0) if explicit else layer.padding

    def extra_repr(self):
        return (f"modules={self.masks.shape[0]}, weight={tuple(self.weight.shape)}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")

    def forward(self, x):
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        k, o = self.masks.shape[0], self.weight.shape[0]
        b = x.shape[0] // k
        xs = x.reshape(k, b, *x.shape[1:]).transpose(0, 1).reshape(b, -1, *x.shape[2:])
        w = (self.weight * self.masks).reshape(k * o, *self.weight.shape[1:])
        bias = None if self.bias is None else self.bias.repeat(k)
        y = F.conv2d(xs, w, bias, self.stride, self.padding, self.dilation, self.groups * k)
        return y.reshape(b, k, o, *y.shape[2:]).transpose(0, 1).reshape(k * b, o, *y.shape[2:])


class PlainModuleBatchNorm(nn.Module):
    """K modules' eval BatchNorms in plain torch: module k's rows of the module-folded batch
    [K*B, C, *] (viewed as [K, B, C, *]) become x * scale[k] + shift[k].
    scale, shift float buffers [K, C]; spatial: True for a BatchNorm2d (input [K*B, C, H, W]),
    False for a BatchNorm1d (input [K*B, C] or [K*B, C, L]). forward(x) -> same shape."""

    def __init__(self, num_features: int, n_modules: int, spatial: bool = True):
        super().__init__()
        if n_modules < 1 or num_features < 1:
            raise ValueError(f"modsplit: n_modules and num_features must be >= 1, got "
                             f"{n_modules} and {num_features}")
        self.num_features, self.n_modules = int(num_features), int(n_modules)
        self.spatial = bool(spatial)
        self.register_buffer("scale", torch.ones(self.n_modules, self.num_features))
        self.register_buffer("shift", torch.zeros(self.n_modules, self.num_features))

    @classmethod
    def from_module_norm(cls, norm: ModuleBatchNorm, modules) -> "PlainModuleBatchNorm":
        """The eval affine maps (ModuleBatchNorm.module_affine) of the listed modules of
        `norm`, in that order."""
        scale, shift = norm.module_affine(modules)
        new = cls(norm.num_features, scale.shape[0], norm.spatial)
        new.scale, new.shift = scale.clone(), shift.clone()
        return new

    def forward(self, x):
        k, c = self.scale.shape
        xk = x.reshape(k, -1, *x.shape[1:])
        shape = (k, 1, c, *[1] * (x.dim() - 2))
        return torch.addcmul(self.shift.reshape(shape), xk, self.scale.reshape(shape)).reshape(
            x.shape)

    def keep_units(self, keep):
        """Keep only the channels `keep` (bool [C])."""
        self.scale, self.shift = self.scale[:, keep], self.shift[:, keep]
        self.num_features = int(keep.sum())

    def extra_repr(self):
        return (f"{self.num_features}, modules={self.n_modules}, "
                f"{'2d' if self.spatial else '1d'}")


def _plain(layer, modules):
    if isinstance(layer, ModuleBatchNorm):
        return PlainModuleBatchNorm.from_module_norm(layer, modules)
    masks = _module_masks(layer, modules)
    if isinstance(layer, MaskedLinear):
        bias = None if layer.bias is None else layer.bias.detach().expand(len(modules), -1)
        return PlainMultiLinear(layer.weight.detach().clone(), masks,
                                None if bias is None else bias.clone())
    return PlainMultiConv2d(layer, masks)


def _prune_pair(a: PlainMultiLinear, between, b: PlainMultiLinear) -> bool:
    """Remove the hidden units between a and b that no module uses; True if any was removed."""
    feeds = b.masks.any(0).any(0)  # unit has an outgoing edge in the union
    fed = a.masks.any(0).any(1)    # unit has an incoming edge in the union
    constant = feeds & ~fed
    if constant.any():  # unit outputs between(bias) whatever the input: fold it into b's bias
        h = torch.zeros_like(a.masks[:, :, 0], dtype=a.weight.dtype)
        if a.bias is not None:
            h = a.bias.detach().clone()
        for m in between:
            h = m(h)
        shift = torch.einsum("koi,ki->ko", (b.weight * b.masks)[:, :, constant], h[:, constant])
        bias = shift if b.bias is None else b.bias.detach() + shift
        b.bias = nn.Parameter(bias, requires_grad=False)
    keep = fed & feeds
    if keep.all():
        return False
    a.keep_units(rows=keep)
    for m in between:
        if not isinstance(m, _ELEMENTWISE):
            _cut_norm(m, keep)
    b.keep_units(cols=keep)
    return True


def _unit_norm(m, units: int) -> bool:
    """True for an eval BatchNorm1d over `units` hidden units: an nn.BatchNorm1d with running
    statistics or a 1d PlainModuleBatchNorm (each unit is mapped on its own)."""
    if isinstance(m, PlainModuleBatchNorm):
        return not m.spatial and m.num_features == units
    return (isinstance(m, nn.BatchNorm1d) and m.running_mean is not None
            and m.num_features == units)


def _cut_norm(m, keep):
    """Keep only the units `keep` (bool [C]) of a _unit_norm BatchNorm, in place."""
    if isinstance(m, PlainModuleBatchNorm):
        m.keep_units(keep)
        return
    for name, p in list(m.named_parameters(recurse=False)):
        setattr(m, name, nn.Parameter(p.detach()[keep], requires_grad=p.requires_grad))
    m.running_mean, m.running_var = m.running_mean[keep], m.running_var[keep]
    m.num_features = int(keep.sum())


def _prune_sequential(seq: nn.Sequential):
    layers = list(seq)
    pairs = []
    for i, a in enumerate(layers):
        if not isinstance(a, PlainMultiLinear):
            continue
        units = a.weight.shape[0]
        nxt = next((j for j in range(i + 1, len(layers))
                    if not (isinstance(layers[j], _ELEMENTWISE)
                            or _unit_norm(layers[j], units))), None)
        if nxt is not None and isinstance(layers[nxt], PlainMultiLinear):
            pairs.append((a, layers[i + 1:nxt], layers[nxt]))
    while any([_prune_pair(*pair) for pair in pairs]):
        pass


class ExportedModel(ClassVoter):
    """The exported composition: forward(x [B, ...]) -> positive confidences [B, len(classes)],
    predict(x) -> class ids int64 [B]; plain torch only. See the module docstring."""

    def __init__(self, net: nn.Module, grafts, classes):
        super().__init__()
        self.net, self.grafts, self.classes = net, grafts, tuple(classes)
        self.register_buffer("class_ids", torch.tensor(self.classes, dtype=torch.long))

    def forward(self, x):
        k = len(self.classes)
        logits = self.net(repeat_folded(x, k))
        logits = logits.reshape(k, x.shape[0], *logits.shape[1:])
        return self.grafts.confidence(logits).T

    def num_parameters(self) -> int:
        """Union edges of the masked layers (non-zero mask entries of the union), their biases
        (O, or K*O once folding made them differ per module), the per-module BatchNorms' scale
        and shift (2*K*C), every other parameter, and the grafts."""
        total = 0
        for m in self.modules():
            if isinstance(m, PlainModuleBatchNorm):
                total += m.scale.numel() + m.shift.numel()
            elif isinstance(m, (PlainMultiLinear, PlainMultiConv2d)):
                total += int(m.masks.any(0).sum())
                if m.bias is not None:
                    same = m.bias.dim() == 1 or bool((m.bias == m.bias[0]).all())
                    total += m.bias.shape[-1] if same else m.bias.numel()
            else:
                total += sum(p.numel() for p in m.parameters(recurse=False))
        return total


def export_composed(composed) -> ExportedModel:
    """A ComposedModel -> ExportedModel (see the module docstring for what is guaranteed)."""
    net = copy.deepcopy(composed.net.net).eval()
    for name, layer in list(net.named_modules()):
        if isinstance(layer, (MaskedLinear, MaskedConv2d, ModuleBatchNorm)):
            plain = _plain(layer, composed.modules_idx)
            if not name:
                net = plain
                continue
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent), attr, plain)
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        _prune_sequential(seq)
    grafts = copy.deepcopy(composed.grafts)
    return ExportedModel(net, grafts, composed.classes).eval()
