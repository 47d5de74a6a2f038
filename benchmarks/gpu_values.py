"""Value checks of the GPU kernels against modsplit.reference (a step of gpu_check.py).

    python benchmarks/gpu_values.py          # odd sizes, a side stream, CUDA-graph capture
    python benchmarks/gpu_values.py --tiny   # every op once on tiny shapes (compute-sanitizer)

Odd sizes: (O, I) in {(1, 1), (31, 33), (4097, 4099)}, rows M in {1, 5, 16, 17, 300} (both sides
of the fused-row threshold), K in {1, 9, 10}, shared and per-module inputs, bfloat16 and float32,
backends cuda and triton; forward and grad_x, against the float64 reference on the GPU, with
flash-attention's bound (twice the reference's own error in the same dtype, plus a floor). Prints
one line per failure and a summary; exit status 1 on any failure.
Ragged: ragged_masked_linear and its backward (K = 10 modules on rows sampled from a batch of 32,
modules with few rows (fused kernel, split-K for a long I) and many (expanded), with and without
rows), backends cuda and triton in bfloat16 / float32, cuda also in float64; ragged_masked_conv2d
and its backward (a small VGG layer, modules with and without rows) on the same backends.
"""
import argparse
import sys

import torch

from modsplit import backend, ops
from modsplit import reference as ref

FLOOR = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-3,  # float32: TF32 allowed
         torch.float64: 1e-9}


def _bound_ok(got, want64, low):
    scale = max(1.0, want64.abs().max().item())
    ref_err = (low.double() - want64).abs().max().item()
    err = (got.double() - want64).abs().max().item()
    return err <= 2 * ref_err + FLOOR[got.dtype] * scale, err


def check_linear(name, o, i, m, k, shared, dtype):
    """Forward and grad_x of multi_masked_linear on backend `name`; '' or a failure line."""
    dev = "cuda"
    w = torch.randn(o, i, device=dev)
    packed = ref.multi_topk_mask(torch.randn(k, o, i, device=dev), 0.3)
    x = torch.randn(*(() if shared else (k,)), m, i, device=dev)
    b = torch.randn(o, device=dev)
    g = torch.randn(k, m, o, device=dev)
    lw, lx, lb, lg = (t.to(dtype) for t in (w, x, b, g))
    with backend.use(name):
        y = ops.multi_masked_linear(lx, lw, packed, lb, shared)
        gx = backend.ops_for(lx).multi_masked_linear_backward(lg, lx, lw, packed, shared,
                                                              [True, False, False])[0]
    want_y = ref.multi_masked_linear(lx.double(), lw.double(), packed, lb.double(), shared)
    low_y = ref.multi_masked_linear(lx, lw, packed, lb, shared)
    want_gx = ref.multi_masked_linear_backward(lg.double(), lx.double(), lw.double(), packed,
                                               shared)[0]
    low_gx = ref.multi_masked_linear_backward(lg, lx, lw, packed, shared)[0]
    ok_y, err_y = _bound_ok(y, want_y, low_y)
    ok_gx, err_gx = _bound_ok(gx, want_gx, low_gx)
    if ok_y and ok_gx:
        return ""
    return (f"FAIL {name} {dtype} O={o} I={i} M={m} K={k} shared={shared}: "
            f"y err {err_y:.3g} ok={ok_y}, grad_x err {err_gx:.3g} ok={ok_gx}")


def odd_sizes():
    failures, count = [], 0
    for name in ("cuda", "triton"):
        for dtype in (torch.bfloat16, torch.float32):
            for o, i in ((1, 1), (31, 33), (4097, 4099)):
                for m in (1, 5, 16, 17, 300):
                    for k in (1, 9, 10):
                        if o > 4000 and m == 300 and k > 1 and dtype == torch.float32:
                            continue  # the float64 reference alone would take most of the step
                        for shared in (True, False):
                            count += 1
                            line = check_linear(name, o, i, m, k, shared, dtype)
                            if line:
                                failures.append(line)
                                print(line, flush=True)
    print(f"odd sizes: {count - len(failures)}/{count} cases within the bound")
    return not failures


RAGGED_FEW = [3, 8, 1, 0, 12, 4, 6, 2, 9, 5]  # at most 16 rows per module: the fused kernel
RAGGED_MANY = [32, 17, 0, 40, 5, 32, 64, 1, 20, 32]  # above it: the expanded path
RAGGED_CASES = ((257, 784, RAGGED_FEW, True), (257, 784, RAGGED_MANY, True),
                (31, 33, RAGGED_FEW, False), (9, 4096, RAGGED_FEW, True))  # (O, I, counts, rows)


