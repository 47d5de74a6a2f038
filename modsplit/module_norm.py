"""ModuleBatchNorm: a trained BatchNorm with one set of statistics per module.

A module keeps ~10% of each layer's weights, so its activations have other means and variances
than the base model's: normalised with the base model's frozen running statistics, a conv
module's BatchNorm outputs collapse to (nearly) constant logits and co-training has no signal to
learn from (docs/RESULTS.md, "Figure 4 at CPU scale"). ModuleBatchNorm keeps the base model's
affine parameters (frozen) and gives every module its own statistics:

  training mode  each module's rows of the module-folded batch [K*B, C, ...] are normalised with
                 their own batch mean and (biased) variance, as BatchNorm does in training, and
                 each module's running statistics are updated with them (momentum as the base
                 layer's, unbiased variance); one op, modsplit.ops.module_batch_norm (a C++
                 kernel on the CPU);
  eval mode      each module's rows use its own running statistics.

decompose() puts these layers in training mode for its optimisation steps and in eval mode for
everything else (evaluation, banks, compositions, exports).

Shared input: while `shared_rows` is B (MultiModuleNet sets it for a pass) a layer that receives
B rows instead of K*B reads the modules' shared input (before any masked layer); its statistics
are then the same for every module (training mode: the batch's, and every active module's
running statistics get the same update; eval mode: the first active module's), and it returns B
rows.

Ragged rows: while `ragged_offsets` is set (int64 [K+1], MultiModuleNet.forward_ragged) module k
owns rows offsets[k] .. offsets[k+1] - 1 of the input (decompose's sampled negatives); its
statistics come from those rows (a module without rows keeps its running statistics).
"""
import torch
import torch.nn as nn

from modsplit.ops import affine as affine_ops
from modsplit.ops import norm as norm_ops

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# convert / DecomposeConfig batchnorm modes: per-module statistics, or the base model's frozen
BATCHNORM_MODES = ("module", "frozen")


