"""CompactModel: a composition stored as the union of its modules' kept weights, and run in one pass
on sparse (CSR) or dense kernels with no W*M product.

What a compact model (and its file) holds:
  * the network as a torch.fx graph over plain torch.nn modules (modsplit.compact_graph: JSON,
    nothing pickled), in which every masked layer of the bank is a CompactLinear /
    CompactConv2d holding the union of the chosen modules' weights as values, a packed union
    mask and K packed per-module masks relative to the union (modsplit.compact_layers): about
    (RPs + (K+1)/32) * P * 4 bytes for P maskable float32 weights;
  * hidden units no chosen module uses removed (as in modsplit.export) and conv output channels
    whose filters every chosen module drops removed with the next conv's input channels and the
    BatchNorm between them (modsplit.compact_prune);
  * per-module BatchNorms as the export's PlainModuleBatchNorm (the chosen modules' eval scale
    and shift [K, C]); one that reads the network's input (before any masked layer) runs once
    on it with the first chosen module's, as in the composed model;
  * the K grafts, the class ids.
Prepared once, when the model is built or loaded (modsplit.compact_passes): each layer's CSR or
dense module weights; eval BatchNorms (per-module ones too) folded into the conv / linear before
them; ReLUs fused into the layer before them; the last Linear folded with the grafts into one row
per module, so that a module's positive confidence softmax(graft)[0] is sigmoid(z0 - z1); runs of
sparse Linear layers run as one sparse_linear_chain call. The layers before the first masked one
run once on the batch; the first masked layer reads it for all K modules (no copies).
Predictions equal the composed model's up to float rounding (near-ties may differ).
"""
import torch
import torch.fx as fx

from modsplit import files
from modsplit.compact_graph import CompactFormatError, from_json, to_json, trace
from modsplit.compact_layers import CompactConv2d, CompactLinear
from modsplit.compact_passes import optimize, whole_chain
from modsplit.compact_prune import prune_channels
from modsplit.convert import repeat_folded
from modsplit.errors import BankFileError
from modsplit.export import PlainModuleBatchNorm, PlainMultiConv2d, PlainMultiLinear, \
    export_composed
from modsplit.voting import ClassVoter

KIND = "modsplit.CompactModel"
COMPACT_VERSION = 1


