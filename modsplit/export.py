"""export_composed(): a ComposedModel -> a plain nn.Module holding only the union subnetwork.

What the export guarantees:
  * only standard torch ops (no modsplit op, no compiled extension);
  * each masked layer keeps the union of the chosen modules' masks: weights outside it are
    zero; each module still runs with its own mask, W * M_k, held as a bool buffer (the union
    alone would change the modules' outputs), so predictions equal the composed model's (up to
    float rounding in near-ties);
  * in every nn.Sequential, the hidden units between two Linear layers separated only by
    elementwise modules are removed when no chosen module uses their outgoing edges, or when
    they have no incoming edge (their constant output, per module, is folded into the next
    layer's per-module bias). Conv channels are not removed: conv weights are only zeroed.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from modsplit import ops
from modsplit.voting import ClassVoter
from modsplit.convert import repeat_folded
from modsplit.layers import MaskedConv2d, MaskedLinear

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


def _plain(layer, modules):
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
    b.keep_units(cols=keep)
    return True


def _prune_sequential(seq: nn.Sequential):
    layers = list(seq)
    pairs = []
    for i, a in enumerate(layers):
        nxt = next((j for j in range(i + 1, len(layers))
                    if not isinstance(layers[j], _ELEMENTWISE)), None)
        if (isinstance(a, PlainMultiLinear) and nxt is not None
                and isinstance(layers[nxt], PlainMultiLinear)):
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
        (O, or K*O once folding made them differ per module), every other parameter, and the
        grafts."""
        total = 0
        for m in self.modules():
            if isinstance(m, (PlainMultiLinear, PlainMultiConv2d)):
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
        if isinstance(layer, (MaskedLinear, MaskedConv2d)):
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
