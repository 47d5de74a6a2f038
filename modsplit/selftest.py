"""`python -m modsplit.selftest [--device cuda] [--backend triton]`: every op on one device against
the pure-PyTorch reference, printed as a table; exit code 1 if any op disagrees.

A GPU user's one-command check that the installed kernels are right on their machine. Masks must
match bit for bit; float outputs and gradients must be close to the reference computed in
float64 on the CPU.
"""
import argparse
import sys

import torch

from modsplit import backend, ops
from modsplit import reference as ref

# Largest error allowed, relative to max(1, max |reference|): float16/bfloat16 round every product
# (8 / 11 significant bits), float32 may run TF32 on a GPU.
_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 1e-3, torch.float64: 1e-9}


def _cases(device, dtype):
    """(name, kernel thunk, reference thunk, exact) for every op, on odd sizes."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def dev(t):
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    scores, bank_scores = rand(37, 70), rand(3, 37, 70)
    mask = rand(3, 37, 70) > 0
    packed = ref.topk_mask(scores, 0.3)
    bank = ref.multi_topk_mask(bank_scores, 0.3)
    x, xk, w, b = rand(5, 70), rand(3, 5, 70), rand(37, 70), rand(37)
    gy = rand(3, 5, 37)
    cx, cw = rand(2, 4, 9, 9), rand(6, 2, 3, 3)
    cbank = ref.multi_topk_mask(rand(3, 6, 2, 3, 3), 0.4)
    conv = ([2, 2], [1, 1], [1, 1], 2)
    cy = ref.multi_masked_conv2d(cx, cw, cbank, None, *conv)
    cgy = rand(*cy.shape)
    # groups 1 at density 0.1: the CPU's sparse conv path
    sx, sw = rand(3, 2, 5, 9, 9), rand(7, 5, 3, 3)
    sbank = ref.multi_topk_mask(rand(3, 7, 5, 3, 3), 0.1)
    sconv = ([1, 1], [1, 1], [1, 1], 1)
    sgy = rand(3, 2, 7, 9, 9)
    nx, nw, nb, ngy = rand(12, 6, 5, 7), rand(6), rand(6), rand(12, 6, 5, 7)  # 3 groups of 4 rows
    n_mean, n_invstd = ref.module_batch_norm(nx, 3, nw, nb, 1e-5)[1:]
    # affine outputs kept at least 0.2 from 0, so that no rounding moves one across the ReLU
    ascale = torch.rand(3, 6, generator=g, dtype=torch.float64) + 0.5
    ashift, agy = rand(3, 6), rand(12, 6, 5, 7)
    target = rand(12, 6, 5, 7)
    target = target.sign() * (target.abs() + 0.2)
    ax = ((target.view(3, 4, 6, 35) - ashift[:, None, :, None])
          / ascale[:, None, :, None]).view(12, 6, 5, 7)
    ay = ref.channel_affine(ax, 3, ascale, ashift, True)
    px, pgy = rand(3, 4, 9, 19), rand(3, 4, 4, 9)
    gl, gw, gb, gce = rand(3, 7, 5), rand(3, 5, 2), rand(3, 2), rand(3)
    gpos, grw = rand(3, 7) > 0.5, rand(3, 7).abs()
    o = backend.ops_for(dev(x))  # the backward ops have no Python wrapper: the backend's namespace
    return [
        # masks from the scores as the kernel sees them (rounding to 16 bits makes ties)
        ("topk_mask", lambda: ops.topk_mask(dev(scores), 0.3),
         lambda: ref.topk_mask(scores.to(dtype), 0.3), True),
        ("multi_topk_mask", lambda: ops.multi_topk_mask(dev(bank_scores), 0.3),
         lambda: ref.multi_topk_mask(bank_scores.to(dtype), 0.3), True),
        ("pack_mask", lambda: ops.pack_mask(mask.to(device), 1), lambda: ref.pack_mask(mask, 1),
         True),
        ("unpack_mask", lambda: ops.unpack_mask(bank.to(device), (3, 37, 70)),
         lambda: ref.unpack_mask(bank, (3, 37, 70)), True),
        ("masked_linear", lambda: ops.masked_linear(dev(x), dev(w), packed.to(device), dev(b)),
         lambda: ref.masked_linear(x, w, packed, b), False),
        ("masked_linear_backward",
         lambda: o.masked_linear_backward(dev(gy[0]), dev(x), dev(w), packed.to(device),
                                          [True, True, True]),
         lambda: ref.masked_linear_backward(gy[0], x, w, packed), False),
        ("multi_masked_linear",
         lambda: ops.multi_masked_linear(dev(xk), dev(w), bank.to(device), dev(b)),
         lambda: ref.multi_masked_linear(xk, w, bank, b), False),
        ("multi_masked_linear_backward",
         lambda: o.multi_masked_linear_backward(dev(gy), dev(x), dev(w), bank.to(device), True,
                                                [True, True, True]),
         lambda: ref.multi_masked_linear_backward(gy, x, w, bank, True), False),
        ("masked_conv2d",
         lambda: ops.masked_conv2d(dev(cx), dev(cw), cbank[0].to(device), None, *conv),
         lambda: ref.masked_conv2d(cx, cw, cbank[0], None, *conv), False),
        ("masked_conv2d_backward",
         lambda: o.masked_conv2d_backward(dev(cgy[0]), dev(cx), dev(cw), cbank[0].to(device),
                                          *conv, [True, True, True]),
         lambda: ref.masked_conv2d_backward(cgy[0], cx, cw, cbank[0], *conv), False),
        ("multi_masked_conv2d",
         lambda: ops.multi_masked_conv2d(dev(cx), dev(cw), cbank.to(device), None, *conv),
         lambda: cy, False),
        ("multi_masked_conv2d_backward",
         lambda: o.multi_masked_conv2d_backward(dev(cgy), dev(cx), dev(cw), cbank.to(device),
                                                *conv, [True, True, True]),
         lambda: ref.multi_masked_conv2d_backward(cgy, cx, cw, cbank, *conv), False),
        ("multi_masked_conv2d (sparse)",
         lambda: ops.multi_masked_conv2d(dev(sx), dev(sw), sbank.to(device), None, *sconv),
         lambda: ref.multi_masked_conv2d(sx, sw, sbank, None, *sconv), False),
        ("multi_masked_conv2d_bwd (sparse)",
         lambda: o.multi_masked_conv2d_backward(dev(sgy), dev(sx), dev(sw), sbank.to(device),
                                                *sconv, [True, True, True]),
         lambda: ref.multi_masked_conv2d_backward(sgy, sx, sw, sbank, *sconv), False),
        ("module_batch_norm",
         lambda: ops.module_batch_norm(dev(nx), 3, dev(nw), dev(nb), 1e-5),
         lambda: ref.module_batch_norm(nx, 3, nw, nb, 1e-5), False),
        ("module_batch_norm_backward",
         lambda: _grads(lambda *a: ops.module_batch_norm(a[0], 3, *a[1:], 1e-5)[0],
                        (dev(nx), dev(nw), dev(nb)), dev(ngy)),
         lambda: ref.module_batch_norm_backward(ngy, nx, 3, nw, n_mean, n_invstd), False),
        ("channel_affine (relu)",
         lambda: ops.channel_affine(dev(ax), 3, dev(ascale), dev(ashift), True),
         lambda: ay, False),
        ("channel_affine_backward",
         lambda: _grads(lambda a: ops.channel_affine(a, 3, dev(ascale), dev(ashift), True),
                        (dev(ax),), dev(agy)),
         lambda: ref.channel_affine_backward(agy, ay, 3, ascale, True), False),
        ("max_pool2x2 (window positions)", lambda: ops.max_pool2x2(dev(px))[1],
         lambda: ref.max_pool2x2(px.to(dtype))[1], True),
        ("max_pool2x2_backward",
         lambda: _grads(lambda a: ops.max_pool2x2(a)[0], (dev(px),), dev(pgy)),
         lambda: ref.max_pool2x2_backward(pgy, ref.max_pool2x2(px.to(dtype))[1], (9, 19)),
         False),
        ("graft_cross_entropy",
         lambda: ops.graft_cross_entropy(dev(gl), dev(gw), dev(gb), gpos.to(device), dev(grw),
                                         1 / 7),
         lambda: ref.graft_cross_entropy(gl, gw, gb, gpos, grw, 1 / 7), False),
        ("graft_cross_entropy_backward",
         lambda: _grads(lambda *a: ops.graft_cross_entropy(*a, gpos.to(device), dev(grw),
                                                           1 / 7)[1],
                        (dev(gl), dev(gw), dev(gb)), dev(gce)),
         lambda: _grads(lambda *a: ref.graft_cross_entropy(*a, gpos, grw, 1 / 7)[1],
                        (gl, gw, gb), gce), False),
    ]


def _grads(fn, inputs, grad_out):
    """The gradients of fn(*inputs) in every input, given grad_out (through the op's autograd)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, grad_out)


def _error(got, want, exact):
    """Largest difference relative to max(1, max |want|) (0 when equal); inf when shapes or
    dtypes disagree."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    worst = 0.0
    for a, b in zip(got, want):
        a = a.cpu()
        if a.shape != b.shape or (exact and a.dtype != b.dtype):
            return float("inf")
        scale = 1.0 if exact or b.numel() == 0 else max(1.0, b.double().abs().max().item())
        diff = (a != b).any().item() if exact else \
            (a.double() - b.double()).abs().max().item() / scale
        worst = max(worst, float(diff))
    return worst


def run(device="cpu", dtype=torch.float32, out=sys.stdout) -> bool:
    """Check every op on `device` with the current backend; print a table; True if all pass."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"modsplit self-test on {device} ({name}), backend {backend.get_backend()}, {dtype}",
          file=out)
    print(f"{'op':32} {'max rel err':>12}  result", file=out)
    ok = True
    for name, kernel, reference, exact in _cases(device, dtype):
        try:
            err = _error(kernel(), reference(), exact)
            passed = err == 0 if exact else err <= _TOL[dtype]
            shown = ("bit-exact" if passed else "bits differ") if exact else f"{err:12.3g}"
        except Exception as exc:  # a crash is a failure of that op, reported in the table
            passed, shown = False, f"error: {type(exc).__name__}: {exc}".splitlines()[0]
        ok &= passed
        print(f"{name:32} {shown:>12}  {'PASS' if passed else 'FAIL'}", file=out)
    print("all ops agree with the reference" if ok else "SOME OPS DISAGREE", file=out)
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modsplit.selftest", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32",
                        choices=("float16", "bfloat16", "float32", "float64"))
    parser.add_argument("--backend", default=None, help="auto, cpu, cuda or triton")
    args = parser.parse_args(argv)
    if args.backend:
        backend.set_backend(args.backend)
    return 0 if run(args.device, getattr(torch, args.dtype)) else 1


if __name__ == "__main__":
    sys.exit(main())
