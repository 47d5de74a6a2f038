"""One co-training step of K modules: modsplit vs the batched pure-PyTorch version a competent
user writes (eager and under torch.compile; the better one is the baseline).

Run: python benchmarks/bench_cotrain.py [--workload fc1|conv|all] [--rounds 7] [--json out.json]
(`python -m pytest benchmarks/bench_cotrain.py` runs the first-step equality check only).

Workloads (density 0.1, batch 32, SGD lr 0.1 / Nesterov 0.9 / weight decay 5e-4, graft lr 0.01,
class-weighted CE + stemming term alpha 1, p 1 against a fixed anchor, as in epochs >= 2):
  fc1   FC1 (784-49-10) on MNIST, K = 10
  conv  small_vgg(3, 10, width 16) (4 conv 3x3 + BN, 16/32 channels, GAP, Linear) on CIFAR-10,
        K = 10, the BatchNorms frozen (the base model's statistics, batchnorm="frozen")
  conv-mbn  the same with per-module batch statistics (batchnorm="module", decompose's
        default: modsplit's ModuleBatchNorm in training mode; the batched side's F.batch_norm
        in training mode over its [B, K*C, H, W] activations)
  fc2, fc3, fc4   FC2-FC4 on MNIST, K = 10; mnist2  mnist2_fc(hidden 64) on two-digit MNIST,
        K = 100 (for the sampled-negatives row: --ratio r)

Sides, all timed on the same pre-drawn batches, interleaved round by round in this process
(same threads, one warm-up round each, min and median of the per-step time over the rounds):
  modsplit              modsplit.decompose's own step (decompose.train_step), modsplit's
                        kernels and score update;
  batched eager         one score tensor [K, *W.shape] per layer; per step a batched top-k
                        threshold (torch.topk along dim 1 of |S| flattened per module), the float
                        mask made straight-through (m + |S| - |S|.detach()), W*M for all K at
                        once; the first layer's input is shared, so it is one GEMM / one conv
                        with the K modules folded into the output channels, later Linear layers
                        one torch.baddbmm, later convs one grouped F.conv2d (groups = K) on
                        activations kept as [B, K*C, H, W] (BatchNorm with its statistics
                        repeated K times); one torch.optim.SGD (the fastest of its CPU
                        implementations, chosen per run), the same loss;
  batched compiled      the same forward + loss under torch.compile, and the optimizer step
                        compiled too (torch.compile(opt.step));
  modsplit, sampled     (extra row with --ratio r) decompose's step with sampled negatives
                        (each module runs on its own rows only: ragged_masked_linear in
                        modsplit.chain_step for a masked MLP, MultiModuleNet.forward_ragged
                        for a conv net);
  modsplit, sampled negatives, padded rows  (extra row with --ratio and --unfused-row) the same
                        with every module on the rows of the widest, padded to [K, m]
                        (train_step(ragged=False): the step before stop 18 (FC) / 19 (conv));
  modsplit, top-k not fused   (extra row with --unfused-row) decompose's step with
                        fuse_topk=False: the top-k of the next forward instead of the one fused
                        into the score update (the step before stop 14);
  modsplit, layers not fused  (extra row with --unfused-row) decompose's step on the network
                        itself instead of its fused view (MultiModuleNet.fuse_layers = False:
                        BatchNorm, ReLU and max-pool as ATen ops; the step before stop 16);
  modsplit, autograd step  (extra row with --unfused-row, FC workloads) decompose's step with
                        direct=False: the masked MLP's gradients through autograd instead of
                        the direct op calls of modsplit.chain_step (the step before stop 17);
  per-module loop       (extra row, FC1 only) K separate edge-popup models with a sort-based
                        GetSubnet and one optimizer each.
Before timing, one step of every side from the same scores and grafts is checked to give the same
masks and the same loss (allclose).
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modsplit import DecomposeConfig, Grafts, convert  # noqa: E402
from modsplit.decompose import make_optimizer, sample_rows, train_step  # noqa: E402
from modsplit.reference import keep_count  # noqa: E402

K, DENSITY, BATCH, ALPHA, P = 10, 0.1, 32, 1.0, 1.0
LR, GRAFT_LR, MOMENTUM, WD = 0.1, 0.01, 0.9, 5e-4


# ---- workloads ----------------------------------------------------------------------------------

# Workloads: name -> number of classes = K (the conv net is "conv").
WORKLOADS = {"fc1": 10, "fc2": 10, "fc3": 10, "fc4": 10, "mnist2": 100, "conv": 10,
             "conv-mbn": 10}


def workload(name, steps, seed=0):
    """(model (eval), batches [(x, y)] * steps, class weights (w_pos [K], w_neg [K]), class
    counts [K])."""
    from modsplit.app.data import load_dataset
    from modsplit.app.models import FC1, FC2, FC3, FC4, mnist2_fc, small_vgg
    from modsplit.app.train import train_classifier
    torch.manual_seed(seed)
    fcs = {"fc1": FC1, "fc2": FC2, "fc3": FC3, "fc4": FC4}
    if name in fcs:
        data = load_dataset("mnist", "train", limit=2000)
        model = train_classifier(fcs[name](784, 10), data, epochs=2, lr=0.05, batch_size=32,
                                 seed=seed, progress=False)
    elif name == "mnist2":
        data = load_dataset("mnist2", "train", limit=4000)
        model = train_classifier(mnist2_fc(hidden=64), data, epochs=1, lr=0.05, batch_size=32,
                                 seed=seed, progress=False)
    else:
        data = load_dataset("cifar10", "train", limit=2000)
        model = train_classifier(small_vgg(3, 10, 16), data, epochs=1, lr=0.05, batch_size=32,
                                 seed=seed, progress=False)
    model.eval()
    x, y = data.tensors
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    batches = [(x[order[i * BATCH:(i + 1) * BATCH]], y[order[i * BATCH:(i + 1) * BATCH]])
               for i in range(steps)]
    counts = torch.bincount(y, minlength=K).float()
    n = counts.sum()
    return model, batches, ((n / (2 * counts)), (n / (2 * (n - counts)))), counts


def _weighted_ce(out, positive, weights):
    w_pos, w_neg = weights
    ce = F.cross_entropy(out.flatten(0, 1), (~positive).long().flatten(),
                         reduction="none").view_as(positive)
    return (torch.where(positive, w_pos[:, None], w_neg[:, None]) * ce).mean(1)


# ---- the batched pure-PyTorch version -----------------------------------------------------------

def _flat_layers(model):
    """The leaf modules of a (nested) nn.Sequential, in order."""
    out = []
    for m in model.children():
        out += _flat_layers(m) if isinstance(m, nn.Sequential) else [m]
    return out


def _st_mask(scores, density):
    """Straight-through float mask of the top-k |scores| per module: forward value exactly the
    0/1 mask, gradient 1 to |scores| (so sign(S) to S)."""
    a = scores.abs()
    kth = torch.topk(a.flatten(1), keep_count(density, a[0].numel()), dim=1,
                     sorted=False).values.amin(1)
    m = (a >= kth.view(-1, *([1] * (a.dim() - 1)))).to(a.dtype)
    return m + (a - a.detach())


class Batched(nn.Module):
    """The K-module network as a competent PyTorch user writes it (see the module docstring).
    forward(x [B, ...]) -> logits [K, B, N]."""

    def __init__(self, model, scores, density, batch_stats=False):
        super().__init__()
        self.layers = _flat_layers(copy.deepcopy(model).requires_grad_(False))
        self.density, self.batch_stats = density, batch_stats
        self.scores = nn.ParameterList([nn.Parameter(s.detach().clone()) for s in scores])
        for i, m in enumerate(self.layers):  # BatchNorm statistics repeated for the K modules
            if isinstance(m, nn.BatchNorm2d):
                for name in ("running_mean", "running_var", "weight", "bias"):
                    self.register_buffer(f"bn{i}_{name}", getattr(m, name).detach().repeat(K))

    def masks(self):
        return [_st_mask(s, self.density) for s in self.scores]

    def forward(self, x):
        b, layout, masks = x.shape[0], "shared", iter(self.masks())
        for i, m in enumerate(self.layers):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                wm = m.weight * next(masks)  # [K, O, ...]
                if layout == "shared":  # one GEMM / conv, modules folded into the out channels
                    wf = wm.reshape(K * m.weight.shape[0], *m.weight.shape[1:])
                    bias = m.bias.repeat(K) if m.bias is not None else None
                    if isinstance(m, nn.Linear):
                        x = F.linear(x, wf, bias).view(b, K, -1).transpose(0, 1)
                        layout = "rows"
                    else:
                        x = F.conv2d(x, wf, bias, m.stride, m.padding, m.dilation)
                        layout = "conv"
                elif isinstance(m, nn.Linear):  # rows [K, B, I]
                    bias = m.bias.view(1, 1, -1) if m.bias is not None else x.new_zeros(1, 1, 1)
                    x = torch.baddbmm(bias, x, wm.transpose(1, 2))
                else:  # conv [B, K*C, H, W]: one grouped conv
                    bias = m.bias.repeat(K) if m.bias is not None else None
                    x = F.conv2d(x, wm.reshape(-1, *m.weight.shape[1:]), bias, m.stride,
                                 m.padding, m.dilation, K)
            elif isinstance(m, nn.BatchNorm2d) and self.batch_stats:  # per (module, channel)
                x = F.batch_norm(x, None, None, getattr(self, f"bn{i}_weight"),
                                 getattr(self, f"bn{i}_bias"), True, 0.0, m.eps)
            elif isinstance(m, nn.BatchNorm2d):
                x = F.batch_norm(x, *(getattr(self, f"bn{i}_{n}") for n in
                                      ("running_mean", "running_var", "weight", "bias")),
                                 False, 0.0, m.eps)
            elif isinstance(m, nn.Flatten):
                if layout == "conv":
                    x = x.reshape(b, K, -1).transpose(0, 1)
                    layout = "rows"
                elif layout == "shared":
                    x = x.flatten(1)
            elif isinstance(m, nn.Dropout):
                continue  # eval mode
            else:  # ReLU, pooling: elementwise / per channel in any layout
                x = m(x)
        return x


def batched_loss(net, grafts, x, y, classes, weights, anchors):
    """(loss, out [K, B, 2], ce [K], stem [K]) of the batched network."""
    positive = y.unsqueeze(0) == classes.unsqueeze(1)
    out = grafts(net(x))
    ce = _weighted_ce(out, positive, weights)
    per_module = sum(s[0].numel() for s in net.scores)
    stem = sum((s - a).abs().flatten(1).sum(1) for s, a in zip(net.scores, anchors)) / per_module
    return (ce + ALPHA * stem).sum(), out, ce, stem


def _sgd(params_lr, **impl):
    return torch.optim.SGD([{"params": p, "lr": lr} for p, lr in params_lr], lr=LR,
                           momentum=MOMENTUM, nesterov=True, weight_decay=WD, **impl)


def fastest_sgd_impl(scores, rounds=20):
    """The fastest torch.optim.SGD implementation on these score shapes: {} (the default
    for-loop), foreach=True or fused=True (where the build supports it on the CPU)."""
    best, best_t = {}, float("inf")
    for impl in ({}, {"foreach": True}, {"fused": True}):
        ps = [nn.Parameter(s.detach().clone()) for s in scores]
        try:
            opt = _sgd([(ps, LR)], **impl)
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        except (RuntimeError, ValueError):
            continue
        t0 = time.perf_counter()
        for _ in range(rounds):
            opt.step()
        t = time.perf_counter() - t0
        if t < best_t:
            best, best_t = impl, t
    return best


class BatchedSide:
    """The batched pure-PyTorch co-training step, eager or compiled."""

    def __init__(self, model, scores, grafts, classes, weights, anchors, compiled, sgd_impl,
                 batch_stats=False):
        self.net = Batched(model, scores, DENSITY, batch_stats)
        self.grafts = copy.deepcopy(grafts)
        self.classes, self.weights, self.anchors = classes, weights, anchors
        self.opt = _sgd([(list(self.net.scores), LR), (list(self.grafts.parameters()), GRAFT_LR)],
                        **sgd_impl)
        self.loss_fn = torch.compile(batched_loss) if compiled else batched_loss
        self.opt_step = torch.compile(self.opt.step) if compiled else self.opt.step

    def step(self, x, y):
        loss, out, ce, stem = self.loss_fn(self.net, self.grafts, x, y, self.classes,
                                           self.weights, self.anchors)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_step()
        return out.detach(), ce.detach(), stem.detach()

    def masks(self):
        return [(m.detach() > 0.5) for m in self.net.masks()]


class ModsplitSide:
    """decompose's own step on a converted network; ratio: sampled negatives (neg_ratio) with
    decompose's inclusion probabilities min(1, B n_c / n)."""

    def __init__(self, model, net, grafts, classes, weights, anchors, ratio=None, counts=None,
                 fuse_topk=True, fuse_layers=True, direct=True, ragged=True):
        self.net, self.grafts = copy.deepcopy(net), copy.deepcopy(grafts)
        self.net.fuse_layers = fuse_layers
        self.fuse_topk, self.direct, self.ragged = fuse_topk, direct, ragged
        self.classes, self.weights, self.anchors = classes, weights, anchors
        self.ratio, self.steps = ratio, 0
        if ratio is not None:
            self.inclusion = (BATCH * counts / counts.sum()).clamp(max=1).float()
        cfg = DecomposeConfig.build(None, K, lr=LR, graft_lr=GRAFT_LR, momentum=MOMENTUM,
                                    weight_decay=WD, alpha=ALPHA, p=P, density=DENSITY)
        self.opt = make_optimizer(self.net, self.grafts, cfg)

    def step(self, x, y):
        rows = None
        if self.ratio is not None:
            gen = torch.Generator().manual_seed(self.steps)
            rows = sample_rows(y, self.classes, self.weights, self.ratio, self.inclusion, gen)
        self.steps += 1
        out, _, ce, stem, _ = train_step(self.net, self.grafts, self.opt, x, y, self.classes,
                                         self.weights, ALPHA, P, self.anchors, rows,
                                         fuse_topk=self.fuse_topk, direct=self.direct,
                                         ragged=self.ragged)
        return out, ce, stem

    def masks(self):
        from modsplit import ops
        return [ops.unpack_mask(m.masks(), m.scores.shape)
                for m in self.net.masked_layers().values()]


