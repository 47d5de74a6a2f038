"""convert(): a trained network -> its K-module masked twin (MultiModuleNet)."""
import contextlib
import copy
import fnmatch

import warnings

import torch
import torch.nn as nn

from modsplit.chain_step import MaskedChain
from modsplit.fused_layers import FusedView
from modsplit.layers import SCORE_INITS, MaskedConv2d, MaskedLinear
from modsplit.module_norm import BATCHNORM_MODES, ModuleBatchNorm, replace_batchnorms

_MASKED = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}


def repeat_folded(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [B, ...] -> [k*B, ...]: k copies of the batch, module-major (rows k*B .. k*B+B-1 are
    module k's)."""
    return x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])


class MultiModuleNet(nn.Module):
    """A converted network that runs K modules (supermasks) at once.

    forward(x [B, ...]) -> [K, B, ...]: the wrapped network (Linear/Conv2d layers replaced by
    MaskedLinear / MaskedConv2d) runs on x, and every masked layer that reads x itself (or a
    module-independent function of it) takes it as the input all K modules share and folds the
    module dim into the batch dim ([K*B, ...]) from there on; the output is unfolded. K =
    n_modules, or the number of modules selected by use_modules(). shared_input=False (or a
    network that mixes x with module activations, e.g. `x + masked(x)`, found on the first such
    call, with a warning) repeats x K times up front instead. BatchNorm: a network converted
    with batchnorm="module" holds ModuleBatchNorm layers (per-module statistics; their
    training flag, set by train_module_norms(), picks batch or running statistics); with
    "frozen" its nn.BatchNorm layers must stay in eval mode: in train mode they would mix the
    statistics of all modules' activations.
    fuse_layers: run the network through its fused view (modsplit.fused_layers: BatchNorm +
    ReLU pairs and 2 x 2 max pools on one-pass CPU kernels; the same computation); the view is
    rebuilt whenever the network's modules change or a fused layer gets a hook.
    """

    def __init__(self, net: nn.Module, n_modules: int, density: float, shared_input: bool = True,
                 fuse_layers: bool = True):
        super().__init__()
        self.net, self.n_modules, self.density = net, int(n_modules), float(density)
        self.active, self.shared_input = None, bool(shared_input)
        self.fuse_layers = bool(fuse_layers)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_layout_cache", None)  # a cache: rebuilt on the next use
        return state

    def _layout(self) -> dict:
        """The network's masked layers, per-module BatchNorms, fused view and masked chain,
        found once and kept while its modules stay the same objects in the same order."""
        key = tuple(self.net.modules())  # references: a changed module is a changed key
        cached = self.__dict__.get("_layout_cache")
        if cached is None or cached["key"] != key:
            named = list(self.net.named_modules())
            cached = {"key": key,
                      "masked": {n: m for n, m in named
                                 if isinstance(m, (MaskedLinear, MaskedConv2d))},
                      "norms": {n: m for n, m in named if isinstance(m, ModuleBatchNorm)},
                      "view": None, "chain": MaskedChain.of(self.net)}
            self.__dict__["_layout_cache"] = cached
        return cached

    def _body(self) -> nn.Module:
        """The module that runs the network: its fused view, or the network itself."""
        if not getattr(self, "fuse_layers", False):  # absent in nets pickled before it
            return self.net
        layout = self._layout()
        if layout["view"] is None or layout["view"].stale():
            layout["view"] = FusedView(self.net)
        return layout["view"].sync()

    def masked_chain(self):
        """The network as a MaskedChain (modsplit.chain_step: co-training's gradients by direct
        op calls), or None where it is not such a chain, runs a module subset
        (use_modules) or repeats its input per module (shared_input=False)."""
        if self.active is not None or not self.shared_input:
            return None
        return self._layout()["chain"]

    def masked_layers(self) -> dict:
        """{name in the original model: MaskedLinear | MaskedConv2d}, in module order."""
        return dict(self._layout()["masked"])

    def module_norms(self) -> dict:
        """{name: ModuleBatchNorm} of the per-module BatchNorm layers (empty for "frozen")."""
        return dict(self._layout()["norms"])

    def train_module_norms(self, mode: bool = True):
        """Put the ModuleBatchNorm layers (only) in training mode (per-module batch statistics,
        running statistics updated) or eval mode (per-module running statistics)."""
        for m in self.module_norms().values():
            m.train(mode)
        return self

    def _per_module_layers(self) -> list:
        layout = self._layout()
        return [*layout["masked"].values(), *layout["norms"].values()]

    def score_parameters(self) -> list:
        """The trainable scores float [K, *weight.shape] of every masked layer."""
        return [m.scores for m in self.masked_layers().values() if m.scores is not None]

    @contextlib.contextmanager
    def use_modules(self, modules):
        """Within the block, run only the listed module indices (in that order)."""
        modules = [int(k) for k in modules]
        if not modules or min(modules) < 0 or max(modules) >= self.n_modules:
            raise ValueError(f"modsplit: module indices must be in [0, {self.n_modules}), "
                             f"got {modules}")
        layers, previous = self._per_module_layers(), self.active
        self.active = modules
        for m in layers:
            m.active = modules
        try:
            yield self
        finally:
            self.active = previous
            for m in layers:
                m.active = previous

    def forward_per_module(self, x):
        """x [K, B, ...] (module k's own batch) -> [K, B, ...]: every module runs on its own rows
        (decompose's sampled negatives), with no copy of a shared batch."""
        k = self.n_modules if self.active is None else len(self.active)
        if x.dim() < 2 or x.shape[0] != k:
            raise ValueError(f"modsplit: forward_per_module expects x [K={k}, B, ...], got shape "
                             f"{tuple(x.shape)}")
        y = self._body()(x.reshape(k * x.shape[1], *x.shape[2:]))
        return y.reshape(k, x.shape[1], *y.shape[1:])

    def forward_ragged(self, x, offsets, rows=None):
        """Every module on its own rows (decompose's sampled negatives, no padding): x [B, ...]
        the batch; offsets int64 [K+1] rising from 0 to T; rows int64 [T] (batch rows; None:
        x's rows themselves, T = B). Module k runs on x[rows[offsets[k]:offsets[k+1]]].
        Returns [T, ...]. The masked layers and ModuleBatchNorms run their ragged ops; the
        layers between them must act row by row (as the module-folded layout assumes)."""
        k = self.n_modules if self.active is None else len(self.active)
        if offsets.shape != (k + 1,):
            raise ValueError(f"modsplit: forward_ragged expects offsets [K+1={k + 1}], got shape "
                             f"{tuple(offsets.shape)}")
        layers = self._per_module_layers()
        for m in layers:
            m.ragged_offsets = offsets
        try:
            return self._body()(x if rows is None else x.index_select(0, rows))
        finally:
            for m in layers:
                m.ragged_offsets = None

    def _run_shared(self, x, k):
        """(self.net(x) with x marked as the modules' shared input, None), or (None, why) where
        the network mixed x with module activations (a shape error, or an output that is not
        [k*B, ...])."""
        layers = self._per_module_layers()
        for m in layers:
            m.shared_rows = x.shape[0]
        try:
            y = self._body()(x)
        except RuntimeError as err:
            return None, f"it raised {str(err).splitlines()[0]!r}"
        finally:
            for m in layers:
                m.shared_rows = None
        if isinstance(y, torch.Tensor) and y.shape[:1] != (k * x.shape[0],):
            return None, f"its output has batch {y.shape[0]}, not K*B = {k * x.shape[0]}"
        return y, None

    def forward(self, x):
        k = self.n_modules if self.active is None else len(self.active)
        b = x.shape[0]
        y, why = None, None
        if getattr(self, "shared_input", False) and k > 1:  # absent in nets pickled before it
            y, why = self._run_shared(x, k)
        if y is None:
            y = self._body()(repeat_folded(x, k))
            if why is not None:  # the repeated input works where the shared one did not
                warnings.warn(f"modsplit: the network does not run on an input shared by the "
                              f"modules ({why}); repeating it once per module from now on "
                              f"(shared_input=False)", stacklevel=2)
                self.shared_input = False
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"modsplit: the converted network must return a tensor, got "
                            f"{type(y).__name__}")
        return y.reshape(k, b, *y.shape[1:])


