"""masked_conv2d / multi_masked_conv2d against F.conv2d with a materialised W*M (CPU).

Forward and backward: the *_backward cases time the ops' backward (grad_x, grad_scores, grad_bias)
against ATen's convolution backward (oneDNN) on W*M_k, one call per module, plus the W* product
that turns dL/d(W*M) into grad_scores.

Run: python -m pytest benchmarks/bench_masked_conv2d.py --benchmark-only
Each layer is one pytest-benchmark group, so the table's ratios compare the kernel with its
baseline measured in the same run. extra_info["peak_extra_mib"] is the extra peak resident memory
of one (first) call: measured in a fresh subprocess, with the inputs built, as the peak resident
set (VmHWM, reset through /proc/self/clear_refs just before the call) minus the resident set
before it; it includes the output, the allocator's and MKL/oneDNN's buffers.
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import modsplit
from modsplit import reference

# name: (B, C, O, H, W, k, padding); density 0.1, bias, stride 1.
LAYERS = {
    "vgg_256x256_3x3_16px_b8": (8, 256, 256, 16, 16, 3, 1),
    "cifar_64x64_3x3_32px_b8": (8, 64, 64, 32, 32, 3, 1),
}
DENSITY = 0.1
K = 10


def _inputs(layer, seed=0):
    """x [B, C, H, W], weight [O, C, k, k], bias [O], packed [K, O, words], float masks [K, ...]."""
    B, C, O, H, W, k, _ = LAYERS[layer]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    weight = torch.randn(O, C, k, k, generator=g)
    bias = torch.randn(O, generator=g)
    keep = torch.rand(K, O, C, k, k, generator=g) < DENSITY
    return x, weight, bias, reference.pack_mask(keep, batch_dims=1), keep.float()


def _calls(layer):
    """name -> zero-argument callable, over the same inputs."""
    x, weight, bias, packed, masks = _inputs(layer)
    pad = LAYERS[layer][-1]
    y = modsplit.ops.multi_masked_conv2d(x, weight, packed, bias, 1, pad)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    geo = ([1, 1], [pad, pad], [1, 1])
    mask3 = [True, True, True]

    def loop_backward():
        outs = [torch.ops.aten.convolution_backward(go[k], x, weight * masks[k], [weight.shape[0]],
                                                    *geo, False, [0, 0], 1, mask3) for k in range(K)]
        return (sum(o[0] for o in outs), torch.stack([o[1] for o in outs]) * weight,
                sum(o[2] for o in outs))

    return {
        "multi_backward_K10": lambda: torch.ops.modsplit.multi_masked_conv2d_backward(
            go, x, weight, packed, *geo, 1, mask3),
        "baseline_loop_backward_K10": loop_backward,
        "masked_conv2d": lambda: modsplit.ops.masked_conv2d(x, weight, packed[0], bias, 1, pad),
        "baseline_conv2d": lambda: F.conv2d(x, weight * masks[0], bias, 1, pad),
        "multi_masked_conv2d_K10": lambda: modsplit.ops.multi_masked_conv2d(
            x, weight, packed, bias, 1, pad),
        "baseline_loop_K10": lambda: torch.stack(
            [F.conv2d(x, weight * masks[k], bias, 1, pad) for k in range(K)]),
    }


_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
import bench_masked_conv2d as b
fn = b._calls({layer!r})[{name!r}]
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident set (VmHWM) to the current one
before = status("VmRSS:")
fn()
print((status("VmHWM:") - before) / 2**20)
"""


def _peak_extra_mib(layer, name):
    root = __file__.rsplit("/", 1)[0]
    code = _PROBE.format(root=root, layer=layer, name=name)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(max(0.0, float(out.stdout.split()[-1])), 1)


@pytest.mark.parametrize("name", ["masked_conv2d", "baseline_conv2d", "multi_masked_conv2d_K10",
                                  "baseline_loop_K10", "multi_backward_K10",
                                  "baseline_loop_backward_K10"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_masked_conv2d(benchmark, layer, name):
    calls = _calls(layer)
    kind = "backward K10" if "backward" in name else "K10" if "K10" in name else "single"
    benchmark.group = f"{layer} {kind}"
    benchmark.extra_info["peak_extra_mib"] = _peak_extra_mib(layer, name)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if name.startswith("baseline"):  # the kernel must agree with the baseline it is timed against
        ref = calls[name]()
        ours = calls[{"baseline_conv2d": "masked_conv2d", "baseline_loop_K10": "multi_masked_conv2d_K10",
                      "baseline_loop_backward_K10": "multi_backward_K10"}[name]]()
        # grad_scores sums B*Ho*Wo products of O(1) terms: looser absolute tolerance backward.
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-2 if "backward" in name else 1e-3)
    benchmark.pedantic(calls[name], rounds=10, warmup_rounds=2, iterations=1)