# ---- the per-module loop (extra row) ------------------------------------------------------------

class _SortSubnet(torch.autograd.Function):
    """Edge-popup's GetSubnet: 1 for the top `density` share of |scores| (full sort), else 0;
    the gradient passes straight through."""

    @staticmethod
    def forward(ctx, scores, density):
        flat = scores.flatten()
        order = flat.sort().indices
        mask = torch.zeros_like(flat)
        mask[order[flat.numel() - keep_count(density, flat.numel()):]] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class LoopSide:
    """K separate edge-popup FC models, each with its own optimizer (FC1 only)."""

    def __init__(self, model, scores, grafts, classes, weights, anchors):
        layers = [m for m in _flat_layers(model) if isinstance(m, nn.Linear)]
        self.weights, self.anchors, self.classes = weights, anchors, classes
        self.mods = []
        for k in range(K):
            s = [nn.Parameter(sc[k].detach().clone()) for sc in scores]
            g = nn.Parameter(grafts.weight[k].detach().clone())
            gb = nn.Parameter(grafts.bias[k].detach().clone())
            opt = _sgd([(s, LR), ([g, gb], GRAFT_LR)])
            self.mods.append((s, g, gb, opt))
        self.layers = layers

    def step(self, x, y):
        per_module = sum(l.weight.numel() for l in self.layers)
        w_pos, w_neg = self.weights
        for k, (s, g, gb, opt) in enumerate(self.mods):
            h = x.flatten(1)
            for i, (layer, sk) in enumerate(zip(self.layers, s)):
                h = F.linear(h, layer.weight * _SortSubnet.apply(sk.abs(), DENSITY), layer.bias)
                h = torch.relu(h) if i < len(self.layers) - 1 else h
            out = h @ g + gb
            positive = y == self.classes[k]
            ce = F.cross_entropy(out, (~positive).long(), reduction="none")
            ce = (torch.where(positive, w_pos[k], w_neg[k]) * ce).mean()
            stem = sum((sk - a).abs().sum() for sk, a in zip(s, self.anchors)) / per_module
            opt.zero_grad(set_to_none=True)
            (ce + ALPHA * stem).backward()
            opt.step()


