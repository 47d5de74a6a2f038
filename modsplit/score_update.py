"""CoTrainSGD: decompose()'s optimiser, with the score bank's update fused into one pass.

torch.optim.SGD spends five tensor ops per score tensor on a step (weight decay, momentum
decay, momentum add, Nesterov, the step itself), and autograd three more on the stemming term
(S - A, |.| and its sum forward; sgn, the product by its weight and the accumulation into the
gradient backward), each a pass over a [K, *W.shape] bank with a fresh allocation.
CoTrainSGD.step does all of it in one pass per score tensor (the op cotrain_sgd_step_: a C++
kernel on the CPU, torch.optim.SGD's own tensor ops elsewhere) and returns the stemming term's
value, so the training step leaves that term out of the autograd graph.

CoTrainSGD.step(..., densities=...) goes one step further (cotrain_sgd_topk_step_): while
each block of updated scores is still in cache, the same pass counts them against a bracket
around the previous step's top-k threshold, so the next step's exact top-k mask costs a select
among the few keys inside the bracket and a rewrite of their words, not two more passes over the
bank. decompose() hands those masks to the layers (MaskedLinear / MaskedConv2d.cache_masks).

The arithmetic is torch.optim.SGD's (single-tensor path, dampening 0) on the gradient autograd
would have accumulated for Eq. 1 with p = 1: a run with CoTrainSGD gives the same scores, bit for
bit, as one with torch.optim.SGD (tests/test_score_update.py). The momentum buffers live in
opt.state[p]["momentum_buffer"], as torch.optim.SGD's, so checkpoints are the same.
"""
import functools
import math

import torch

from modsplit import _extension, torch_backend
from modsplit.backend import uses_cpu_kernel


def cotrain_sgd_step_(scores, momentum_buffer, grad, anchor, lr, momentum, weight_decay,
                      stem_coef, nesterov, init_buffer, sign_grad=False):
    """One fused score update, in place (see the module docstring and
    reference.cotrain_sgd_step_ for the arithmetic).

    scores, momentum_buffer: float [K, ...], contiguous, updated in place; grad: float [K, ...]
    of the same shape and dtype; anchor: None, or the same as grad or [1, ...] (shared).
    stem_coef: the stemming term's gradient weight
    alpha / (L*M*N) (0 without anchor). init_buffer: the buffer holds no momentum yet (it is set
    to the gradient, as torch.optim.SGD's first step does). sign_grad: grad is the masked ops'
    score gradient before the straight-through sgn(S) (functional.raw_score_grad), which the
    pass multiplies in. Returns float64 [K], per module the
    sum of |S - A| over the old scores (zeros without anchor).
    Runs the C++ kernel for float32 / float64 CPU tensors under the "auto" and "cpu" backends,
    else the pure-PyTorch twin (torch_backend.cotrain_sgd_step_).
    """
    args = (float(lr), float(momentum), float(weight_decay), float(stem_coef), bool(nesterov),
            bool(init_buffer), bool(sign_grad))
    if not uses_cpu_kernel(scores):
        return torch_backend.cotrain_sgd_step_(scores, momentum_buffer, grad, anchor, *args)
    stem = torch.ops.modsplit.cotrain_sgd_step_(scores, momentum_buffer, grad, anchor, *args)
    # The kernel writes through raw pointers: bump the version counters as an in-place ATen op
    # would (MaskedLinear's mask cache is keyed on the scores' version).
    torch.autograd.graph.increment_version(scores)
    torch.autograd.graph.increment_version(momentum_buffer)
    return stem


