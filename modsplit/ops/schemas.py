"""The schemas of the torch.ops.modsplit ops, defined once, here.

They are defined from Python so that the ops exist (with fake impls, autograd and the pure-PyTorch
"torch" backend) whether or not the compiled extension modsplit._C was built: _C only registers
kernels (TORCH_LIBRARY_IMPL(modsplit, CPU|CUDA) in csrc/cpu and csrc/cuda).

CSR (sparse_linear, sparse_conv2d): row_ptr int64 [K, O+1] offsets into col_idx int32 [nnz] and
values [nnz]; see modsplit.reference.sparse_linear.

Masks: int32 [*, O, ceil(R/32)], bit j (LSB first) of word w keeps flat column 32*w + j.
"""
import torch

_ARGS = "int[2] stride, int[2] padding, int[2] dilation, int groups"

SCHEMAS = {
    "topk_mask": "(Tensor scores, float density) -> Tensor",
    "multi_topk_mask": "(Tensor scores, float density) -> Tensor",
    "pack_mask": "(Tensor mask, int batch_dims=0) -> Tensor",
    "unpack_mask": "(Tensor packed, SymInt[] shape) -> Tensor",
    "masked_linear": "(Tensor x, Tensor weight, Tensor packed, Tensor? bias=None) -> Tensor",
    "masked_linear_backward": ("(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, "
                               "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"),
    "multi_masked_linear": ("(Tensor x, Tensor weight, Tensor packed, Tensor? bias=None, "
                            "bool shared_input=False) -> Tensor"),
    "multi_masked_linear_backward": ("(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, "
                                     "bool shared_input, bool[3] output_mask) "
                                     "-> (Tensor, Tensor, Tensor)"),
    # The score gradient of multi_masked_linear_backward (grad_scores), written into out
    # [K, O, I]: a caller that keeps out between steps reuses its pages (decompose's direct
    # step; a bank of tens of MB would otherwise be mapped and zeroed afresh on every step).
    "multi_masked_linear_grad_scores_": ("(Tensor(a!) out, Tensor grad_out, Tensor x, "
                                         "Tensor weight, Tensor packed, bool shared_input) -> ()"),
    # Ragged per-module row sets (decompose's sampled negatives): module k runs on rows
    # offsets[k] .. offsets[k+1] - 1 of x, or, with rows, on x[rows[t]] for those t.
    # x [R, I], packed [K, O, words], offsets int64 [K+1] (0 = offsets[0] <= ... <= offsets[K]
    # = T), rows int64 [T] in [0, R) or None (T = R) -> out [T, O]; the backward's grad_x is
    # shaped like x (summed over the t with rows[t] = r), grad_scores [K, O, I], grad_bias [O].
    "ragged_masked_linear": ("(Tensor x, Tensor weight, Tensor packed, Tensor offsets, "
                             "Tensor? rows=None, Tensor? bias=None) -> Tensor"),
    "ragged_masked_linear_backward": ("(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, "
                                      "Tensor offsets, Tensor? rows, bool[3] output_mask) "
                                      "-> (Tensor, Tensor, Tensor)"),
    # Its score gradient written into out [K, O, I] (as multi_masked_linear_grad_scores_).
    "ragged_masked_linear_grad_scores_": ("(Tensor(a!) out, Tensor grad_out, Tensor x, "
                                          "Tensor weight, Tensor packed, Tensor offsets, "
                                          "Tensor? rows) -> ()"),
    "masked_conv2d": f"(Tensor x, Tensor weight, Tensor packed, Tensor? bias, {_ARGS}) -> Tensor",
    "masked_conv2d_backward": (f"(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, {_ARGS}, "
                               "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"),
    "multi_masked_conv2d": (f"(Tensor x, Tensor weight, Tensor packed, Tensor? bias, {_ARGS}) "
                            "-> Tensor"),
    "multi_masked_conv2d_backward": (f"(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, "
                                     f"{_ARGS}, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"),
    # K modules over one conv weight, module k on its own rows offsets[k] .. offsets[k+1] - 1
    # of the output, reading x[rows[t]] (x's own rows without rows): x [R, C, H, W] ->
    # [T, O, Ho, Wo]; the backward's grad_scores is [K, *weight.shape].
    "ragged_masked_conv2d": ("(Tensor x, Tensor weight, Tensor packed, Tensor offsets, "
                             f"Tensor? rows, Tensor? bias, {_ARGS}) -> Tensor"),
    "ragged_masked_conv2d_backward": ("(Tensor grad_out, Tensor x, Tensor weight, Tensor packed, "
                                      f"Tensor offsets, Tensor? rows, {_ARGS}, "
                                      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"),
    # compact (CSR) inference ops of modsplit.compact; no autograd
    "sparse_linear": ("(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias=None, "
                      "bool relu=False) -> Tensor"),
    "sparse_linear_chain": ("(Tensor x, Tensor layout, Tensor row_ptr, Tensor col_idx, "
                            "Tensor values, Tensor bias) -> Tensor"),
    "sparse_conv2d": ("(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, "
                      "int[2] kernel_size, int[2] stride, int[2] padding, bool relu=False) "
                      "-> Tensor"),
    # Co-training score update (modsplit.score_update): SGD-Nesterov + weight decay + stemming
    # gradient in one pass, in place; returns float64 [K] sums of |S - A| (zeros without anchor).
    "cotrain_sgd_step_": ("(Tensor(a!) scores, Tensor(b!) momentum_buffer, Tensor grad, "
                          "Tensor? anchor, float lr, float momentum, float weight_decay, "
                          "float stem_coef, bool nesterov, bool init_buffer, bool sign_grad) "
                          "-> Tensor"),
    # The same update fused with the next top-k mask of the updated scores (the mask of
    # multi_topk_mask(scores, density)); bracket float64 [K, 2] (threshold, half-width) is read and
    # written. Returns (float64 [K] sums of |S - A|, int32 [K, O, ceil(R/32)] packed masks).
    "cotrain_sgd_topk_step_": ("(Tensor(a!) scores, Tensor(b!) momentum_buffer, Tensor grad, "
                               "Tensor? anchor, float lr, float momentum, float weight_decay, "
                               "float stem_coef, bool nesterov, bool init_buffer, bool sign_grad, "
                               "float density, Tensor(c!) bracket) -> (Tensor, Tensor)"),
    # Training-mode BatchNorm with per-module-group batch statistics (modsplit.module_norm):
    # x [G*N, C, *] (G groups of N rows), weight / bias [C] -> (y like x, mean [G, C],
    # invstd [G, C]).
    # relu: ReLU on y in the same pass; the backward's out (y under relu) applies its gradient.
    # offsets: int64 [G+1] rising from 0 to x's rows: ragged groups (group g: rows offsets[g] ..
    # offsets[g+1] - 1; one without rows gets mean 0, invstd 1/sqrt(1 + eps)).
    "module_batch_norm": ("(Tensor x, int groups, Tensor? weight, Tensor? bias, float eps, "
                          "bool relu=False, Tensor? offsets=None) -> (Tensor, Tensor, Tensor)"),
    "module_batch_norm_backward": ("(Tensor grad_y, Tensor x, int groups, Tensor? weight, "
                                   "Tensor mean, Tensor invstd, bool[3] output_mask, "
                                   "Tensor? out=None, Tensor? offsets=None) "
                                   "-> (Tensor, Tensor, Tensor)"),
    # A per-(group, channel) affine map, then ReLU with relu (BatchNorm in eval mode and the ReLU
    # after it; modsplit.fused_layers): x [G*N, C, *], scale / shift [G, C] -> y like x. The
    # backward gives grad_x only (out: the forward's output, needed with relu).
    "channel_affine": "(Tensor x, int groups, Tensor scale, Tensor shift, bool relu=False) -> Tensor",
    "channel_affine_backward": ("(Tensor grad_y, Tensor? out, int groups, Tensor scale, "
                                "bool relu) -> Tensor"),
    # nn.MaxPool2d(2): x [N, C, H, W] -> (y [N, C, H/2, W/2], indices uint8 [N, C, H/2, W/2],
    # the window position 2*dy + dx of each maximum).
    "max_pool2x2": "(Tensor x) -> (Tensor, Tensor)",
    "max_pool2x2_backward": "(Tensor grad_y, Tensor indices, SymInt[2] input_size) -> Tensor",
    # Co-training's grafting layers + class-weighted cross-entropy (modsplit.ops.graft):
    # logits [K, R, N], weight [K, N, 2], bias [K, 2], positive bool [K, R], row_weight [K, R]
    # -> (out [K, R, 2], ce [K] = scale * sum_r row_weight * CE(out, 0 if positive else 1)).
    "graft_cross_entropy": ("(Tensor logits, Tensor weight, Tensor bias, Tensor positive, "
                            "Tensor row_weight, float scale) -> (Tensor, Tensor)"),
    "graft_cross_entropy_backward": ("(Tensor grad_ce, Tensor logits, Tensor weight, Tensor out, "
                                     "Tensor positive, Tensor row_weight, float scale, "
                                     "bool[3] output_mask) -> (Tensor, Tensor, Tensor)"),
}

# Ops with compiled kernels on the CPU only (elsewhere modsplit.ops runs their torch-backend twins).
CPU_ONLY = ("sparse_linear", "sparse_linear_chain", "sparse_conv2d", "module_batch_norm",
            "module_batch_norm_backward", "channel_affine", "channel_affine_backward",
            "max_pool2x2", "max_pool2x2_backward", "graft_cross_entropy",
            "graft_cross_entropy_backward", "multi_masked_linear_grad_scores_",
            "ragged_masked_linear_grad_scores_")

_LIBRARY = torch.library.Library("modsplit", "DEF")  # noqa: TOR901 (kept alive: owns the defs)
for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(_name + _schema)
