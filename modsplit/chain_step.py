"""Co-training's gradients of a masked MLP by direct op calls (decompose.train_step's fast path).

In a co-training step of a small FC network, Python and autograd bookkeeping (the converted
network's module calls, the autograd Functions and engine, zero_grad, AccumulateGrad) cost a
large share next to the kernels (benchmarks/RESULTS.md, "Stop 17"). For a network that is a
plain chain, MaskedChain runs the same ops in the same order without autograd:

    forward    multi_masked_linear per layer (the first on the input all modules share),
               torch.relu between them, then graft_cross_entropy;
    backward   graft_cross_entropy_backward, then per layer from the last: the raw score
               gradient (multi_masked_linear_grad_scores_, the computation of
               multi_masked_linear_backward's grad_scores, into a buffer the optimizer
               keeps), grad_x (multi_masked_linear_backward) and threshold_backward for each
               ReLU, as autograd would call them;
    ragged     with sampled negatives, the same with ragged_masked_linear and its backward:
               each module runs on its own rows of the batch only (T rows in all, not K*B);

and stores the gradients in .grad, so the optimizer step that follows is the usual one. The
score gradient is the raw one (before the straight-through sgn(S)), as under
functional.raw_score_grad(): CoTrainSGD.step(raw_grad=True) multiplies the sign in. The values
are those of the autograd path bit for bit (tests/test_chain_step.py), the ragged step's those
of autograd's ragged path (ragged_logits); against the padded path ([K, m] rows, modules on
x[idx]) they differ by rounding, as the products sum in another order.

The chain: an nn.Sequential of nn.Flatten() layers (leading only), then MaskedLinear and
nn.ReLU layers, the first of them a MaskedLinear (the paper's FC1-FC4, mnist2_fc). Anything
else, and any step the chain cannot take exactly (see MaskedChain.runs), takes autograd's path;
there, sampled negatives still run on ragged row sets when no module hook is in the way
(MaskedChain.ragged_logits: the same products through autograd, on any backend and device).
"""
import torch
import torch.nn as nn
import torch.nn.modules.module as module_globals

from modsplit import functional as MF
from modsplit.backend import uses_cpu_kernel
from modsplit.fused_layers import hookless
from modsplit.layers import MaskedLinear

_ops = torch.ops.modsplit


def _no_tensor_hooks(t: torch.Tensor) -> bool:
    return not (t._backward_hooks or getattr(t, "_post_accumulate_grad_hooks", None))