def cotrain_sgd_topk_step_(scores, momentum_buffer, grad, anchor, lr, momentum, weight_decay,
                           stem_coef, nesterov, init_buffer, sign_grad, density, bracket):
    """cotrain_sgd_step_ fused with the top-k mask of the updated scores: the same update, in
    place, then (stem float64 [K], packed int32 [K, O, ceil(R/32)]) with packed equal to
    ops.multi_topk_mask(scores, density) of the new scores. scores: float [K, O, ...] (3 dims
    or more). bracket: float64 CPU [K, 2], the per-module threshold state of the fused select
    (reference.update_topk_bracket_), read and written: start it as torch.full((K, 2), nan).
    On the CPU (float32 / float64, "auto" / "cpu" backend) the C++ kernel counts the next
    top-k's keys while each block of updated scores is still in cache; elsewhere the
    pure-PyTorch twin runs the update and then the top-k."""
    args = (float(lr), float(momentum), float(weight_decay), float(stem_coef), bool(nesterov),
            bool(init_buffer), bool(sign_grad), float(density))
    if not uses_cpu_kernel(scores):
        return torch_backend.cotrain_sgd_topk_step_(scores, momentum_buffer, grad, anchor, *args,
                                                    bracket)
    stem, packed = torch.ops.modsplit.cotrain_sgd_topk_step_(scores, momentum_buffer, grad,
                                                             anchor, *args, bracket)
    torch.autograd.graph.increment_version(scores)
    torch.autograd.graph.increment_version(momentum_buffer)
    return stem, packed


@torch.library.register_fake("modsplit::cotrain_sgd_topk_step_")
def _cotrain_sgd_topk_step_fake(scores, momentum_buffer, grad, anchor, lr, momentum,
                                weight_decay, stem_coef, nesterov, init_buffer, sign_grad,
                                density, bracket):
    k, o = scores.shape[:2]
    words = (math.prod(scores.shape[2:]) + 31) // 32
    return (scores.new_empty((k,), dtype=torch.float64),
            scores.new_empty((k, o, words), dtype=torch.int32))


if _extension.has_kernels("cuda"):
    # A CUDA build registers a kernel of every op (tests/test_cuda_build.py); this op's CUDA
    # kernel is its torch twin (elementwise ATen ops, already one kernel launch each).
    torch.library.impl("modsplit::cotrain_sgd_step_", "CUDA")(torch_backend.cotrain_sgd_step_)
    torch.library.impl("modsplit::cotrain_sgd_topk_step_", "CUDA")(
        torch_backend.cotrain_sgd_topk_step_)


@functools.lru_cache(maxsize=64)
def stem_coefficient(alpha: float, per_module: int, dtype: torch.dtype) -> float:
    """The stemming term's gradient weight alpha / per_module, rounded as autograd rounds it
    for loss = sum_k (CE_k + alpha * total_k / per_module): alpha in `dtype`, then divided."""
    return (torch.full((), alpha, dtype=dtype) / per_module).item()


def _plain_sgd_step(opt):
    """torch.optim.SGD.step(opt) without the hook wrapper torch.optim.Optimizer puts on the SGD
    class once a torch.optim.SGD exists in the process (CoTrainSGD.step's own wrapper has run the
    step hooks already; they would otherwise run twice)."""
    step = torch.optim.SGD.step
    return (step.__wrapped__ if getattr(step, "hooked", False) else step)(opt)