# ---- driver -------------------------------------------------------------------------------------

def check_first_step(sides, batch, atol=1e-5):
    """Every side computes the same masks and the same loss terms on the first step."""
    ref_name, ref = next(iter(sides.items()))
    ref_masks = [m.bool() for m in ref.masks()]
    ref_out = ref.step(*batch)
    for name, side in list(sides.items())[1:]:
        masks = side.masks()
        for a, b in zip(ref_masks, masks):
            if not torch.equal(a, b.bool()):
                raise AssertionError(f"{name}: masks differ from {ref_name}'s "
                                     f"({(a != b.bool()).sum().item()} entries)")
        out = side.step(*batch)
        for what, a, b in zip(("out", "ce", "stem"), ref_out, out):
            if not torch.allclose(a, b, atol=atol, rtol=1e-4):
                raise AssertionError(f"{name}: first-step {what} differs from {ref_name}'s "
                                     f"(max |diff| {(a - b).abs().max().item():.3g})")


def build_sides(name, steps, with_loop, compiled=True, ratio=None, unfused=False):
    model, batches, weights, counts = workload(name, steps)
    batch_stats = name == "conv-mbn"
    net = convert(model, K, DENSITY, seed=0, batchnorm="module" if batch_stats else "frozen")
    net.train_module_norms(True)  # per-module batch statistics, as decompose trains them
    scores = [s.detach() for s in net.score_parameters()]
    anchors = [s.mean(0) + 0.01 * torch.randn_like(s[0]) for s in scores]  # S_avg-like, [*W.shape]
    grafts = Grafts.init_for(range(K), K)
    classes = torch.arange(K)
    impl = fastest_sgd_impl(scores)
    sides = {"modsplit": ModsplitSide(model, net, grafts, classes, weights, anchors),
             "batched eager": BatchedSide(model, scores, grafts, classes, weights, anchors, False,
                                          impl, batch_stats)}
    if compiled:
        sides["batched compiled"] = BatchedSide(model, scores, grafts, classes, weights,
                                                anchors, True, impl, batch_stats)
    if ratio is not None:
        sides[f"modsplit, sampled negatives r={ratio:g}"] = ModsplitSide(
            model, net, grafts, classes, weights, anchors, ratio, counts)
    if unfused:
        sides["modsplit, top-k not fused"] = ModsplitSide(model, net, grafts, classes, weights,
                                                          anchors, fuse_topk=False)
        sides["modsplit, layers not fused"] = ModsplitSide(model, net, grafts, classes, weights,
                                                           anchors, fuse_layers=False)
        if net.masked_chain() is not None:
            sides["modsplit, autograd step"] = ModsplitSide(model, net, grafts, classes, weights,
                                                            anchors, direct=False)
        if ratio is not None:
            sides[f"modsplit, sampled negatives r={ratio:g}, padded rows"] = \
                ModsplitSide(model, net, grafts, classes, weights, anchors, ratio, counts,
                             ragged=False)
    if with_loop:
        sides["per-module loop"] = LoopSide(model, scores, grafts, classes, weights, anchors)
    return sides, batches, impl


