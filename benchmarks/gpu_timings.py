"""CUDA-event timings of the GPU path against what a user would write (a step of gpu_check.py).

    python benchmarks/gpu_timings.py [--out table.md]

Every time is the median of CUDA-event timed runs after warm-up (see _time). Bandwidth is bytes
moved / time, stated as a % of a measured device-to-device copy (bytes read + written), and
arithmetic as TFLOP/s against cuBLAS on the same shapes. Rows:
  copy              the D2D copy that sets the bandwidth ceiling
  linear K=1        4096 x 4096 bf16 at M = 1, 4, 16: modsplit (cuda, triton) vs F.linear(x, W)
                    and F.linear(x, W*M) (the mask multiply included, as a user would run it)
  linear K=10       M = 1, 16: one modsplit call vs a loop of F.linear(x, W*M_k)
  linear large      M = 256, 4096, K = 1: TFLOP/s vs F.linear(x, W) (cuBLAS)
  conv              K = 10 modules, shared input: vs one cuDNN grouped conv of pre-expanded W*M
  ragged            K = 10 modules on 8 or 32 rows each sampled from a batch of 32, 4096² bf16:
                    ragged_masked_linear (cuda, triton) vs the torch backend's twin
                    (modsplit.torch_backend.ragged_masked_linear: rows padded, batched GEMM)
  ragged conv       K = 10 modules on 13 images each sampled from a batch of 32 (sampled
                    negatives, r = 3), 64->64 3x3 32² bf16: ragged_masked_conv2d (cuda, triton)
                    vs the multi-module op on the rows padded to [K, 32] (the padded step)
  topk              10 x 4096 x 4096 scores: multi_topk_mask vs torch.topk + scatter
Design targets (kernel-notes): >= 70 % of the copy at M = 1, K = 1; >= 5x the loop at K = 10.
"""
import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from modsplit import backend, ops, torch_backend
from modsplit import reference as ref