class ModuleBatchNorm(nn.Module):
    """BatchNorm1d / BatchNorm2d over a module-folded batch, with per-module statistics.

    weight, bias     float [C] frozen affine parameters of the base layer (None without affine);
    running_mean,
    running_var      float [K, C] per-module running statistics (start: the base layer's);
    active           None (all K modules) or the list of module indices the input holds.
    forward(x float [K'*B, C, *]) -> same shape, K' = K or len(active).
    """

    def __init__(self, num_features: int, n_modules: int, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True, spatial: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if n_modules < 1:
            raise ValueError(f"modsplit: n_modules must be >= 1, got {n_modules}")
        kw = dict(device=device, dtype=dtype)
        self.num_features, self.n_modules = int(num_features), int(n_modules)
        self.eps, self.momentum, self.spatial = float(eps), float(momentum), bool(spatial)
        self.weight = nn.Parameter(torch.ones(num_features, **kw), False) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **kw), False) if affine else None
        self.register_buffer("running_mean", torch.zeros(n_modules, num_features, **kw))
        self.register_buffer("running_var", torch.ones(n_modules, num_features, **kw))
        self.active, self.shared_rows, self.ragged_offsets = None, None, None

    @classmethod
    def from_batchnorm(cls, bn, n_modules: int) -> "ModuleBatchNorm":
        """Per-module copy of a trained BatchNorm1d / BatchNorm2d: its affine parameters and K
        copies of its running statistics. A layer without running statistics
        (track_running_stats=False) is rejected: it has no statistics to start from."""
        if not isinstance(bn, _BATCHNORMS):
            raise TypeError(f"modsplit: expected nn.BatchNorm1d / nn.BatchNorm2d, got "
                            f"{type(bn).__name__}")
        if bn.running_mean is None:
            raise ValueError("modsplit: a BatchNorm without running statistics "
                             "(track_running_stats=False) cannot get per-module statistics; "
                             "use batchnorm='frozen'")
        new = cls(bn.num_features, n_modules, bn.eps, 0.1 if bn.momentum is None else bn.momentum,
                  bn.affine, isinstance(bn, nn.BatchNorm2d), bn.running_mean.device,
                  bn.running_mean.dtype)
        with torch.no_grad():
            if bn.affine:
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
            new.running_mean.copy_(bn.running_mean.expand(n_modules, -1))
            new.running_var.copy_(bn.running_var.expand(n_modules, -1))
        return new.train(bn.training)

    def _rows(self, device):
        """int64 indices of the modules the input holds."""
        if self.active is None:
            return torch.arange(self.n_modules, device=device)
        return torch.as_tensor(self.active, dtype=torch.long, device=device)

    def _check(self, x):
        want = (4,) if self.spatial else (2, 3)
        if x.dim() not in want or x.shape[1] != self.num_features:
            raise ValueError(f"modsplit: {type(self).__name__} of {self.num_features} features "
                             f"({'2d' if self.spatial else '1d'}) got input of shape "
                             f"{tuple(x.shape)}")

    def forward(self, x, relu: bool = False):
        """x float [K'*B, C, *] -> like x; relu: ReLU applied too, in the same pass
        (modsplit.fused_layers)."""
        self._check(x)
        idx = self._rows(x.device)
        k = len(idx)
        offsets = getattr(self, "ragged_offsets", None)  # absent in layers pickled before it
        if offsets is not None:
            return self._forward_ragged(x, idx, offsets, relu)
        shared = k > 1 and self.shared_rows is not None and x.shape[0] == self.shared_rows
        groups = 1 if shared else k
        if x.shape[0] % groups:
            raise ValueError(f"modsplit: {type(self).__name__} expects the batch dim to hold {k} "
                             f"folded module copies, got batch {x.shape[0]}")
        if self.training:  # one op (a C++ kernel on the CPU): statistics, normalisation, affine
            y, mean, invstd = norm_ops.module_batch_norm(x, groups, self.weight, self.bias,
                                                         self.eps, relu)
            n = x.numel() // (groups * self.num_features)
            self._update_running(idx, mean, invstd, n / max(n - 1, 1), self.momentum)
            return y
        mean, var = self.running_mean[idx[:groups]], self.running_var[idx[:groups]]
        scale, shift = self._affine(mean, var)
        return affine_ops.channel_affine(x, groups, scale.to(x.dtype), shift.to(x.dtype), relu)

    def _forward_ragged(self, x, idx, offsets, relu):
        """forward on ragged rows: module idx[k] on rows offsets[k] .. offsets[k+1] - 1."""
        if offsets.shape != (len(idx) + 1,):
            raise ValueError(f"modsplit: {type(self).__name__} holds {len(idx)} active modules, "
                             f"but ragged_offsets has shape {tuple(offsets.shape)}")
        counts = offsets.diff()
        if self.training:
            y, mean, invstd = norm_ops.module_batch_norm(x, len(idx), self.weight, self.bias,
                                                         self.eps, relu, offsets)
            n = (counts * (x[0].numel() // self.num_features)).double()[:, None]  # [K, 1]
            self._update_running(idx, mean, invstd, n / (n - 1).clamp(min=1),
                                 torch.where(counts[:, None] > 0, self.momentum, 0.0))
            return y
        if x.shape[0] == 0:
            return torch.relu(x) if relu else x
        scale, shift = self._affine(self.running_mean[idx], self.running_var[idx])
        rows = torch.repeat_interleave(counts, output_size=x.shape[0])
        return affine_ops.channel_affine(x, x.shape[0], scale.to(x.dtype)[rows],
                                         shift.to(x.dtype)[rows], relu)

    def _update_running(self, idx, mean, invstd, unbias, m):
        """Running statistics of the modules idx after a training pass with batch statistics
        mean / invstd [G, C] (G = len(idx), or 1 for all): momentum m (a number, or [G, 1]: 0
        leaves a module unchanged) and the variance times unbias = n / (n - 1) (a number or
        [G, 1]: unbiased, as nn.BatchNorm keeps it)."""
        with torch.no_grad():
            var = invstd.double().pow(-2).sub(self.eps).clamp(min=0)  # biased, [G, C]
            v = (var * unbias).to(self.running_var.dtype)
            self.running_mean[idx] = ((1 - m) * self.running_mean[idx]
                                      + m * mean.to(self.running_mean.dtype))
            self.running_var[idx] = (1 - m) * self.running_var[idx] + m * v

    def module_affine(self, modules) -> tuple:
        """(scale, shift) float [len(modules), C] of the listed modules in eval mode:
        y = x * scale + shift (what PlainModuleBatchNorm and compact folding use)."""
        idx = torch.as_tensor(list(modules), dtype=torch.long, device=self.running_mean.device)
        scale, shift = self._affine(self.running_mean[idx], self.running_var[idx])
        return scale.detach(), shift.detach()

    def _affine(self, mean, var) -> tuple:
        """(scale, shift) [G, C] of normalising with mean, var [G, C], then the affine map."""
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift

    def extra_repr(self):
        return (f"{self.num_features}, n_modules={self.n_modules}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.weight is not None}, "
                f"{'2d' if self.spatial else '1d'}")


def replace_batchnorms(net: nn.Module, n_modules: int) -> nn.Module:
    """Replace every nn.BatchNorm1d / nn.BatchNorm2d of `net` (in place) by a ModuleBatchNorm
    with n_modules copies of its statistics; returns net (or the replacement when net itself is
    a BatchNorm)."""
    if isinstance(net, _BATCHNORMS):
        return ModuleBatchNorm.from_batchnorm(net, n_modules)
    for name, m in list(net.named_modules()):
        if isinstance(m, _BATCHNORMS):
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent), attr, ModuleBatchNorm.from_batchnorm(m, n_modules))
    return net


def norm_statistics(net) -> dict:
    """{"<layer>/running_mean" | "<layer>/running_var": float [K, C]} of a MultiModuleNet's
    ModuleBatchNorm layers (the tensors themselves, not copies)."""
    out = {}
    for name, m in net.module_norms().items():
        out[f"{name}/running_mean"], out[f"{name}/running_var"] = m.running_mean, m.running_var
    return out


def load_norm_statistics(net, stats: dict, rows=None, where: str = "modsplit"):
    """Copy norm_statistics()-style tensors into a MultiModuleNet's ModuleBatchNorm layers
    (rows: the module indices of `stats` to take, default all). Every entry is checked first;
    a missing or misshapen one raises ValueError naming `where` and the entry."""
    norms = net.module_norms()
    want = {}
    for name, m in norms.items():
        for key in ("running_mean", "running_var"):
            want[f"{name}/{key}"] = (getattr(m, key), tuple(getattr(m, key).shape))
    extra = sorted(set(stats) - set(want))
    if extra:
        raise ValueError(f"{where}: BatchNorm statistics {extra} match no per-module BatchNorm "
                         "of the network")
    for key, (_, shape) in want.items():
        t = stats.get(key)
        got = None if t is None else tuple((t if rows is None else t[rows]).shape)
        if got != shape:
            raise ValueError(f"{where}: BatchNorm statistics {key} are "
                             f"{'missing' if t is None else got}, expected {shape}")
    with torch.no_grad():
        for key, (dest, _) in want.items():
            src = stats[key] if rows is None else stats[key][rows]
            dest.copy_(src.to(dest.device, dest.dtype))