def run(name, rounds, steps, with_loop, ratio=None, unfused=False):
    global K
    K = WORKLOADS[name]
    sides, batches, impl = build_sides(name, steps, with_loop, ratio=ratio, unfused=unfused)
    check_first_step({k: v for k, v in sides.items() if k in ("modsplit", "batched eager",
                                                                "modsplit, top-k not fused",
                                                                "modsplit, layers not fused",
                                                                "modsplit, autograd step",
                                                                "batched compiled")}, batches[0])
    times = {k: [] for k in sides}
    for r in range(rounds + 1):  # round 0 is the warm-up of every side
        for side_name, side in sides.items():
            t0 = time.perf_counter()
            for x, y in batches:
                side.step(x, y)
            if r:
                times[side_name].append((time.perf_counter() - t0) / len(batches) * 1e3)
    rows = {k: {"min_ms": min(v), "median_ms": statistics.median(v)} for k, v in times.items()}
    base = min(("batched eager", "batched compiled"),
               key=lambda k: rows[k]["median_ms"] if k in rows else float("inf"))
    for k, v in rows.items():
        v["ratio_median_vs_baseline"] = rows[base]["median_ms"] / v["median_ms"]
        v["ratio_min_vs_baseline"] = rows[base]["min_ms"] / v["min_ms"]
    return {"workload": name, "baseline": base, "sgd_impl": impl, "rows": rows,
            "steps_per_round": steps, "rounds": rounds}


