"""multi_topk_mask on a VGG16-sized layer bank vs two per-module PyTorch baselines.

scores: float32 [10, 512, 4608] (10 modules over a 512 x 4608 layer), density 0.1.
  ours      torch.ops.modsplit.multi_topk_mask -> packed int32 [10, 512, 144]
  sort      edge-popup style: per module, sort |scores| ascending and write 1.0 at the indices
            of the top k into a float mask (float32 [512, 4608] per module)
  kthvalue  per module, threshold = kthvalue of |scores| at rank n - k + 1, mask = |s| >= threshold
            (bool [512, 4608]; keeps every tie at the threshold, so it may keep more than k)
Time ratios come from the same run. Peak memory: for each method, a fresh Python process
creates the input, resets the kernel's peak-RSS counter (write "5" to /proc/self/clear_refs),
runs the method once and reports VmHWM (peak resident set) minus the RSS before the call, from
/proc/self/status. (resource.getrusage's ru_maxrss is the same counter but cannot be reset, and a
child started from pytest inherits pytest's larger peak, so its deltas read 0.) Linux only.

Run: python -m pytest benchmarks/bench_topk_mask.py --benchmark-only
"""
import os
import subprocess
import sys

import pytest
import torch

import modsplit  # noqa: F401  (registers the ops)

K, O, R = 10, 512, 4608
DENSITY = 0.1


def make_scores():
    """float32 [K, O, R], fixed seed."""
    return torch.randn(K, O, R, generator=torch.Generator().manual_seed(0))


def ours(scores):
    return torch.ops.modsplit.multi_topk_mask(scores, DENSITY)


def sort_baseline(scores):
    """edge-popup GetSubnet per module: float mask [O, R] with 1.0 at the top-k |scores|."""
    masks = []
    for s in scores:
        n = s.numel()
        keep = max(1, int(DENSITY * n + 0.5))
        order = s.abs().flatten().sort().indices
        mask = torch.zeros(n, dtype=s.dtype)
        mask[order[n - keep:]] = 1.0
        masks.append(mask.view_as(s))
    return masks


def kthvalue_baseline(scores):
    """kthvalue threshold per module: bool mask [O, R] of |s| >= the k-th largest |s|."""
    masks = []
    for s in scores:
        a = s.abs()
        n = a.numel()
        keep = max(1, int(DENSITY * n + 0.5))
        masks.append(a >= a.flatten().kthvalue(n - keep + 1).values)
    return masks


METHODS = {"ours": ours, "sort": sort_baseline, "kthvalue": kthvalue_baseline}
ROUNDS = {"ours": 10, "sort": 2, "kthvalue": 3}
WARMUP = {"ours": 1, "sort": 0, "kthvalue": 0}  # the baselines are slow enough without one
_times = {}


def rss_kib():
    """{'VmRSS': current, 'VmHWM': peak} resident set of this process in KiB."""
    with open("/proc/self/status") as f:
        rows = [line.split() for line in f if line.startswith(("VmRSS", "VmHWM"))]
    return {r[0].rstrip(":"): int(r[1]) for r in rows}


def _peak_rss_delta_mib(method):
    """Peak RSS increase (MiB) of running `method` once on fresh input in a new process."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            "import bench_topk_mask as b; s = b.make_scores(); "
            "r0 = b.rss_kib()['VmRSS']; open('/proc/self/clear_refs', 'w').write('5'); "
            f"b.METHODS[{method!r}](s); print(b.rss_kib()['VmHWM'] - r0)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=env).stdout
    return int(out.split()[-1]) / 1024


@pytest.mark.parametrize("method", list(METHODS))
def test_multi_topk_mask_vgg16(benchmark, summary, method):
    benchmark.group = f"topk mask {K}x{O}x{R} density {DENSITY}"
    scores = make_scores()
    benchmark.pedantic(METHODS[method], args=(scores,), rounds=ROUNDS[method],
                       warmup_rounds=WARMUP[method])
    _times[method] = (benchmark.stats.stats.min, benchmark.stats.stats.median)
    if method == "ours":  # the baselines' masks must agree with ours (kthvalue: no ties here)
        packed = ours(scores)
        dense = torch.ops.modsplit.unpack_mask(packed, list(scores.shape))
        assert torch.equal(torch.stack(kthvalue_baseline(scores)), dense)
    if len(_times) == len(METHODS):
        t_min, t_med = _times["ours"]
        summary.append(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
                       f"load average {os.getloadavg()[0]:.1f}")
        for base in ("sort", "kthvalue"):
            b_min, b_med = _times[base]
            summary.append(f"ours vs {base}: {b_min / t_min:.1f}x (min), {b_med / t_med:.1f}x "
                           f"(median); ours min {t_min * 1e3:.1f} ms, {base} min "
                           f"{b_min * 1e3:.1f} ms")
        for m in METHODS:
            summary.append(f"peak RSS increase (VmHWM) {m}: {_peak_rss_delta_mib(m):.0f} MiB")