def _verdict(what, outputs, want, low):
    """'' or a failure line: each of (y, grad_x, grad_scores, grad_bias) within _bound_ok of the
    float64 reference `want` (`low`: the reference in the outputs' dtype)."""
    bad = []
    for label, a, w64, lo in zip(("y", "grad_x", "grad_scores", "grad_bias"), outputs, want, low):
        ok, err = _bound_ok(a, w64, lo) if a.shape == w64.shape else (False, float("nan"))
        if not ok:
            bad.append(f"{label} err {err:.3g} shape {list(a.shape)}")
    return f"FAIL {what}: " + ", ".join(bad) if bad else ""


def check_ragged(name, o, i, counts, with_rows, dtype):
    """ragged_masked_linear and the three gradients of its backward on backend `name`, K =
    len(counts) modules on rows drawn from a batch of 32 (or x's own rows); '' or a failure line."""
    dev, k, t = "cuda", len(counts), sum(counts)
    w = torch.randn(o, i, device=dev)
    packed = ref.multi_topk_mask(torch.randn(k, o, i, device=dev), 0.3)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device=dev)
    rows = torch.randint(0, 32, (t,), device=dev) if with_rows else None
    x = torch.randn(32 if with_rows else t, i, device=dev)
    b = torch.randn(o, device=dev)
    g = torch.randn(t, o, device=dev)
    lw, lx, lb, lg = (v.to(dtype) for v in (w, x, b, g))
    what = f"{name} {dtype} O={o} I={i} K={k} counts={counts} rows={with_rows}"
    try:
        with backend.use(name):
            y = ops.ragged_masked_linear(lx, lw, packed, offsets, rows, lb)
            got = backend.ops_for(lx).ragged_masked_linear_backward(lg, lx, lw, packed, offsets,
                                                                    rows, [True, True, True])
    except Exception as exc:  # reported as a failure, and the other cases still run
        return f"FAIL {what}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    want = (ref.ragged_masked_linear(lx.double(), lw.double(), packed, offsets, rows, lb.double()),
            *ref.ragged_masked_linear_backward(lg.double(), lx.double(), lw.double(), packed,
                                               offsets, rows))
    low = (ref.ragged_masked_linear(lx, lw, packed, offsets, rows, lb),
           *ref.ragged_masked_linear_backward(lg, lx, lw, packed, offsets, rows))
    return _verdict(what, (y, *got), want, low)


RAGGED_CONV_CASES = ((16, 32, 16, [6, 0, 9, 4], True), (3, 16, 32, [1, 2, 0], False))  # C, O, HW


def check_ragged_conv(name, c, o, hw, counts, with_rows, dtype):
    """ragged_masked_conv2d (3x3, padding 1) and the three gradients of its backward on backend
    `name`; '' or a failure line."""
    dev, k, t = "cuda", len(counts), sum(counts)
    w = torch.randn(o, c, 3, 3, device=dev)
    packed = ref.multi_topk_mask(torch.randn(k, o, c, 3, 3, device=dev), 0.3)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device=dev)
    rows = torch.randint(0, 8, (t,), device=dev) if with_rows else None
    x = torch.randn(8 if with_rows else t, c, hw, hw, device=dev)
    b, g = torch.randn(o, device=dev), torch.randn(t, o, hw, hw, device=dev)
    lw, lx, lb, lg = (v.to(dtype) for v in (w, x, b, g))
    args = ([1, 1], [1, 1], [1, 1], 1)
    what = f"{name} {dtype} conv C={c} O={o} {hw}x{hw} counts={counts} rows={with_rows}"
    try:
        with backend.use(name):
            y = ops.ragged_masked_conv2d(lx, lw, packed, offsets, rows, lb, *args)
            got = backend.ops_for(lx).ragged_masked_conv2d_backward(
                lg, lx, lw, packed, offsets, rows, *args, [True, True, True])
    except Exception as exc:  # reported as a failure, and the other cases still run
        return f"FAIL {what}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    up = [v.double() for v in (lx, lw, lb, lg)]
    want = (ref.ragged_masked_conv2d(up[0], up[1], packed, offsets, rows, up[2], *args),
            *ref.ragged_masked_conv2d_backward(up[3], up[0], up[1], packed, offsets, rows, *args))
    low = (ref.ragged_masked_conv2d(lx, lw, packed, offsets, rows, lb, *args),
           *ref.ragged_masked_conv2d_backward(lg, lx, lw, packed, offsets, rows, *args))
    return _verdict(what, (y, *got), want, low)


def ragged():
    failures, count = [], 0
    for name, dtypes in (("cuda", (torch.bfloat16, torch.float32, torch.float64)),
                         ("triton", (torch.bfloat16, torch.float32))):
        for dtype in dtypes:
            for o, i, counts, with_rows in RAGGED_CASES:
                count += 1
                line = check_ragged(name, o, i, counts, with_rows, dtype)
                if line:
                    failures.append(line)
                    print(line, flush=True)
            for c, o, hw, counts, with_rows in RAGGED_CONV_CASES:
                count += 1
                line = check_ragged_conv(name, c, o, hw, counts, with_rows, dtype)
                if line:
                    failures.append(line)
                    print(line, flush=True)
    print(f"ragged: {count - len(failures)}/{count} cases within the bound")
    return not failures


