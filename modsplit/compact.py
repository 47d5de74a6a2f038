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
  * the K grafts, the class ids.
Prepared once, when the model is built or loaded: each layer's CSR or dense module weights; eval
BatchNorms folded into the conv / linear before them; ReLUs fused into the layer before them;
the last Linear folded with the grafts into one row per module, so that a module's positive
confidence softmax(graft)[0] is sigmoid(z0 - z1); runs of sparse Linear layers run as one
sparse_linear_chain call. The layers before the first masked one run
once on the batch; the first masked layer reads it for all K modules (no copies).
Predictions equal the composed model's up to float rounding (near-ties may differ).
"""
import torch
import torch.fx as fx
import torch.nn as nn

from modsplit import files
from modsplit import reference as ref
from modsplit.compact_graph import CompactFormatError, from_json, to_json, trace
from modsplit.compact_layers import CompactConv2d, CompactLinear, CompactLinearChain
from modsplit.compact_prune import prune_channels
from modsplit.convert import repeat_folded
from modsplit.errors import BankFileError
from modsplit.export import PlainMultiConv2d, PlainMultiLinear, export_composed
from modsplit.voting import ClassVoter

KIND = "modsplit.CompactModel"
COMPACT_VERSION = 1
_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu)


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


def _compact_graph(gm: fx.GraphModule, k: int) -> fx.GraphModule:
    """Replace the plain multi-module layers of a traced export by compact ones, marking those
    that read an unfolded input as shared, and fold unfolded operands of mixed nodes."""
    folded = set()
    for n in list(gm.graph.nodes):
        inputs = [a for a in n.all_input_nodes]
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                (PlainMultiLinear, PlainMultiConv2d)):
            shared = not any(a in folded for a in inputs)
            _set_submodule(gm, n.target, _to_compact(gm.get_submodule(n.target), shared))
            folded.add(n)
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


def _single_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _fold_batchnorms(gm):
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not isinstance(gm.get_submodule(n.target),
                                                   (CompactConv2d, CompactLinear)):
            continue
        u = _single_user(n)
        bn = gm.get_submodule(u.target) if u is not None and u.op == "call_module" else None
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and bn.track_running_stats:
            layer = gm.get_submodule(n.target)
            if isinstance(layer, CompactLinear) != isinstance(bn, nn.BatchNorm1d):
                continue
            scale = (bn.running_var + bn.eps).rsqrt()
            shift = -bn.running_mean * scale
            if bn.affine:
                scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
            layer.prepare(scale.detach(), shift.detach())
            u.replace_all_uses_with(n)
            gm.graph.erase_node(u)


def _is_relu(gm, node):
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target == "relu"


def _fuse_relus(gm):
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not isinstance(gm.get_submodule(n.target),
                                                   (CompactConv2d, CompactLinear)):
            continue
        u = _single_user(n)
        if u is not None and _is_relu(gm, u) and u.args[0] is n:
            gm.get_submodule(n.target).relu = True
            u.replace_all_uses_with(n)
            gm.graph.erase_node(u)


def _inline_simple_modules(gm):
    """Flatten / ReLU modules -> tensor methods, Identity removed (fewer module calls)."""
    for n in list(gm.graph.nodes):
        if n.op != "call_module":
            continue
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Identity):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            continue
        if isinstance(m, nn.Flatten):
            call = ("flatten", (n.args[0], m.start_dim, m.end_dim))
        elif type(m) is nn.ReLU:
            call = ("relu", (n.args[0],))
        else:
            continue
        with gm.graph.inserting_before(n):
            new = gm.graph.call_method(call[0], call[1])
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)


def _fuse_grafts(gm, graft_weight, graft_bias) -> bool:
    """Fold the grafts into a last CompactLinear followed by a sigmoid: module k's confidence is
    sigmoid(h_k . (G_k[:, 0] - G_k[:, 1])^T W_k + c_k). True if done."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    last = out.args[0]
    if not (isinstance(last, fx.Node) and last.op == "call_module" and _single_user(last) is out):
        return False
    layer = gm.get_submodule(last.target)
    if not isinstance(layer, CompactLinear) or layer.relu:
        return False
    w = layer.dense if layer.dense is not None else ref.csr_to_dense(
        layer.row_ptr, layer.col_idx, layer.csr_values, layer.weight_shape[1])
    k, n_out = w.shape[0], w.shape[1]
    bias = layer.run_bias if layer.run_bias is not None else w.new_zeros(k, n_out)
    diff = (graft_weight[:, :, 0] - graft_weight[:, :, 1]).to(w.dtype)  # [K, N]
    row = torch.bmm(diff.unsqueeze(1), w)  # [K, 1, H]
    shift = (diff * bias).sum(1, keepdim=True) + (graft_bias[:, :1] - graft_bias[:, 1:]).to(
        w.dtype)
    layer.set_weights(row, shift)
    with gm.graph.inserting_after(last):
        conf = gm.graph.call_function(torch.sigmoid, (last,))
    out.replace_input_with(last, conf)
    return True