def _set_submodule(root, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _to_compact(plain, shared):
    if isinstance(plain, PlainMultiLinear):
        return CompactLinear.from_plain(plain.weight.detach(), plain.masks, plain.bias, shared)
    if plain.groups != 1 or tuple(plain.dilation) != (1, 1) or plain.pre_pad is not None:
        raise CompactFormatError("modsplit: a compact model runs Conv2d layers with groups 1, "
                                 "dilation 1 and plain zero padding only")
    return CompactConv2d.from_plain(plain.weight.detach(), plain.masks, plain.bias, shared,
                                    stride=plain.stride, padding=plain.padding)


def _first_module_norm(norm: PlainModuleBatchNorm) -> PlainModuleBatchNorm:
    """A one-module copy of `norm` with its first module's scale and shift: it runs on an
    unfolded batch [B, C, *] (the composed model's rule for a BatchNorm reading the shared
    input)."""
    one = PlainModuleBatchNorm(norm.num_features, 1, norm.spatial)
    one.scale, one.shift = norm.scale[:1].clone(), norm.shift[:1].clone()
    return one


def _compact_graph(gm: fx.GraphModule, k: int) -> fx.GraphModule:
    """Replace the plain multi-module layers of a traced export by compact ones, marking those
    that read an unfolded input as shared, give per-module BatchNorms that read an unfolded
    input the first module's statistics, and fold unfolded operands of mixed nodes."""
    folded = set()
    for n in list(gm.graph.nodes):
        inputs = list(n.all_input_nodes)
        module = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(module, (PlainMultiLinear, PlainMultiConv2d)):
            shared = not any(a in folded for a in inputs)
            _set_submodule(gm, n.target, _to_compact(module, shared))
            folded.add(n)
        elif isinstance(module, PlainModuleBatchNorm) and not any(a in folded for a in inputs):
            _set_submodule(gm, n.target, _first_module_norm(module))
        elif any(a in folded for a in inputs):
            folded.add(n)
            for a in inputs:
                if a not in folded and n.op != "output":
                    with gm.graph.inserting_before(n):
                        rep = gm.graph.call_function(repeat_folded, (a, k))
                    n.replace_input_with(a, rep)
    if not any(n.op == "output" and n.all_input_nodes[0] in folded for n in gm.graph.nodes):
        raise CompactFormatError("modsplit: the network's output does not depend on any masked "
                                 "layer")
    gm.recompile()
    return gm


class CompactModel(ClassVoter):
    """A composition of `classes` in compact form (module docstring). forward(x [B, ...]) ->
    positive confidences float [B, len(classes)]; predict(x) -> int64 [B] class ids. Built by
    ComposedModel.compact() / from_composed(), written by save(), read by load()."""

    def __init__(self, graph: dict, tensors: dict, classes):
        super().__init__()
        self.classes = tuple(int(c) for c in classes)
        self.graph_spec, self._file_tensors = graph, dict(tensors)
        k = len(self.classes)
        gw, gb = tensors["graft/weight"], tensors["graft/bias"]
        if tuple(gw.shape[:1]) != (k,) or gw.shape[-1] != 2 or tuple(gb.shape) != (k, 2):
            raise CompactFormatError(f"modsplit: grafts of shape {tuple(gw.shape)} / "
                                     f"{tuple(gb.shape)} do not fit {k} classes")
        self.register_buffer("graft_weight", gw)
        self.register_buffer("graft_bias", gb)
        self.register_buffer("class_ids", torch.tensor(self.classes, dtype=torch.long))
        net = from_json(graph, {n: t for n, t in tensors.items() if not n.startswith("graft/")})
        self.fused_grafts = optimize(net, gw, gb)
        self.net = net.eval()
        self.__dict__["_whole_chain"] = whole_chain(net)
        self.train(False)

    @classmethod
    def from_composed(cls, composed) -> "CompactModel":
        """A ComposedModel -> its CompactModel (same classes, same predictions)."""
        exported = export_composed(composed)
        gm = trace(exported.net, leaves=(PlainMultiLinear, PlainMultiConv2d,
                                         PlainModuleBatchNorm))
        prune_channels(gm)
        gm = _compact_graph(gm, len(composed.classes))
        graph, tensors = to_json(gm)
        tensors["graft/weight"] = exported.grafts.weight.detach().clone()
        tensors["graft/bias"] = exported.grafts.bias.detach().clone()
        return cls(graph, tensors, composed.classes)

    def train(self, mode: bool = True):
        """Always in eval mode (inference only)."""
        return super().train(False)

    def forward(self, x):
        k, b = len(self.classes), x.shape[0]
        chain = self._whole_chain
        if chain is not None:  # the whole network is one chain call
            return chain._kernel(x.reshape(1, b, -1), *chain._args).view(k, b).T
        out = self.net.forward(x)
        if self.fused_grafts:
            return out.reshape(k, b).T
        logits = out.reshape(k, b, -1)
        conf = torch.baddbmm(self.graft_bias.unsqueeze(1), logits, self.graft_weight)
        return conf.softmax(-1)[..., 0].T

    def save(self, path):
        """Write the model, as built or loaded, to one versioned, checksummed file
        (modsplit.files container, meta kind "modsplit.CompactModel"). Nothing is pickled."""
        meta = {"kind": KIND, "compact_version": COMPACT_VERSION, "classes": list(self.classes),
                "graph": self.graph_spec}
        files.write_file(path, meta, self._file_tensors)

    @classmethod
    def load(cls, path) -> "CompactModel":
        """Read a file written by save(). Raises BankFileError for a damaged or foreign file."""
        meta, tensors = files.read_file(path)
        if meta.get("kind") != KIND:
            raise BankFileError(f"modsplit: {path} does not hold a CompactModel")
        if meta.get("compact_version") != COMPACT_VERSION:
            raise BankFileError(f"modsplit: {path} has compact version "
                                f"{meta.get('compact_version')}; this modsplit reads version "
                                f"{COMPACT_VERSION}")
        try:
            return cls(meta["graph"], tensors, meta["classes"])
        except (CompactFormatError, KeyError) as exc:
            raise BankFileError(f"modsplit: {path} holds a malformed compact model ({exc})") from exc