def stream_and_graph():
    """The ops on a non-default stream, and topk + linear captured in a CUDA graph and replayed,
    give the default stream's results."""
    w = torch.randn(257, 300, device="cuda", dtype=torch.bfloat16)
    scores = torch.randn(10, 257, 300, device="cuda")
    x = torch.randn(5, 300, device="cuda", dtype=torch.bfloat16)
    ok = True
    for name in ("cuda", "triton"):
        with backend.use(name):
            packed = ops.multi_topk_mask(scores, 0.3)
            want = ops.multi_masked_linear(x, w, packed, None, True)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                p2 = ops.multi_topk_mask(scores, 0.3)
                y2 = ops.multi_masked_linear(x, w, p2, None, True)
            torch.cuda.current_stream().wait_stream(side)
            same_stream = torch.equal(p2, packed) and torch.equal(y2, want)
            graph = torch.cuda.CUDAGraph()
            static_scores = scores.clone()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (allocations, autotuning) outside capture
                ops.multi_masked_linear(x, w, ops.multi_topk_mask(static_scores, 0.3), None, True)
            torch.cuda.current_stream().wait_stream(side)
            try:
                with torch.cuda.graph(graph):
                    gp = ops.multi_topk_mask(static_scores, 0.3)
                    gy = ops.multi_masked_linear(x, w, gp, None, True)
                static_scores.copy_(scores)
                graph.replay()
                torch.cuda.synchronize()
                captured = torch.equal(gp, packed) and torch.equal(gy, want)
                why = ""
            except Exception as exc:  # reported, not hidden: capture must work
                captured, why = False, f" ({type(exc).__name__}: {exc})".splitlines()[0]
        print(f"{name}: non-default stream {'ok' if same_stream else 'MISMATCH'}; "
              f"CUDA graph {'ok' if captured else 'FAILED' + why}")
        ok &= same_stream and captured
    return ok


def tiny():
    """Every op once on tiny shapes, on the selected backend (for compute-sanitizer)."""
    w = torch.randn(7, 37, device="cuda")
    p = ops.multi_topk_mask(torch.randn(3, 7, 37, device="cuda"), 0.4)
    ops.unpack_mask(ops.pack_mask(ops.unpack_mask(p, (3, 7, 37)), 1), (3, 7, 37))
    for m in (2, 20):  # both paths
        x = torch.randn(3, m, 37, device="cuda")
        y = ops.multi_masked_linear(x, w, p, None, False)
        backend.ops_for(x).multi_masked_linear_backward(torch.ones_like(y), x, w, p, False,
                                                        [True, True, True])
    cw = torch.randn(6, 2, 3, 3, device="cuda")
    cp = ops.multi_topk_mask(torch.randn(3, 6, 2, 3, 3, device="cuda"), 0.4)
    cx = torch.randn(2, 4, 9, 9, device="cuda")
    cy = ops.multi_masked_conv2d(cx, cw, cp, None, [1, 1], [1, 1], [1, 1], 2)
    backend.ops_for(cx).multi_masked_conv2d_backward(torch.ones_like(cy), cx, cw, cp, [1, 1],
                                                     [1, 1], [1, 1], 2, [True, True, True])
    rx = torch.randn(5, 37, device="cuda")
    rows = torch.tensor([4, 0, 0, 2, 1, 3, 4, 4] + [1, 2] * 9, device="cuda")
    for counts in ([2, 0, 6], [20, 6, 0]):  # both paths
        offsets = torch.tensor([0, counts[0], counts[0] + counts[1], sum(counts)], device="cuda")
        ry = ops.ragged_masked_linear(rx, w, p, offsets, rows[:sum(counts)], None)
        backend.ops_for(rx).ragged_masked_linear_backward(torch.ones_like(ry), rx, w, p, offsets,
                                                          rows[:sum(counts)], [True, True, True])
    cxr = torch.randn(3, 4, 9, 9, device="cuda")
    coffsets = torch.tensor([0, 2, 2, 5], device="cuda")
    crows = torch.tensor([2, 0, 1, 1, 2], device="cuda")
    cyr = ops.ragged_masked_conv2d(cxr, cw, cp, coffsets, crows, None, [1, 1], [1, 1], [1, 1], 2)
    backend.ops_for(cxr).ragged_masked_conv2d_backward(torch.ones_like(cyr), cxr, cw, cp, coffsets,
                                                       crows, [1, 1], [1, 1], [1, 1], 2,
                                                       [True, True, True])
    torch.cuda.synchronize()
    print("tiny: every op ran")
    return True


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 3
    if args.tiny:
        return 0 if tiny() else 1
    torch.manual_seed(0)
    ok = stream_and_graph()
    ok &= odd_sizes()
    ok &= ragged()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
