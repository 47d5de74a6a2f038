"""sparse_linear / sparse_conv2d (the CSR ops of compact models): the C++ kernels and the torch
backend against modsplit.reference, over odd shapes, densities 0.01..1, shared and per-module
inputs, non-contiguous inputs, float32 / float64; argument errors; fake impls (opcheck)."""
import itertools

import pytest
import torch

from modsplit import ops
from modsplit import reference as R
from modsplit import torch_backend
from modsplit.backend import use

_ops = torch.ops.modsplit
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}
IMPLS = {"cpu": _ops, "torch": torch_backend}


def make_csr(k, o, cols, density, dtype, shuffle_rows=False):
    """Random CSR of k modules ([K, O, cols] with about `density` kept, at least one entry in
    some row; with shuffle_rows the modules' entries are stored in reverse module order, so
    offsets need not follow the module order)."""
    w = torch.randn(k, o, cols, dtype=dtype) * (torch.rand(k, o, cols) < density)
    w[0, 0, 0] = 1.5
    nz = w != 0
    order = list(range(k))[::-1] if shuffle_rows else list(range(k))
    row_ptr = torch.zeros(k, o + 1, dtype=torch.long)
    cols_, vals, offset = [], [], 0
    for m in order:
        row_ptr[m, 1:] = nz[m].sum(1).cumsum(0)
        row_ptr[m] += offset
        cols_.append(nz[m].nonzero(as_tuple=True)[1].to(torch.int32))
        vals.append(w[m][nz[m]])
        offset += int(nz[m].sum())
    return row_ptr, torch.cat(cols_), torch.cat(vals), w


