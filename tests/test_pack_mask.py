"""pack_mask / unpack_mask against modsplit.reference (bit-exact) and round trips."""
import math

import pytest
import torch

from modsplit import reference as ref

ops = torch.ops.modsplit

# (shape, batch_dims): lead = shape[:batch_dims + 1], R = prod(rest), incl. R % 32 != 0.
CASES = [((1, 1), 0), ((1, 13), 0), ((13, 31), 0), ((7, 32), 0), ((5, 33), 0), ((3, 431), 0),
         ((2, 1000), 0), ((4, 3, 3, 3), 0), ((16, 3, 5, 5), 0), ((3, 6, 45), 1), ((10, 7, 64), 1),
         ((2, 3, 4, 67), 2), ((2, 5, 3, 3, 3), 1), ((1, 1, 1), 1)]


def _random_mask(shape, p, device):
    return (torch.rand(shape) < p).to(device)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape,batch_dims", CASES, ids=str)
def test_pack_matches_reference_and_round_trips(device, shape, batch_dims, p):
    m = _random_mask(shape, p, device)
    packed = ops.pack_mask(m, batch_dims)
    lead = shape[: batch_dims + 1]
    assert packed.dtype == torch.int32
    assert packed.shape == (*lead, math.ceil(math.prod(shape[batch_dims + 1:]) / 32))
    assert torch.equal(packed.cpu(), ref.pack_mask(m.cpu(), batch_dims))
    back = ops.unpack_mask(packed, list(shape))
    assert back.dtype == torch.bool and back.shape == m.shape
    assert torch.equal(back, m)


@pytest.mark.parametrize("shape,batch_dims", CASES, ids=str)
def test_unpack_matches_reference(device, shape, batch_dims):
    # Random words, padding bits included: unpack must ignore the padding bits.
    lead = shape[: batch_dims + 1]
    words = math.ceil(math.prod(shape[batch_dims + 1:]) / 32)
    packed = torch.randint(-2**31, 2**31 - 1, (*lead, words), dtype=torch.int32)
    got = ops.unpack_mask(packed.to(device), list(shape))
    assert torch.equal(got.cpu(), ref.unpack_mask(packed, shape))


def test_pack_bit_order(device):
    # bit j (LSB first) of word w keeps column 32w + j; padding bits are 0.
    m = torch.zeros(2, 40, dtype=torch.bool)
    m[0, 0] = m[0, 31] = m[0, 32] = m[1, 39] = True
    packed = ops.pack_mask(m.to(device), 0).cpu()
    assert packed.tolist() == [[1 - 2**31, 1], [0, 1 << 7]]


@pytest.mark.parametrize("kind", ["transposed", "strided", "expanded", "permuted"])
def test_pack_noncontiguous(device, kind):
    if kind == "transposed":
        m = _random_mask((70, 40), 0.5, device).t()
    elif kind == "strided":
        m = _random_mask((40, 130), 0.5, device)[::3, 1::2]
    elif kind == "expanded":
        m = _random_mask((1, 67), 0.5, device).expand(9, 67)
    else:
        m = _random_mask((3, 3, 16, 5), 0.5, device).permute(2, 3, 0, 1)
    assert not m.is_contiguous()
    assert torch.equal(ops.pack_mask(m, 0).cpu(), ref.pack_mask(m.contiguous().cpu(), 0))


def test_unpack_noncontiguous_packed(device):
    packed = torch.randint(-2**31, 2**31 - 1, (5, 8), dtype=torch.int32, device=device)
    view = packed[:, ::2]  # [5, 4] words of a [5, 100] mask
    assert torch.equal(ops.unpack_mask(view, [5, 100]).cpu(),
                       ref.unpack_mask(view.contiguous().cpu(), (5, 100)))


def test_large_round_trip(device):
    m = _random_mask((3, 512, 4608), 0.1, device)
    packed = ops.pack_mask(m, 1)
    assert torch.equal(packed.cpu(), ref.pack_mask(m.cpu(), 1))
    assert torch.equal(ops.unpack_mask(packed, list(m.shape)), m)


@pytest.mark.parametrize("bad", ["float", "int", "too_few_dims", "negative_batch_dims"])
def test_pack_bad_input(device, bad):
    m = _random_mask((2, 3, 4), 0.5, device)
    batch_dims = 0
    if bad == "float":
        m = m.float()
    elif bad == "int":
        m = m.to(torch.int32)
    elif bad == "too_few_dims":
        batch_dims = 2
    else:
        batch_dims = -1
    with pytest.raises(RuntimeError, match="mask"):
        ops.pack_mask(m, batch_dims)


@pytest.mark.parametrize("bad,match", [("dtype", "packed"), ("words", "words"),
                                       ("lead", "shape"), ("short_shape", "shape"),
                                       ("negative", "shape")])
def test_unpack_bad_input(device, bad, match):
    packed = torch.zeros(4, 2, dtype=torch.int32, device=device)
    shape = [4, 40]
    if bad == "dtype":
        packed = packed.to(torch.int64)
    elif bad == "words":
        shape = [4, 70]  # needs 3 words per row
    elif bad == "lead":
        shape = [5, 40]
    elif bad == "short_shape":
        shape = [4]
    else:
        shape = [4, -40]
    with pytest.raises(RuntimeError, match=match):
        ops.unpack_mask(packed, shape)


@pytest.mark.parametrize("batch_dims", [0, 1])
def test_opcheck(device, batch_dims):
    m = _random_mask((3, 5, 45), 0.5, device)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.pack_mask.default, (m, batch_dims), test_utils=utils)
    packed = ops.pack_mask(m, batch_dims)
    torch.library.opcheck(ops.unpack_mask.default, (packed, [3, 5, 45]), test_utils=utils)
