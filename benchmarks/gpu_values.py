"""Value checks of the GPU kernels against modsplit.reference (a step of gpu_check.py).

    python benchmarks/gpu_values.py          # odd sizes, a side stream, CUDA-graph capture
    python benchmarks/gpu_values.py --tiny   # every op once on tiny shapes (compute-sanitizer)

Odd sizes: (O, I) in {(1, 1), (31, 33), (4097, 4099)}, rows M in {1, 5, 16, 17, 300} (both sides
of the fused-row threshold), K in {1, 9, 10}, shared and per-module inputs, bfloat16 and float32,
backends cuda and triton; forward and grad_x, against the float64 reference on the GPU, with
flash-attention's bound (twice the reference's own error in the same dtype, plus a floor). Prints
one line per failure and a summary; exit status 1 on any failure.
"""
import argparse
import sys

import torch

from modsplit import backend, ops
from modsplit import reference as ref

FLOOR = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-3}  # float32: TF32 allowed


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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