def _time(fn, reps=20, warmup=3):
    """Median milliseconds of fn() over `reps` CUDA-event timed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth():
    """Bytes/s of a 2 GiB device-to-device copy (read + written)."""
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() * 2 / (ms * 1e-3)


def _with(name, fn):
    def run():
        with backend.use(name):
            return fn()
    return run


def linear_rows(copy_bps):
    rows = []
    n = 4096
    w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for k in (1, 10):
        packed = ref.multi_topk_mask(torch.randn(k, n, n, device="cuda"), 0.5)
        dense = ref.unpack_mask(packed, (k, n, n)).to(torch.bfloat16)
        for m in ((1, 4, 16) if k == 1 else (1, 16)):
            x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            moved = 2 * n * n + k * n * n / 8 + 2 * m * n * (1 + k)  # W, bits, x, y
            cases = {name: _with(name, lambda: ops.multi_masked_linear(x, w, packed, None, True))
                     for name in ("cuda", "triton")}
            if k == 1:
                cases["F.linear(x, W)"] = lambda: F.linear(x, w)
                cases["F.linear(x, W*M)"] = lambda: F.linear(x, w * dense[0])
            else:
                cases["loop F.linear(x, W*M_k)"] = lambda: [F.linear(x, w * d) for d in dense]
            times = {c: _time(f) for c, f in cases.items()}
            base = times["F.linear(x, W*M)" if k == 1 else "loop F.linear(x, W*M_k)"]
            for c, ms in times.items():
                gbs = moved / (ms * 1e-3)
                rows.append(f"| linear bf16 4096² K={k} M={m} | {c} | {ms * 1e3:.1f} µs | "
                            f"{gbs / 1e9:.0f} GB/s ({100 * gbs / copy_bps:.0f} % of copy) | "
                            f"{base / ms:.2f}x |")
    for m in (256, 4096):
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        packed = ref.topk_mask(torch.randn(n, n, device="cuda"), 0.5)
        flops = 2 * m * n * n
        cases = {name: _with(name, lambda: ops.masked_linear(x, w, packed)) for name in
                 ("cuda", "triton")}
        cases["F.linear(x, W) (cuBLAS)"] = lambda: F.linear(x, w)
        times = {c: _time(f) for c, f in cases.items()}
        for c, ms in times.items():
            rows.append(f"| linear bf16 4096² K=1 M={m} | {c} | {ms * 1e3:.1f} µs | "
                        f"{flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s | "
                        f"{times['F.linear(x, W) (cuBLAS)'] / ms:.2f}x |")
    return rows


def conv_rows():
    k, b, c, hw, o = 10, 32, 64, 32, 64
    x = torch.randn(b, c, hw, hw, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(o, c, 3, 3, device="cuda", dtype=torch.bfloat16)
    packed = ref.multi_topk_mask(torch.randn(k, o, c, 3, 3, device="cuda"), 0.5)
    expanded = (w * ref.unpack_mask(packed, (k, o, c, 3, 3)).to(w.dtype)).reshape(k * o, c, 3, 3)
    flops = 2 * k * b * o * c * 9 * hw * hw
    cases = {name: _with(name, lambda: ops.multi_masked_conv2d(x, w, packed, None, [1, 1], [1, 1],
                                                               [1, 1], 1))
             for name in ("cuda", "triton")}
    cases["cuDNN conv, W*M pre-expanded"] = lambda: F.conv2d(x, expanded, None, 1, 1)
    times = {c_: _time(f) for c_, f in cases.items()}
    base = times["cuDNN conv, W*M pre-expanded"]
    return [f"| conv bf16 K=10 B=32 64->64 3x3 32² | {c_} | {ms * 1e3:.1f} µs | "
            f"{flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s | {base / ms:.2f}x |"
            for c_, ms in times.items()]


def ragged_rows(copy_bps):
    k, n, batch = 10, 4096, 32
    w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    packed = torch.randint(0, 2**31 - 1, (k, n, n // 32), device="cuda", dtype=torch.int32)
    x = torch.randn(batch, n, device="cuda", dtype=torch.bfloat16)
    out = []
    for per in (8, 32):  # rows per module: the fused kernel, the expanded path
        rows = torch.randint(0, batch, (k * per,), device="cuda")
        offsets = torch.arange(0, k * per + 1, per, device="cuda")
        moved = 2 * n * n + k * n * n / 8 + 2 * 2 * k * per * n  # W, bits, x rows read, y
        cases = {name: _with(name, lambda: ops.ragged_masked_linear(x, w, packed, offsets, rows))
                 for name in ("cuda", "triton")}
        cases["torch twin"] = lambda: torch_backend.ragged_masked_linear(x, w, packed, offsets,
                                                                         rows)
        times = {}
        for c, f in cases.items():
            try:
                times[c] = _time(f)
            except Exception as exc:  # one failing implementation must not hide the others
                out.append(f"| ragged bf16 4096² K={k} {per} rows each | {c} | (error) "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0]} | | |")
        base = times.get("torch twin")
        for c, ms in times.items():
            gbs = moved / (ms * 1e-3)
            out.append(f"| ragged bf16 4096² K={k} {per} rows each | {c} | {ms * 1e3:.1f} µs | "
                       f"{gbs / 1e9:.0f} GB/s ({100 * gbs / copy_bps:.0f} % of copy) | "
                       f"{f'{base / ms:.2f}x' if base else ''} |")
    return out


def ragged_conv_rows():
    k, per, batch, c, hw, o = 10, 13, 32, 64, 32, 64
    x = torch.randn(batch, c, hw, hw, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(o, c, 3, 3, device="cuda", dtype=torch.bfloat16)
    packed = ref.multi_topk_mask(torch.randn(k, o, c, 3, 3, device="cuda"), 0.1)
    rows = torch.randint(0, batch, (k * per,), device="cuda")
    offsets = torch.arange(0, k * per + 1, per, device="cuda")
    padded = x[torch.randint(0, batch, (k, batch), device="cuda")]  # [K, 32, C, H, W]
    args = ([1, 1], [1, 1], [1, 1], 1)
    cases = {name: _with(name, lambda: ops.ragged_masked_conv2d(x, w, packed, offsets, rows, None,
                                                                *args))
             for name in ("cuda", "triton")}
    cases["multi_masked_conv2d, rows padded to [K, 32]"] = _with(
        "cuda", lambda: ops.multi_masked_conv2d(padded, w, packed, None, *args))
    times = {c_: _time(f) for c_, f in cases.items()}
    base = times["multi_masked_conv2d, rows padded to [K, 32]"]
    return [f"| ragged conv bf16 K=10 {per} rows each 64->64 3x3 32² | {c_} | {ms * 1e3:.1f} µs "
            f"| | {base / ms:.2f}x |" for c_, ms in times.items()]


def topk_rows(copy_bps):
    k, n = 10, 4096
    scores = torch.randn(k, n, n, device="cuda")
    keep = int(0.3 * n * n)

    def torch_topk():
        idx = scores.abs().reshape(k, -1).topk(keep, dim=1).indices
        return torch.zeros(k, n * n, dtype=torch.bool, device="cuda").scatter_(1, idx, True)

    cases = {name: _with(name, lambda: ops.multi_topk_mask(scores, 0.3))
             for name in ("cuda", "triton")}
    cases["torch.topk + scatter"] = torch_topk
    times = {c: _time(f, reps=5) for c, f in cases.items()}
    base = times["torch.topk + scatter"]
    moved = scores.numel() * 4
    return [f"| topk fp32 K=10 4096² d=0.3 | {c} | {ms * 1e3:.0f} µs | "
            f"{moved / (ms * 1e-3) / 1e9:.0f} GB/s of scores read once "
            f"({100 * moved / (ms * 1e-3) / copy_bps:.0f} % of copy) | {base / ms:.2f}x |"
            for c, ms in times.items()]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 3
    torch.manual_seed(0)
    copy_bps = copy_bandwidth()
    lines = [f"Device {torch.cuda.get_device_name(0)}; D2D copy {copy_bps / 1e9:.0f} GB/s "
             "(read + written). Speed-up: baseline time / this time.", "",
             "| case | implementation | median time | rate | speed-up vs baseline |",
             "|---|---|---|---|---|"]

    def emit(rows):
        lines.extend(rows)
        print("\n".join(rows), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    print("\n".join(lines), flush=True)
    failed = False
    for part in (lambda: linear_rows(copy_bps), conv_rows, lambda: ragged_rows(copy_bps),
                 ragged_conv_rows, lambda: topk_rows(copy_bps)):
        try:
            emit(part())
        except Exception as exc:  # one failing part must not hide the others' numbers
            failed = True
            emit([f"| (error) | {type(exc).__name__}: {str(exc).splitlines()[0]} | | | |"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