def _selected(name, include, exclude):
    def hit(patterns):
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)
    return (include is None or hit(include)) and not (exclude and hit(exclude))


def convert(model: nn.Module, n_modules: int, density: float, include=None, exclude=None,
            shared_init: bool = True, seed: int = None,
            shared_input: bool = True, batchnorm: str = "frozen",
            score_init: str = "kaiming") -> MultiModuleNet:
    """Deep-copy `model`, replacing its nn.Linear / nn.Conv2d layers by K-module masked ones.

    include / exclude: iterables of fnmatch patterns over qualified module names (as in
    model.named_modules()); a layer is converted when it matches include (None: every layer) and
    no exclude pattern. shared_init: all modules start from the same scores. seed: seeds the
    score initialisation (None: torch's global generator). shared_input: the masked layers that
    read the network's input read it once for all modules (see MultiModuleNet).
    batchnorm: "frozen" keeps the model's BatchNorm layers (one set of frozen statistics for
    every module); "module" replaces every nn.BatchNorm1d / nn.BatchNorm2d by a ModuleBatchNorm
    (modsplit.module_norm: per-module statistics, frozen affine parameters).
    score_init: "kaiming" (a Kaiming-normal draw) or "magnitude" (each layer's initial masks
    are its top-|W| weights; layers.magnitude_scores).
    The model is not modified; every tensor of the copy is frozen except the masked layers'
    scores.
    Returns a MultiModuleNet: x [B, ...] -> [K, B, ...].
    """
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("modsplit: include/exclude take an iterable of patterns, not a string")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"modsplit: batchnorm must be one of {BATCHNORM_MODES}, got "
                         f"{batchnorm!r}")
    if score_init not in SCORE_INITS:
        raise ValueError(f"modsplit: score_init must be one of {SCORE_INITS}, got {score_init!r}")
    net = copy.deepcopy(model).requires_grad_(False)  # only the scores will learn
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    targets = [(name, m) for name, m in net.named_modules()
               if type(m) in _MASKED and _selected(name, include, exclude)]
    if not targets:
        raise ValueError("modsplit: no nn.Linear / nn.Conv2d layer selected for conversion")
    for name, layer in targets:
        masked = _MASKED[type(layer)].from_dense(layer, n_modules, density, shared_init, gen,
                                                 score_init)
        masked.train(layer.training)
        if not name:  # the model itself is a single layer
            net = masked
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent_name), attr, masked)
    if batchnorm == "module":
        net = replace_batchnorms(net, n_modules)
    return MultiModuleNet(net, n_modules, density, shared_input)
