"""A compact model as plain torch, for torch.export (.pt2) and ONNX files that load and run with
torch (or an ONNX runtime) alone, without modsplit.

plain_module(compact) -> nn.Module: forward(x [B, ...]) -> (confidences float [B, K], class ids
int64 [B]). Each compact layer becomes a PlainSparseLinear / PlainSparseConv2d holding
  values     float [V, nnz]   the union's weights (V = 1), or one row per module (V = K) where
                              the modules' weights differ (the last layer with the grafts folded in);
  positions  int32 [nnz]      flat positions of the union's entries in the [O, R] weight;
  bits       uint8 [K, ceil(nnz/8)]  module k keeps union entry p when bit p % 8 of byte p // 8 is
                              set;
and rebuilds each module's dense weight on every call (a scatter, then one batched matmul or one
grouped convolution over the modules). So the files stay near the compact file's size (4 bytes of
value + 4 of position per union weight), at the price of a per-call O(K * P) weight rebuild: they
are smaller than the base model, but not faster (benchmarks/RESULTS.md).
A per-module BatchNorm the compact model could not fold into the layer before it stays as it is
(modsplit.export.PlainModuleBatchNorm: each module's scale and shift [K, C], plain torch).
export_pt2 / export_onnx write the files; the batch dim is dynamic.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from modsplit import reference as ref
from modsplit.compact_layers import CompactConv2d, CompactLinear, CompactLinearChain


def _module_weights(layer):
    """Run-time module weights float [K, O, R] and bias [K, O] or None of a compact layer."""
    k = layer.n_modules
    if layer.dense is not None:
        return layer.dense.reshape(k, layer.dense.shape[1], -1), layer.run_bias
    cols = int(torch.Size(layer.weight_shape[1:]).numel())
    return ref.csr_to_dense(layer.row_ptr, layer.col_idx, layer.csr_values, cols), layer.run_bias


class _PlainSparse(nn.Module):
    def __init__(self, layer):
        super().__init__()
        w, bias = _module_weights(layer)
        k, o, cols = w.shape
        nz = w != 0
        union = nz.any(0).reshape(-1)
        positions = union.nonzero(as_tuple=True)[0]
        vals = w.reshape(k, -1)[:, positions]
        keep = nz.reshape(k, -1)[:, positions]
        union = vals.gather(0, keep.to(torch.int8).argmax(0, keepdim=True))  # a keeper's value
        same = bool(((vals == union) | ~keep).all())
        self.register_buffer("values", union.clone() if same else vals.clone())
        self.register_buffer("positions", positions.to(torch.int32))
        self.register_buffer("bits", _pack_bytes(keep))
        self.register_buffer("pow2", torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8))
        self.register_buffer("bias", None if bias is None else bias.clone())
        self.k, self.o, self.cols, self.nnz = k, o, cols, positions.numel()
        self.shared, self.relu = layer.shared, layer.relu

    def module_weights(self):
        """[K, O, R] dense weights of the K modules, rebuilt from values, positions and bits."""
        keep = (self.bits.unsqueeze(-1) & self.pow2) != 0
        keep = keep.reshape(self.k, -1)[:, :self.nnz]
        vals = self.values * keep.to(self.values.dtype)
        index = self.positions.to(torch.int64).unsqueeze(0).expand(self.k, -1)
        w = torch.zeros(self.k, self.o * self.cols, dtype=vals.dtype, device=vals.device)
        return w.scatter(1, index, vals).reshape(self.k, self.o, self.cols)


def _pack_bytes(keep):
    """bool [K, n] -> uint8 [K, ceil(n/8)], bit j of byte i = entry 8*i + j."""
    k, n = keep.shape
    padded = F.pad(keep.to(torch.int32), (0, (-n) % 8)).reshape(k, -1, 8)
    return (padded << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


class PlainSparseLinear(_PlainSparse):
    """Input [N, *, I] (N = K*B module-folded, or B when shared) -> [K*B, *, O]."""

    def forward(self, x):
        s = 1 if self.shared else self.k
        b = x.shape[0] // s
        y = torch.matmul(x.reshape(s, -1, self.cols), self.module_weights().transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        y = y.relu() if self.relu else y
        return y.reshape(self.k * b, *x.shape[1:-1], self.o)


class PlainSparseConv2d(_PlainSparse):
    """Input [N, C, H, W] (N = K*B module-folded, or B when shared) -> [K*B, O, Ho, Wo]; one
    grouped convolution over the modules."""

    def __init__(self, layer):
        super().__init__(layer)
        self.kernel_size, self.stride, self.padding = (tuple(layer.weight_shape[2:]),
                                                       layer.stride, layer.padding)

    def forward(self, x):
        k, c = self.k, x.shape[1]
        if self.shared:
            xg = x.repeat(1, k, 1, 1)
        else:
            xg = x.reshape(k, -1, *x.shape[1:]).transpose(0, 1).reshape(-1, k * c, *x.shape[2:])
        w = self.module_weights().reshape(k * self.o, c, *self.kernel_size)
        bias = None if self.bias is None else self.bias.reshape(-1)
        y = F.conv2d(xg, w, bias, self.stride, self.padding, 1, k)
        y = y.relu() if self.relu else y
        return y.reshape(-1, k, self.o, *y.shape[2:]).transpose(0, 1).reshape(
            -1, self.o, *y.shape[2:])


def _plain(m):
    if isinstance(m, CompactLinearChain):
        layers = [PlainSparseLinear(layer) for layer in m.layers]
        return nn.Sequential(*layers, *([nn.Sigmoid()] if m.sigmoid else []))
    return (PlainSparseLinear if isinstance(m, CompactLinear) else PlainSparseConv2d)(m)


class PlainComposed(nn.Module):
    """forward(x [B, ...]) -> (confidences float [B, K], predicted class ids int64 [B])."""

    def __init__(self, compact):
        super().__init__()
        self.net = copy.deepcopy(compact.net)
        modules = list(self.net.named_modules())
        chains = tuple(f"{n}." for n, m in modules if isinstance(m, CompactLinearChain))
        for name, m in modules:
            if isinstance(m, (CompactLinear, CompactConv2d, CompactLinearChain)) and \
                    not name.startswith(chains):
                parent, _, attr = name.rpartition(".")
                setattr(self.net.get_submodule(parent) if parent else self.net, attr, _plain(m))
        self.fused_grafts = compact.fused_grafts
        self.register_buffer("graft_weight", compact.graft_weight.clone())
        self.register_buffer("graft_bias", compact.graft_bias.clone())
        self.register_buffer("class_ids", compact.class_ids.clone())

    def forward(self, x):
        k, b = self.class_ids.shape[0], x.shape[0]
        out = self.net(x)
        if self.fused_grafts:  # the graph ends in the sigmoid
            conf = out.reshape(k, b).T
        else:
            g = torch.baddbmm(self.graft_bias.unsqueeze(1), out.reshape(k, b, -1),
                              self.graft_weight)
            conf = g.softmax(-1)[..., 0].T
        return conf, self.class_ids[conf.argmax(1)]


def plain_module(compact) -> PlainComposed:
    """The CompactModel `compact` in plain torch (module docstring)."""
    return PlainComposed(compact).eval()


def _dynamic_batch(example):
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 2:
        raise ValueError("modsplit: example must be an input batch tensor [B, ...] with B >= 2 "
                         "(the batch dim is exported as dynamic)")
    return ({0: torch.export.Dim("batch")},)


def export_pt2(compact, path, example):
    """Write `compact` as a torch.export ExportedProgram (.pt2) traced on `example` [B>=2, ...];
    torch.export.load(path).module()(x) -> (confidences [B, K], class ids [B])."""
    example = example.detach().clone()  # the program stores it: not the storage of a view
    program = torch.export.export(plain_module(compact), (example,),
                                  dynamic_shapes=_dynamic_batch(example))
    for node in program.graph.nodes:  # source locations: most of the file, no use to run it
        node.meta.pop("stack_trace", None)
    torch.export.save(program, path)
    return path


def export_onnx(compact, path, example):
    """Write `compact` as an ONNX model (input "x", outputs "confidences" and "classes"), traced on
    `example` [B>=2, ...]. Needs the onnx and onnxscript packages. The exporter's graph optimiser
    is off: it would fold the per-call weight rebuild into dense constants (a larger file)."""
    torch.onnx.export(plain_module(compact), (example,), path, dynamo=True,
                      input_names=["x"], output_names=["confidences", "classes"],
                      dynamic_shapes=_dynamic_batch(example), external_data=False,
                      optimize=False, verbose=False)
    import onnx  # the exporter needs it anyway

    model = onnx.load(path)
    for node in model.graph.node:  # source locations (stack traces): most of the file
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, path)
    return path