def assert_close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.numel():
        scale = max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= TOL[dtype] * scale * 10


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,shared", [(1, True), (2, True), (3, False), (2, False)])
def test_sparse_linear_matches_reference(impl, dtype, k, shared):
    fn = IMPLS[impl].sparse_linear
    for (o, i), b, density in itertools.product([(1, 1), (5, 17), (33, 100)], [1, 3, 7, 8, 65],
                                                [0.01, 0.1, 0.5, 1.0]):
        row_ptr, col_idx, values, w = make_csr(k, o, i, density, dtype, shuffle_rows=k == 3)
        x = torch.randn(1 if shared else k, b, i, dtype=dtype)
        bias = torch.randn(k, o, dtype=dtype)
        for relu, bb in [(False, None), (True, bias), (False, bias)]:
            want = torch.matmul(x, w.transpose(1, 2)) + (0 if bb is None else bb.unsqueeze(1))
            want = want.relu() if relu else want
            got = fn(x, row_ptr, col_idx, values, bb, relu)
            assert_close(got, want, dtype)
            assert_close(R.sparse_linear(x, row_ptr, col_idx, values, bb, relu), want, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_linear_non_contiguous_input(impl):
    row_ptr, col_idx, values, w = make_csr(2, 9, 12, 0.3, torch.float32)
    for b in (2, 20):
        x = torch.randn(2, 12, b).transpose(1, 2)  # [2, b, 12], inner dim strided
        got = IMPLS[impl].sparse_linear(x, row_ptr, col_idx, values, None, False)
        assert_close(got, torch.matmul(x, w.transpose(1, 2)), torch.float32)
        xs = torch.randn(4, b, 12)[::2]  # module dim strided
        got = IMPLS[impl].sparse_linear(xs, row_ptr, col_idx, values, None, False)
        assert_close(got, torch.matmul(xs, w.transpose(1, 2)), torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_conv2d_matches_reference(impl, dtype):
    fn = IMPLS[impl].sparse_conv2d
    # 17x33: register blocks + tail; 3x75: rows wider than one register block (64 outputs),
    # cut into pieces; strides 2 and 3 split the input into phases (2x2 kernels: every phase
    # read; 1x1: one phase at any stride)
    cases = itertools.product([(1, 1, 1), (2, 3, 1), (3, 2, 3), (2, 5, 3), (2, 3, 2)],
                              [(1, 1), (5, 9), (8, 8), (17, 33), (3, 75)],
                              [1, 2, 3], [0, 1, 2], [0.01, 0.2, 1.0])
    for (k, c, ks), (h, wd), stride, pad, density in cases:
        if h + 2 * pad < ks or wd + 2 * pad < ks:
            continue
        o = 4
        row_ptr, col_idx, values, w = make_csr(k, o, c * ks * ks, density, dtype)
        weight = w.reshape(k, o, c, ks, ks)
        for shared in (True, False):
            x = torch.randn(1 if shared else k, 2, c, h, wd, dtype=dtype)
            bias = torch.randn(k, o, dtype=dtype)
            want = torch.stack([torch.nn.functional.conv2d(x[0 if shared else m], weight[m],
                                                           bias[m], stride, pad)
                                for m in range(k)]).relu()
            got = fn(x, row_ptr, col_idx, values, bias, [ks, ks], [stride, stride], [pad, pad],
                     True)
            assert_close(got, want, dtype)
            ref = R.sparse_conv2d(x, row_ptr, col_idx, values, bias, (ks, ks), (stride, stride),
                                  (pad, pad), True)
            assert_close(ref, want, dtype)


def test_sparse_conv2d_non_contiguous_and_rectangular():
    row_ptr, col_idx, values, w = make_csr(2, 3, 2 * 3 * 1, 0.5, torch.float32)
    x = torch.randn(2, 3, 2, 7, 6).transpose(3, 4)  # [2, 3, 2, 6, 7], non-contiguous
    weight = w.reshape(2, 3, 2, 3, 1)
    want = torch.stack([torch.nn.functional.conv2d(x[m], weight[m], None, (2, 1), (1, 0))
                        for m in range(2)])
    for impl in IMPLS.values():
        got = impl.sparse_conv2d(x, row_ptr, col_idx, values, None, [3, 1], [2, 1], [1, 0], False)
        assert_close(got, want, torch.float32)


def test_wrapper_dispatches_and_falls_back():
    row_ptr, col_idx, values, w = make_csr(2, 4, 6, 0.5, torch.float32)
    x = torch.randn(1, 3, 6)
    want = torch.matmul(x, w.transpose(1, 2))
    assert_close(ops.sparse_linear(x, row_ptr, col_idx, values), want, torch.float32)
    with use("torch"):
        assert_close(ops.sparse_linear(x, row_ptr, col_idx, values), want, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_linear_bad_arguments(impl):
    fn = IMPLS[impl].sparse_linear
    row_ptr, col_idx, values, _ = make_csr(2, 4, 6, 0.5, torch.float32)
    x = torch.randn(2, 3, 6)
    bad = [((x.double(), row_ptr, col_idx, values), "values"),
           ((x, row_ptr.int(), col_idx, values), "row_ptr"),
           ((x, row_ptr, col_idx.long(), values), "col_idx"),
           ((x, row_ptr, col_idx, values[:-1]), "values"),
           ((torch.randn(3, 3, 6), row_ptr, col_idx, values), "x"),
           ((x[0], row_ptr, col_idx, values), "x"),
           ((x, row_ptr, col_idx, values, torch.randn(4)), "bias")]
    if impl == "cpu":  # the kernel also checks the CSR's contents
        bad += [((x, row_ptr, col_idx + 6, values), "col_idx"),
                ((x, row_ptr.flip(1), col_idx, values), "row_ptr")]
    for args, name in bad:
        with pytest.raises((RuntimeError, ValueError), match=name):
            fn(*args)


def test_sparse_conv2d_bad_arguments():
    row_ptr, col_idx, values, _ = make_csr(2, 4, 2 * 9, 0.5, torch.float32)
    x = torch.randn(2, 1, 2, 5, 5)
    for args, name in [((x[0], [3, 3], [1, 1], [1, 1]), "x"),
                       ((x, [3, 3], [0, 1], [1, 1]), "stride"),
                       ((x, [3, 3], [1, 1], [-1, 1]), "padding"),
                       ((x, [3, 2], [1, 1], [1, 1]), "col_idx"),
                       ((torch.randn(2, 1, 2, 1, 1), [3, 3], [1, 1], [0, 0]), "smaller")]:
        with pytest.raises(RuntimeError, match=name):
            _ops.sparse_conv2d(args[0], row_ptr, col_idx, values, None, *args[1:], False)


def test_fake_impls_and_schemas():
    row_ptr, col_idx, values, _ = make_csr(2, 4, 2 * 9, 0.5, torch.float32)
    torch.library.opcheck(_ops.sparse_linear.default,
                          (torch.randn(1, 3, 18), row_ptr, col_idx, values, torch.randn(2, 4),
                           True), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(_ops.sparse_conv2d.default,
                          (torch.randn(2, 3, 2, 5, 6), row_ptr, col_idx, values, None, [3, 3],
                           [2, 1], [1, 0], False), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_linear_chain_matches_layers(impl, dtype):
    for k, b, widths in [(1, 1, [5, 3]), (2, 3, [17, 9, 4, 1]), (3, 64, [100, 33, 2])]:
        layers, want = [], torch.randn(1, b, widths[0], dtype=dtype)
        x = want.clone()
        for n, (i, o) in enumerate(zip(widths, widths[1:])):
            row_ptr, col_idx, values, w = make_csr(k, o, i, 0.3, dtype)
            bias = torch.randn(k, o, dtype=dtype) if n % 2 == 0 else None
            activation = n % 3  # none, ReLU, sigmoid
            layers.append((row_ptr, col_idx, values, bias, activation))
            want = R.sparse_linear(want, row_ptr, col_idx, values, bias, activation == 1)
            want = want.sigmoid() if activation == 2 else want
        packed = R.pack_chain(layers)
        assert_close(IMPLS[impl].sparse_linear_chain(x, *packed), want, dtype)
        assert_close(ops.sparse_linear_chain(x, *packed), want, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_linear_chain_bad_layout(impl):
    row_ptr, col_idx, values, _ = make_csr(2, 4, 6, 0.5, torch.float32)
    layout, rp, ci, v, b = R.pack_chain([(row_ptr, col_idx, values, None, 1)])
    x = torch.randn(1, 3, 6)
    with pytest.raises((RuntimeError, ValueError), match="layout"):
        IMPLS[impl].sparse_linear_chain(x, layout[:, :6], rp, ci, v, b)
    if impl == "cpu":
        bad = layout.clone()
        bad[0, 4] += 1  # nnz past the entries
        with pytest.raises(RuntimeError, match="layout row 0"):
            _ops.sparse_linear_chain(x, bad, rp, ci, v, b)
