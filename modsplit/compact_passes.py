"""Load-time passes over a compact model's fx graph (modsplit.compact): they change how it runs,
never what it computes (up to float rounding) nor what its file holds.

optimize(net, graft_weight, graft_bias), in order:
  * Flatten / ReLU modules become tensor methods, 2x2 max pooling max_pool_2x2, Identity (and
    inference Dropout) goes;
  * an eval BatchNorm right after a compact conv / linear layer is folded into it (a per-module
    one, PlainModuleBatchNorm, with each module's own scale and shift);
  * a ReLU right after a compact layer is fused into its kernel;
  * a residual add of a compact layer's output (read by nothing else), and a ReLU after it, are
    computed in place in that output (add_into: no new tensor);
  * the grafts are folded into a last CompactLinear (module k's confidence softmax(graft)[0] =
    sigmoid(h_k . (G_k[:, 0] - G_k[:, 1])^T W_k + c_k)), followed by a sigmoid node;
  * runs of sparse CompactLinear layers (each the only user of the previous) become one
    CompactLinearChain (one sparse_linear_chain call), absorbing that sigmoid.
whole_chain(net) finds the network that is nothing but one such chain (an MLP), which
CompactModel.forward then calls directly.
"""
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from modsplit import reference as ref
from modsplit.compact_layers import CompactConv2d, CompactLinear, CompactLinearChain
from modsplit.export import PlainModuleBatchNorm

_RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu)


def _single_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _batchnorm_affine(bn, layer):
    """(scale, shift) float [O] or [K, O] of the eval BatchNorm module `bn` when it can fold into
    the compact layer `layer` before it (a BatchNorm2d after a conv, a BatchNorm1d after a
    linear, per-module ones with the layer's K modules), else None."""
    if isinstance(bn, PlainModuleBatchNorm):
        fits = bn.spatial == isinstance(layer, CompactConv2d) and bn.n_modules == layer.n_modules
        return (bn.scale, bn.shift) if fits else None
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or not bn.track_running_stats or \
            isinstance(layer, CompactLinear) != isinstance(bn, nn.BatchNorm1d):
        return None
    scale = (bn.running_var + bn.eps).rsqrt()
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale.detach(), shift.detach()


def _fold_batchnorms(gm):
    for n in list(gm.graph.nodes):
        if n.op != "call_module" or not isinstance(gm.get_submodule(n.target),
                                                   (CompactConv2d, CompactLinear)):
            continue
        u = _single_user(n)
        if u is None or u.op != "call_module":
            continue
        layer = gm.get_submodule(n.target)
        affine = _batchnorm_affine(gm.get_submodule(u.target), layer)
        if affine is not None:
            layer.prepare(*affine)
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


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 2) (kernel 2, stride 2, no padding, floor mode) of x [N, C, H, W] as two
    elementwise maxima over strided views: the same values (NaN included), 5-20x faster than
    torch's CPU max_pool2d, which also computes indices."""
    x = x[..., :x.shape[-2] // 2 * 2, :x.shape[-1] // 2 * 2]
    rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _is_pool_2x2(m) -> bool:
    pair = nn.modules.utils._pair
    return (type(m) is nn.MaxPool2d and pair(m.kernel_size) == (2, 2)
            and pair(m.stride or m.kernel_size) == (2, 2) and pair(m.padding) == (0, 0)
            and pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)


def _inline_simple_modules(gm):
    """Flatten / ReLU modules -> tensor methods, 2x2 max pooling -> max_pool_2x2, Identity
    removed (fewer module calls)."""
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
        elif _is_pool_2x2(m):
            call = (max_pool_2x2, (n.args[0],))
        else:
            continue
        with gm.graph.inserting_before(n):
            new = (gm.graph.call_method(*call) if isinstance(call[0], str)
                   else gm.graph.call_function(*call))
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)


def add_into(a: torch.Tensor, b: torch.Tensor, relu: bool) -> torch.Tensor:
    """a + b (then ReLU) written into a when the sum has a's shape, else into a new tensor. For
    an `a` nothing else reads (a compact layer's fresh output): no allocation, one pass."""
    out = a.add_(b) if torch.broadcast_shapes(a.shape, b.shape) == a.shape else a + b
    return out.relu_() if relu else out


def _is_add(node):
    return (node.op == "call_function" and node.target in (operator.add, torch.add)
            and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args))


def _residual_adds_in_place(gm):
    """add(layer, other) [-> ReLU], where `layer` is a compact layer read by the add alone (a
    residual block's last conv), -> add_into(layer, other, relu): the sum and the ReLU are
    written into the layer's output."""
    for n in list(gm.graph.nodes):
        if not _is_add(n):
            continue
        fresh = [a for a in n.args if a.op == "call_module" and _single_user(a) is n
                 and isinstance(gm.get_submodule(a.target), (CompactConv2d, CompactLinear))]
        if not fresh:
            continue
        other = n.args[1] if n.args[0] is fresh[0] else n.args[0]
        u = _single_user(n)
        relu = u is not None and _is_relu(gm, u) and u.args[0] is n
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(add_into, (fresh[0], other, relu))
        (u if relu else n).replace_all_uses_with(new)
        if relu:
            gm.graph.erase_node(u)
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


def whole_chain(gm):
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


def optimize(net: fx.GraphModule, graft_weight, graft_bias) -> bool:
    """Run the passes (module docstring) on `net` in place; True when the grafts were folded
    into the network (its output is then the confidences, module-folded [K*B, 1])."""
    _inline_simple_modules(net)
    _fold_batchnorms(net)
    _fuse_relus(net)
    _residual_adds_in_place(net)
    fused = _fuse_grafts(net, graft_weight, graft_bias)
    _chain_linears(net)
    net.graph.eliminate_dead_code()
    net.delete_all_unused_submodules()
    net.recompile()
    return fused