class CoTrainSGD(torch.optim.SGD):
    """torch.optim.SGD over two parameter groups, the score banks (group 0: float [K, ...]
    tensors) and the rest (group 1, e.g. the grafts), whose step() updates the scores with
    cotrain_sgd_step_ and adds the stemming term's gradient there, and the rest with the same
    kernel without that term where it runs (torch.optim.SGD's step elsewhere); the .grad of a
    parameter the kernel updated is None afterwards. Needs momentum > 0 and dampening 0
    (decompose's settings)."""

    def __init__(self, scores, others, lr: float, other_lr: float, momentum: float,
                 nesterov: bool, weight_decay: float):
        if not momentum > 0:
            raise ValueError(f"modsplit: CoTrainSGD needs momentum > 0, got {momentum}")
        super().__init__([{"params": list(scores), "lr": lr},
                          {"params": list(others), "lr": other_lr}],
                         lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        # per score tensor: the fused top-k's threshold state (a speed hint, not optimizer state:
        # not saved, a restored run starts it afresh with the same masks)
        self._brackets = {}
        self.next_masks = None
        # per score tensor: where decompose's direct step writes its gradient, kept between
        # steps (also not optimizer state)
        self._grad_buffers = {}

    def grad_buffer(self, p) -> torch.Tensor:
        """A tensor like p, the same one on every call while p keeps its shape and dtype, for a
        step to write p's gradient into (modsplit.chain_step): a large bank's gradient then
        reuses its memory instead of being mapped and zeroed afresh each step."""
        buf = self._grad_buffers.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
            buf = self._grad_buffers[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return buf

    def _momentum_buffer(self, p) -> tuple:
        """(p's momentum buffer, whether it was just created and holds no momentum yet)."""
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is not None:
            return buf, False
        buf = state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return buf, True

    @torch.no_grad()
    def step(self, anchors=None, stem_coef: float = 0.0, raw_grad: bool = False,
             densities=None):
        """Update every parameter from its .grad. anchors: None, or one float tensor per score
        tensor (the stemming anchor S_avg, [K, ...] or [1, ...]), whose term
        stem_coef * sum |S - A| is added to the scores' gradients here. Returns float64 [K]:
        per module, the sum of |S - A| over all score tensors before the update (None
        without anchors). raw_grad: the scores' .grad was left before the straight-through
        sgn(S) (the forward ran under functional.raw_score_grad()); the step multiplies it in.
        densities: None, or one top-k density per score tensor: the update of each is then
        fused with the top-k mask of its new scores (cotrain_sgd_topk_step_), left in
        self.next_masks: per score tensor that packed mask int32 [K, O, ceil(R/32)] (None for a
        tensor without a gradient; next_masks is None after a step without densities)."""
        group, stem = self.param_groups[0], None
        masks = [None] * len(group["params"])
        if densities is not None and len(densities) != len(group["params"]):
            raise ValueError(f"modsplit: densities must hold one density per score tensor "
                             f"({len(group['params'])}), got {len(densities)}")
        if anchors is not None and len(anchors) != len(group["params"]):
            raise ValueError(f"modsplit: anchors must hold one tensor per score tensor "
                             f"({len(group['params'])}), got {len(anchors)}")
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            buf, init = self._momentum_buffer(p)
            anchor = None if anchors is None else anchors[i]
            args = (p, buf, p.grad, anchor, group["lr"], group["momentum"],
                    group["weight_decay"], stem_coef if anchor is not None else 0.0,
                    group["nesterov"], init, raw_grad)
            if densities is None:
                sums = cotrain_sgd_step_(*args)
            else:
                bracket = self._brackets.get(p)
                if bracket is None:
                    bracket = self._brackets[p] = torch.full((p.shape[0], 2), float("nan"),
                                                             dtype=torch.float64)
                sums, masks[i] = cotrain_sgd_topk_step_(*args, densities[i], bracket)
            p.grad = None  # done: the base step below skips it
            if anchor is not None:
                stem = sums if stem is None else stem + sums
        for group in self.param_groups[1:]:  # the grafts: the same kernel, no stemming term
            for p in group["params"]:
                if p.grad is None or not (uses_cpu_kernel(p) and p.is_contiguous()
                                          and p.grad.dtype == p.dtype):
                    continue
                buf, init = self._momentum_buffer(p)
                cotrain_sgd_step_(p, buf, p.grad, None, group["lr"], group["momentum"],
                                  group["weight_decay"], 0.0, group["nesterov"], init)
                p.grad = None
        if any(p.grad is not None for g in self.param_groups for p in g["params"]):
            _plain_sgd_step(self)  # whatever the kernels did not take (other devices, dtypes)
        self.next_masks = None if densities is None else masks
        return stem