def _sparse_linear(gm, node):
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    return m if isinstance(m, CompactLinear) and m.dense is None else None


def _chain_linears(gm):
    """Runs of sparse CompactLinear nodes, each the only user of the previous one (and a sigmoid
    after the last) -> one CompactLinearChain node each."""
    count, removed = 0, set()
    for n in list(gm.graph.nodes):
        if n in removed or _sparse_linear(gm, n) is None:
            continue
        prev = n.args[0]
        if isinstance(prev, fx.Node) and _sparse_linear(gm, prev) is not None and \
                _single_user(prev) is n:
            continue  # not the start of a run
        run = [n]
        while True:
            u = _single_user(run[-1])
            if u is None or _sparse_linear(gm, u) is None or u.args[0] is not run[-1]:
                break
            run.append(u)
        if len(run) < 2:
            continue
        name = f"linear_chain_{count}"
        count += 1
        after = _single_user(run[-1])
        sigmoid = after is not None and after.op == "call_function" and \
            after.target is torch.sigmoid
        gm.add_submodule(name, CompactLinearChain([gm.get_submodule(r.target) for r in run],
                                                  sigmoid))
        with gm.graph.inserting_before(run[0]):
            new = gm.graph.call_module(name, (run[0].args[0],))
        (after if sigmoid else run[-1]).replace_all_uses_with(new)
        for r in ([after] if sigmoid else []) + list(reversed(run)):
            gm.graph.erase_node(r)
        removed.update(run)


def _whole_chain(gm):
    """The CompactLinearChain when the graph is input -> [flatten(1)] -> chain (shared input,
    grafts folded, ending in the sigmoid) -> output, else None."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    if nodes and nodes[0].op == "call_method" and nodes[0].target == "flatten" and \
            tuple(nodes[0].args[1:]) in ((1,), (1, -1)) and not nodes[0].kwargs:
        nodes = nodes[1:]
    if len(nodes) != 1 or nodes[0].op != "call_module":
        return None
    chain = gm.get_submodule(nodes[0].target)
    ok = isinstance(chain, CompactLinearChain) and chain.sigmoid and chain.layers[0].shared
    return chain if ok else None


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
        _inline_simple_modules(net)
        _fold_batchnorms(net)
        _fuse_relus(net)
        self.fused_grafts = _fuse_grafts(net, gw, gb)
        _chain_linears(net)
        net.graph.eliminate_dead_code()
        net.delete_all_unused_submodules()
        net.recompile()
        self.net = net.eval()
        self.__dict__["_whole_chain"] = _whole_chain(net)
        self.train(False)

    @classmethod
    def from_composed(cls, composed) -> "CompactModel":
        """A ComposedModel -> its CompactModel (same classes, same predictions)."""
        exported = export_composed(composed)
        gm = trace(exported.net, leaves=(PlainMultiLinear, PlainMultiConv2d))
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