def _no_global_hooks() -> bool:
    return not any(getattr(module_globals, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def rows_in_slots(h, slots, k, r):
    """Rows h float [T, N] placed in slots [T] of a zeroed [K*R, N], viewed [K, R, N]
    (differentiable: index_copy)."""
    return h.new_zeros(k * r, h.shape[1]).index_copy(0, slots, h).view(k, r, -1)


def _graft_head(logits, positive, row_weight, grafts, scale):
    """graft_cross_entropy and its backward: (out [K, R, 2], ce [K], grad of the logits),
    the grafts' gradients stored in grafts.weight.grad and grafts.bias.grad."""
    weight, bias = grafts.weight, grafts.bias
    out, ce = _ops.graft_cross_entropy(logits, weight, bias, positive, row_weight, scale)
    grad, weight.grad, bias.grad = _ops.graft_cross_entropy_backward(
        torch.ones_like(ce), logits, weight, out, positive, row_weight, scale,
        [True, weight.requires_grad, bias.requires_grad])
    return out, ce, grad


def _is_flatten(m: nn.Module) -> bool:
    return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1


class MaskedChain:
    """The layers of a converted FC network, run without autograd.

    layers: tuple of MaskedLinear (a masked linear layer) and None (a ReLU), in order;
    modules: every nn.Module of the network, for the hook check."""

    def __init__(self, layers: tuple, modules: tuple):
        self.layers, self.modules = layers, modules
        self.masked = tuple(m for m in layers if m is not None)

    @classmethod
    def of(cls, net: nn.Module):
        """The MaskedChain of a network (a MultiModuleNet's .net), or None where it is not an
        nn.Sequential of leading nn.Flatten() layers, then MaskedLinear and nn.ReLU layers
        starting with a MaskedLinear."""
        if type(net) is not nn.Sequential:
            return None
        children = list(net)
        while children and _is_flatten(children[0]):
            children.pop(0)
        if not children or not isinstance(children[0], MaskedLinear):
            return None
        layers = []
        for m in children:
            if type(m) is nn.ReLU:
                layers.append(None)
            elif type(m) is MaskedLinear:
                layers.append(m)
            else:
                return None
        return cls(tuple(layers), tuple(net.modules()))

    def runs(self, x: torch.Tensor, grafts: nn.Module) -> bool:
        """Whether this step can be taken exactly: the CPU kernels run x (float32 / float64,
        the "auto" or "cpu" backend), every layer has trainable scores of x's dtype, a frozen
        weight and bias and all K modules active, and no hook (module, global module, or
        tensor hook on a score tensor or on the grafts' weight and bias, the tensors the step
        reads) would be skipped."""
        if not (uses_cpu_kernel(x) and torch.is_grad_enabled() and not x.requires_grad
                and _no_global_hooks() and all(hookless(m) for m in self.modules)):
            return False
        for m in self.masked:
            frozen = not m.weight.requires_grad and (m.bias is None or not m.bias.requires_grad)
            if (m.scores is None or m.active is not None or not frozen
                    or m.scores.dtype != x.dtype or m.weight.dtype != x.dtype
                    or not _no_tensor_hooks(m.scores)):
                return False
        return all(p.dtype == x.dtype and _no_tensor_hooks(p)
                   for p in (grafts.weight, grafts.bias))

    def ragged_runs(self, x: torch.Tensor) -> bool:
        """Whether ragged_logits may stand for the network's forward under autograd: no module
        or global module hook (ragged_logits calls no module), every layer with scores of x's
        dtype and all K modules active. Any backend, any device."""
        return (_no_global_hooks() and all(hookless(m) for m in self.modules)
                and all(m.scores is not None and m.active is None and m.scores.dtype == x.dtype
                        for m in self.masked))

    def ragged_logits(self, x, ragged, shape):
        """The network's logits on ragged row sets, under autograd (straight-through score
        gradients, functional.ragged_masked_linear): x float [B, ...] shared; ragged =
        (offsets, rows, slots) as for gradients(); shape (K, R) of the slots. Returns float
        [K, R, N], zero in the slots no row fills."""
        offsets, rows, slots = ragged
        h = x.reshape(x.shape[0], -1)
        for i, m in enumerate(self.layers):
            h = torch.relu(h) if m is None else MF.ragged_masked_linear(
                h, m.weight, m.scores, m.masks(), offsets, rows if i == 0 else None, m.bias)
        return rows_in_slots(h, slots, *shape)

    def gradients(self, x, shared: bool, positive, row_weight, grafts, scale: float,
                  grad_buffer=torch.empty_like, ragged=None):
        """One step's forward and backward.

        x: float [B, ...] the input all K modules share (shared=True), or [K, R, ...] each
        module's own rows; positive bool [K, R], row_weight [K, R] and scale as for
        ops.graft_cross_entropy (R = B when shared).
        ragged: None, or (offsets int64 [K+1], rows int64 [T], slots int64 [T]) with x shared:
        module k runs on x's rows rows[offsets[k]:offsets[k+1]] only (ops.ragged_masked_linear,
        T rows in all instead of K*B), and row t lands in slot slots[t] of the flattened
        [K, R] rows that positive and row_weight describe (the rows of no slot weigh 0).
        Stores each layer's raw score gradient float [K, O, I] in its scores.grad and the
        grafts' gradients in grafts.weight.grad and grafts.bias.grad (replacing what was
        there, as zero_grad + backward would).
        grad_buffer(scores) -> the tensor (like scores) to write the layer's score gradient
        into: a fresh one by default, or one the caller keeps between steps
        (CoTrainSGD.grad_buffer), whose memory is then not mapped and zeroed anew each step.
        Returns (out float [K, R, 2], ce float [K]) of graft_cross_entropy."""
        # Below autograd: no graph is recorded (the grafts require grad), and the dispatcher
        # goes straight to the kernels, past the ops' Python autograd wrappers.
        with torch._C._AutoDispatchBelowADInplaceOrView():
            if ragged is not None:
                return self._ragged_gradients(x, ragged, positive, row_weight, grafts, scale,
                                              grad_buffer)
            return self._gradients(x, shared, positive, row_weight, grafts, scale, grad_buffer)

    def _ragged_gradients(self, x, ragged, positive, row_weight, grafts, scale, grad_buffer):
        offsets, rows, slots = ragged
        acts, packs = [x.reshape(x.shape[0], -1)], []
        for i, m in enumerate(self.layers):
            if m is None:
                acts.append(torch.relu(acts[-1]))
                continue
            packs.append(m.masks())
            acts.append(_ops.ragged_masked_linear(acts[-1], m.weight, packs[-1], offsets,
                                                  rows if i == 0 else None, m.bias))
        k, r = positive.shape
        logits = rows_in_slots(acts[-1], slots, k, r)  # the rows of no slot weigh 0 in the loss
        out, ce, grad = _graft_head(logits, positive, row_weight, grafts, scale)
        grad = grad.reshape(k * r, -1)[slots]  # [T, N]
        for i in reversed(range(len(self.layers))):
            m = self.layers[i]
            if m is None:
                grad = torch.ops.aten.threshold_backward(grad, acts[i + 1], 0)
                continue
            packed, source = packs.pop(), rows if i == 0 else None
            gs = m.scores.grad = grad_buffer(m.scores)
            _ops.ragged_masked_linear_grad_scores_(gs, grad, acts[i], m.weight, packed, offsets,
                                                   source)
            if i > 0:
                grad = _ops.ragged_masked_linear_backward(grad, acts[i], m.weight, packed,
                                                          offsets, None, [True, False, False])[0]
        return out, ce

    def _gradients(self, x, shared, positive, row_weight, grafts, scale, grad_buffer):
        acts = [x.reshape(x.shape[0], -1) if shared else x.reshape(*x.shape[:2], -1)]
        packs = []  # each masked layer's packed masks, in order
        for i, m in enumerate(self.layers):
            if m is None:
                acts.append(torch.relu(acts[-1]))
                continue
            packs.append(m.masks())
            acts.append(_ops.multi_masked_linear(acts[-1], m.weight, packs[-1], m.bias,
                                                 shared and i == 0))
        out, ce, grad = _graft_head(acts[-1], positive, row_weight, grafts, scale)
        for i in reversed(range(len(self.layers))):
            m = self.layers[i]
            if m is None:  # autograd's ReLU backward: on the ReLU's output
                grad = torch.ops.aten.threshold_backward(grad, acts[i + 1], 0)
                continue
            packed, first = packs.pop(), shared and i == 0
            gs = m.scores.grad = grad_buffer(m.scores)
            _ops.multi_masked_linear_grad_scores_(gs, grad, acts[i], m.weight, packed, first)
            if i > 0:
                grad = _ops.multi_masked_linear_backward(grad, acts[i], m.weight, packed, first,
                                                         [True, False, False])[0]
        return out, ce
