"""masked_linear / multi_masked_linear (CPU, float32, 4096 x 4096, density 0.1) vs F.linear on
W*M with a float mask M (the mask is already packed for modsplit; the float mask for the
baseline is already built too).

Run: python -m pytest benchmarks/bench_masked_linear.py --benchmark-only
The ratio baseline/modsplit (medians of the same run) and the peak memory of one call are
printed at the end. Peak memory = rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over its resident set before one call. MODSPLIT_BENCH_THREADS sets
torch's thread count (default: torch's own).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from modsplit import ops
from modsplit import reference as R

O = I = 4096
DENSITY = 0.1
K = 10
_medians = {}
_peaks = {}

if os.environ.get("MODSPLIT_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MODSPLIT_BENCH_THREADS"]))


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_mib(fn):
    """MiB the resident set peaks above its starting size during one fn() call (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return float("nan")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    weight = torch.randn(O, I)
    keep = torch.rand(K, O, I) < DENSITY
    return weight, R.pack_mask(keep, batch_dims=1), keep.float()


@pytest.fixture(scope="module", autouse=True)
def report(request):
    """Prints the ratio table after the module's benchmarks (past pytest's output capture)."""
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nmasked_linear CPU, threads={torch.get_num_threads()}: "
              "ratio = baseline median / modsplit median; peak = one call's RSS rise")
        for case in sorted({c for c, _ in _medians}):
            base, ours = _medians.get((case, "baseline")), _medians.get((case, "modsplit"))
            if base and ours:
                print(f"  {case:20s} modsplit {ours * 1e3:8.2f} ms  baseline {base * 1e3:8.2f} ms"
                      f"  ratio {base / ours:6.2f}x  peak MiB modsplit "
                      f"{_peaks[(case, 'modsplit')]:6.1f} baseline {_peaks[(case, 'baseline')]:6.1f}")
        print("  packed mask bytes / float32 mask bytes = 1/32 "
              f"({O * R.words_for(I) * 4} vs {O * I * 4} per module)")


def _run(benchmark, case, impl, fn, rounds):
    benchmark.group = case
    _peaks[(case, impl)] = peak_mib(fn)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    _medians[(case, impl)] = benchmark.stats.stats.median


@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("impl", ["modsplit", "baseline"])
def test_masked_linear(benchmark, layer, impl, batch):
    weight, packed, fmask = layer
    x = torch.randn(batch, I)
    p0, m0 = packed[0].contiguous(), fmask[0].contiguous()
    if impl == "modsplit":
        fn = lambda: ops.masked_linear(x, weight, p0)  # noqa: E731
    else:
        fn = lambda: F.linear(x, weight * m0)  # noqa: E731
    _run(benchmark, f"masked_linear b{batch}", impl, fn, rounds=10 if batch == 1 else 5)


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("impl", ["modsplit", "baseline"])
def test_multi_masked_linear(benchmark, layer, impl, batch):
    weight, packed, fmask = layer
    x = torch.randn(batch, I)  # one input shared by the K modules
    if impl == "modsplit":
        fn = lambda: ops.multi_masked_linear(x, weight, packed, None, True)  # noqa: E731
    else:
        fn = lambda: torch.stack([F.linear(x, weight * m) for m in fmask])  # noqa: E731
    _run(benchmark, f"multi K={K} b{batch}", impl, fn, rounds=5 if impl == "modsplit" else 3)