def machine():
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="all", help="fc1, fc2, fc3, fc4, mnist2, conv, "
                    "a comma-separated list, or all (= fc1,conv)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--no-loop", action="store_true", help="skip the per-module loop row")
    ap.add_argument("--ratio", type=float, default=None,
                    help="also time modsplit with sampled negatives (neg_ratio) r")
    ap.add_argument("--unfused-row", action="store_true",
                    help="also time modsplit with the top-k not fused into the score update, "
                    "and with the layers not fused (no fused view)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--json", help="write the results there")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": machine(), "results": []}
    for name in (["fc1", "conv"] if args.workload == "all" else args.workload.split(",")):
        res = run(name, args.rounds, args.steps, name == "fc1" and not args.no_loop, args.ratio,
                  args.unfused_row)
        results["results"].append(res)
        print(f"\n{name}: K={K}, batch {BATCH}, density {DENSITY}, baseline = {res['baseline']} "
              f"(SGD {res['sgd_impl'] or 'default'}); {machine()}")
        print("| side | min ms/step | median ms/step | speed-up vs baseline (median) |")
        print("|---|---|---|---|")
        for k, v in res["rows"].items():
            print(f"| {k} | {v['min_ms']:.2f} | {v['median_ms']:.2f} | "
                  f"{v['ratio_median_vs_baseline']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def test_first_step_agrees():
    """pytest entry: every side computes the same masks and loss on the first step (FC1)."""
    sides, batches, _ = build_sides("fc1", 1, False, compiled=False)
    check_first_step(sides, batches[0])


def test_first_step_agrees_with_module_batchnorm():
    """The same with per-module batch statistics (conv-mbn): ModuleBatchNorm's kernel against
    the batched side's F.batch_norm in training mode."""
    global K
    K = WORKLOADS["conv-mbn"]
    sides, batches, _ = build_sides("conv-mbn", 1, False, compiled=False)
    check_first_step(sides, batches[0])


if __name__ == "__main__":
    main()
