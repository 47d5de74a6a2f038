"""masked_conv2d / multi_masked_conv2d (forward and backward ops) against modsplit.reference.

The CPU kernels have two paths (csrc/cpu/masked_conv2d_sparse.h): oneDNN convolutions with the
unpacked W*M, and at low density a direct sparse convolution over the kept weights (forward,
grad_x). The `conv_path` fixture forces each through $MODSPLIT_SPARSE_CONV_MAX_DENSITY (0: always
dense; 1: sparse wherever eligible), so every config is checked on both.

Shapes: x [B, C, H, W] (or [K, B, C, H, W] per module), weight [O, C/groups, kh, kw],
packed int32 [O, ceil(R/32)] (or [K, O, ceil(R/32)]), R = C/groups*kh*kw.
Kernel outputs in float32/bfloat16/float16 are compared with the reference run in float64.
"""
import itertools

import pytest
import torch

import modsplit
from modsplit import functional, reference

ops = torch.ops.modsplit

# (B, C, O, H, W, kh, kw, stride, padding, dilation, groups, bias); R in comments.
CONFIGS = [
    (1, 1, 1, 5, 5, 1, 1, 1, 0, 1, 1, False),  # R = 1, pointwise (im2col-free) path
    (2, 3, 5, 7, 6, 3, 3, 1, 1, 1, 1, True),  # R = 27 < 32
    (3, 4, 7, 9, 8, 3, 3, 2, 1, 1, 1, False),  # R = 36, stride 2
    (2, 6, 9, 10, 11, 5, 3, 1, 2, 1, 3, True),  # non-square kernel, groups 3, R = 30
    (2, 8, 8, 9, 9, 3, 3, 1, 2, 2, 8, True),  # depthwise, dilation 2, R = 9
    (1, 40, 33, 8, 7, 3, 3, 2, 0, 1, 1, True),  # R = 360, O not a multiple of anything
    (3, 16, 24, 6, 6, 1, 1, 2, 0, 1, 2, False),  # 1x1 with stride 2, groups 2
    (2, 32, 32, 6, 5, 3, 3, 1, 1, 1, 32, False),  # depthwise C = 32
    (2, 12, 18, 7, 7, 3, 3, (2, 1), (1, 0), (1, 2), 2, True),  # per-dim stride/padding/dilation
    (2, 10, 4, 12, 12, 5, 3, 2, 2, 2, 2, True),  # R = 75
    (1, 64, 16, 5, 5, 1, 1, 1, 0, 2, 1, True),  # pointwise with dilation 2, R = 64
]
CONFIG_IDS = [f"cfg{i}" for i in range(len(CONFIGS))]
DENSITIES = ["tiny", 0.1, 0.5, 1.0]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _one_thread():
    """Most tests run on one thread: on a shared, oversubscribed machine every OpenMP region
    waits for descheduled threads (100x slowdowns seen). Tests that exercise the kernels'
    parallel work split request `all_threads`."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(_THREADS)


ENV_SPARSE = "MODSPLIT_SPARSE_CONV_MAX_DENSITY"


@pytest.fixture(params=["dense", "sparse"])
def conv_path(request, monkeypatch):
    monkeypatch.setenv(ENV_SPARSE, "0" if request.param == "dense" else "1")
    return request.param


@pytest.fixture
def all_threads():
    torch.set_num_threads(max(2, _THREADS))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _random_packed(lead, O, R, density, device):
    """int32 [*lead, O, ceil(R/32)]: 'tiny' keeps one entry per layer, else Bernoulli(density)."""
    if density == "tiny":
        keep = torch.zeros(*lead, O * R, dtype=torch.bool)
        keep.view(-1, O * R)[:, torch.randint(O * R, (1,))] = True
    else:
        keep = torch.rand(*lead, O * R) < density
    return reference.pack_mask(keep.view(*lead, O, R), batch_dims=len(lead)).to(device)


def _make(cfg, device, dtype, K=None, shared=True, density=0.5):
    """Inputs of a config: (x, weight, packed, bias, conv_args); K=None -> single-module op."""
    B, C, O, H, W, kh, kw, stride, padding, dilation, groups, has_bias = cfg
    xshape = (B, C, H, W) if K is None or shared else (K, B, C, H, W)
    x = torch.randn(xshape, dtype=dtype).to(device)
    weight = torch.randn(O, C // groups, kh, kw, dtype=dtype).to(device)
    bias = torch.randn(O, dtype=dtype).to(device) if has_bias else None
    packed = _random_packed(() if K is None else (K,), O, C // groups * kh * kw, density, device)
    return x, weight, packed, bias, (_pair(stride), _pair(padding), _pair(dilation), groups)


def _f64(*ts):
    return [None if t is None else (t.double() if t.is_floating_point() else t) for t in ts]


def _assert_close(actual, expected, dtype):
    """Max-norm comparison relative to the expected tensor's scale."""
    assert actual.shape == expected.shape
    tol = TOL[dtype]
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale)


def _ref_forward(x, weight, packed, bias, args, multi):
    fn = reference.multi_masked_conv2d if multi else reference.masked_conv2d
    return fn(*_f64(x, weight, packed, bias), *args)


def _ref_backward(g, x, weight, packed, args, multi):
    fn = reference.multi_masked_conv2d_backward if multi else reference.masked_conv2d_backward
    return fn(*_f64(g, x, weight, packed), *args)


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_forward_matches_reference(device, cfg, density, dtype, conv_path):
    x, weight, packed, bias, args = _make(cfg, device, dtype, density=density)
    y = modsplit.ops.masked_conv2d(x, weight, packed, bias, *args)
    assert y.dtype == dtype and y.device == x.device
    _assert_close(y, _ref_forward(x, weight, packed, bias, args, False), dtype)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_module"])
@pytest.mark.parametrize("K", [1, 3, 10])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("density", ["tiny", 0.1, 1.0])
def test_multi_forward_matches_reference(device, cfg, K, shared, density, conv_path):
    x, weight, packed, bias, args = _make(cfg, device, torch.float32, K=K, shared=shared,
                                          density=density)
    y = modsplit.ops.multi_masked_conv2d(x, weight, packed, bias, *args)
    assert y.shape[:2] == (K, cfg[0])
    _assert_close(y, _ref_forward(x, weight, packed, bias, args, True), torch.float32)


# ----------------------------------------------------------------------------- backward

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_backward_matches_reference(device, cfg, dtype, conv_path):
    x, weight, packed, bias, args = _make(cfg, device, dtype)
    g = torch.randn_like(modsplit.ops.masked_conv2d(x, weight, packed, bias, *args))
    outs = ops.masked_conv2d_backward(g, x, weight, packed, *args, [True, True, True])
    for out, ref in zip(outs, _ref_backward(g, x, weight, packed, args, False)):
        _assert_close(out, ref, dtype)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_module"])
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_multi_backward_matches_reference(device, cfg, K, shared, density, conv_path):
    x, weight, packed, bias, args = _make(cfg, device, torch.float32, K=K, shared=shared,
                                          density=density)
    g = torch.randn_like(modsplit.ops.multi_masked_conv2d(x, weight, packed, bias, *args))
    outs = ops.multi_masked_conv2d_backward(g, x, weight, packed, *args, [True, True, True])
    refs = _ref_backward(g, x, weight, packed, args, True)
    assert outs[0].shape == x.shape and outs[1].shape == (K, *weight.shape)
    for out, ref in zip(outs, refs):
        _assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("output_mask", list(itertools.product([False, True], repeat=3)))
def test_backward_output_mask(device, output_mask, multi, conv_path):
    cfg = CONFIGS[3]
    x, weight, packed, bias, args = _make(cfg, device, torch.float64, K=3 if multi else None)
    op = ops.multi_masked_conv2d_backward if multi else ops.masked_conv2d_backward
    fwd = modsplit.ops.multi_masked_conv2d if multi else modsplit.ops.masked_conv2d
    g = torch.randn_like(fwd(x, weight, packed, bias, *args))
    outs = op(g, x, weight, packed, *args, list(output_mask))
    refs = _ref_backward(g, x, weight, packed, args, multi)
    for wanted, out, ref in zip(output_mask, outs, refs):
        if wanted:
            _assert_close(out, ref, torch.float64)
        else:
            assert out is None


def test_batch_chunks_and_tiles(device, all_threads, conv_path):
    """A layer whose im2col buffer exceeds one chunk (several batch chunks, several tiles)."""
    cfg = (5, 64, 40, 32, 32, 3, 3, 1, 1, 1, 1, True)
    for K, shared in [(None, True), (3, False), (2, True)]:
        x, weight, packed, bias, args = _make(cfg, device, torch.float32, K=K, shared=shared)
        multi = K is not None
        fwd = modsplit.ops.multi_masked_conv2d if multi else modsplit.ops.masked_conv2d
        bwd = ops.multi_masked_conv2d_backward if multi else ops.masked_conv2d_backward
        y = fwd(x, weight, packed, bias, *args)
        _assert_close(y, _ref_forward(x, weight, packed, bias, args, multi), torch.float32)
        g = torch.randn_like(y)
        outs = bwd(g, x, weight, packed, *args, [True, True, True])
        for out, ref in zip(outs, _ref_backward(g, x, weight, packed, args, multi)):
            _assert_close(out, ref, torch.float32)


# ----------------------------------------------------------------------------- layouts, dtypes

def _layouts(x):
    """The same values as x in non-contiguous layouts."""
    yield x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    yield wide[..., ::2]


@pytest.mark.parametrize("multi", [False, True], ids=["single", "per_module"])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[4], CONFIGS[8]], ids=["cfg1", "cfg4", "cfg8"])
def test_non_contiguous_inputs(device, cfg, multi, conv_path):
    x, weight, packed, bias, args = _make(cfg, device, torch.float32, K=3 if multi else None,
                                          shared=False)
    fwd = modsplit.ops.multi_masked_conv2d if multi else modsplit.ops.masked_conv2d
    bwd = ops.multi_masked_conv2d_backward if multi else ops.masked_conv2d_backward
    y_ref = _ref_forward(x, weight, packed, bias, args, multi)
    g = torch.randn(y_ref.shape, device=device)
    g_ref = _ref_backward(g, x, weight, packed, args, multi)
    w_nc = weight.transpose(2, 3).contiguous().transpose(2, 3)
    p_nc = torch.stack([packed, packed], -1)[..., 0]
    assert not w_nc.is_contiguous() and not p_nc.is_contiguous()
    for xl in _layouts(x):
        assert not xl.is_contiguous()
        _assert_close(fwd(xl, w_nc, p_nc, bias, *args), y_ref, torch.float32)
        outs = bwd(g.transpose(-1, -2).contiguous().transpose(-1, -2), xl, w_nc, p_nc, *args,
                   [True, True, True])
        for out, ref in zip(outs, g_ref):
            _assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_module"])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[3], CONFIGS[5], CONFIGS[7]],
                         ids=["cfg1", "cfg3", "cfg5", "cfg7"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision(device, cfg, shared, dtype, conv_path):
    for K in (None, 3):
        x, weight, packed, bias, args = _make(cfg, device, dtype, K=K, shared=shared)
        multi = K is not None
        fwd = modsplit.ops.multi_masked_conv2d if multi else modsplit.ops.masked_conv2d
        bwd = ops.multi_masked_conv2d_backward if multi else ops.masked_conv2d_backward
        y = fwd(x, weight, packed, bias, *args)
        assert y.dtype == dtype
        _assert_close(y, _ref_forward(x, weight, packed, bias, args, multi), dtype)
        g = torch.randn_like(y)
        outs = bwd(g, x, weight, packed, *args, [True, True, True])
        for out, ref in zip(outs, _ref_backward(g, x, weight, packed, args, multi)):
            assert out.dtype == dtype
            _assert_close(out, ref, dtype)


# ----------------------------------------------------------------------------- CPU path routing

def _both_outputs(x, weight, packed, bias, args):
    """(forward, backward triple) of the multi op."""
    y = modsplit.ops.multi_masked_conv2d(x, weight, packed, bias, *args)
    g = torch.ones_like(y).cumsum(-1).sin()  # deterministic, not constant
    return y, ops.multi_masked_conv2d_backward(g, x, weight, packed, *args, [True, True, True])


def _equal(a, b):
    return torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


ROUTING_CFG = (2, 16, 8, 12, 12, 3, 3, 1, 1, 1, 1, True)  # 12 x 12 planes, R = 144
TINY_PLANES_CFG = (2, 40, 16, 4, 4, 3, 3, 2, 1, 1, 1, True)  # 2 x 2 output planes


@pytest.mark.parametrize("cfg,density,path", [
    (ROUTING_CFG, 0.1, "sparse"), (ROUTING_CFG, 0.5, "dense"),
    (TINY_PLANES_CFG, 0.1, "dense"),  # fewer than 16 outputs per plane: dense at any density
], ids=["sparse", "dense by density", "dense by plane size"])
def test_default_rule_routes_by_density_and_plane_size(monkeypatch, cfg, density, path):
    """Unset, the variable means the built-in rule (density at most 0.3, planes of at least 16
    positions): a 12 x 12 layer at density 0.1 takes the sparse path, at 0.5 the dense path, a
    layer with 2 x 2 outputs the dense one. The paths sum in other orders (float32 results
    differ in the last bits), so each run is matched bit for bit with a forced one; forcing
    ("1") takes the sparse path on small planes too."""
    x, weight, packed, bias, args = _make(cfg, "cpu", torch.float32, K=3, shared=False,
                                          density=density)
    monkeypatch.delenv(ENV_SPARSE, raising=False)
    auto = _both_outputs(x, weight, packed, bias, args)
    forced = {}
    for name, value in (("dense", "0"), ("sparse", "1")):
        monkeypatch.setenv(ENV_SPARSE, value)
        forced[name] = _both_outputs(x, weight, packed, bias, args)
    assert not _equal(forced["dense"], forced["sparse"])  # the switch changes the path
    assert _equal(auto, forced[path])
    ref = _ref_forward(x, weight, packed, bias, args, True)
    for outs in forced.values():
        _assert_close(outs[0], ref, torch.float32)


@pytest.mark.parametrize("value", ["0", "1"], ids=["dense", "sparse"])
def test_bits_past_the_row_are_ignored(monkeypatch, value):
    """Bits of a packed row's last word past column R select nothing, on both paths."""
    monkeypatch.setenv(ENV_SPARSE, value)
    x, weight, packed, bias, args = _make(CONFIGS[1], "cpu", torch.float64, K=2, shared=True,
                                          density=0.3)  # R = 27: bits 27..31 are padding
    dirty = packed.clone()
    dirty[..., -1] |= torch.tensor(-(1 << 27), dtype=torch.int32)  # bits 27..31 set
    clean = _both_outputs(x, weight, packed, bias, args)
    assert _equal(_both_outputs(x, weight, dirty, bias, args), clean)


@pytest.mark.parametrize("value", ["0", "1"], ids=["dense", "sparse"])
def test_empty_masks(monkeypatch, value):
    """No kept weight at all: the output is the bias and grad_x is zero; grad_scores is dense
    by construction (the reference's)."""
    monkeypatch.setenv(ENV_SPARSE, value)
    x, weight, packed, bias, args = _make(CONFIGS[1], "cpu", torch.float32, K=3, shared=False)
    packed = torch.zeros_like(packed)
    y, (gx, gs, gb) = _both_outputs(x, weight, packed, bias, args)
    assert torch.equal(y, bias.view(1, 1, -1, 1, 1).expand_as(y))
    assert not gx.any()
    _assert_close(gs, _ref_backward(torch.ones_like(y).cumsum(-1).sin(), x, weight, packed, args,
                                    True)[1], torch.float32)
    assert torch.equal(gb, torch.ones_like(y).cumsum(-1).sin().sum((0, 1, 3, 4)))


@pytest.mark.parametrize("raw", ["abc", "-0.5", "0.1x"])
def test_bad_threshold_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(ENV_SPARSE, raw)
    x, weight, packed, bias, args = _make(CONFIGS[1], "cpu", torch.float32, K=2)
    with pytest.raises(RuntimeError, match=ENV_SPARSE):
        modsplit.ops.multi_masked_conv2d(x, weight, packed, bias, *args)


def test_inference_mode(device, all_threads):
    """The kernels run their GEMMs on worker threads: inference tensors must work there too."""
    x, weight, packed, bias, args = _make(CONFIGS[5], device, torch.float32, K=4)
    with torch.inference_mode():
        y = modsplit.ops.multi_masked_conv2d(x, weight, packed, bias, *args)
    _assert_close(y, _ref_forward(x, weight, packed, bias, args, True), torch.float32)


# ----------------------------------------------------------------------------- autograd

# Small layers for gradcheck (its cost grows with the number of inputs).
GRAD_CONFIGS = [
    (1, 2, 3, 5, 4, 3, 3, 1, 1, 1, 1, True),
    (2, 4, 4, 5, 5, 3, 2, 2, 1, (2, 1), 2, True),
    (1, 3, 3, 4, 4, 3, 3, 1, 1, 1, 3, True),  # depthwise
]


@pytest.mark.parametrize("cfg", GRAD_CONFIGS, ids=["plain", "grouped", "depthwise"])
def test_gradcheck_masked_conv2d(device, cfg):
    x, weight, packed, bias, args = _make(cfg, device, torch.float64, density=0.5)
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, w, b: modsplit.ops.masked_conv2d(a, w, packed, b, *args), inputs)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_module"])
def test_gradcheck_multi_masked_conv2d(device, shared):
    x, weight, packed, bias, args = _make(GRAD_CONFIGS[1], device, torch.float64, K=3,
                                          shared=shared)
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, w, b: modsplit.ops.multi_masked_conv2d(a, w, packed, b, *args), inputs)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_module"])
@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[3]], ids=["cfg2", "cfg3"])
def test_straight_through_score_grads(device, cfg, shared):
    K = 4
    x, weight, packed, bias, args = _make(cfg, device, torch.float32, K=K, shared=shared)
    scores = torch.randn(K, *weight.shape, device=device, requires_grad=True)
    xg = x.clone().requires_grad_()
    bg = None if bias is None else bias.clone().requires_grad_()
    y = functional.multi_masked_conv2d(xg, weight, scores, packed, bg, *args)
    g = torch.randn_like(y)
    y.backward(g)
    gx_ref, gs_ref, gb_ref = _ref_backward(g, x, weight, packed, args, True)
    _assert_close(scores.grad, gs_ref * scores.detach().double().sign(), torch.float32)
    _assert_close(xg.grad, gx_ref, torch.float32)
    if bg is not None:
        _assert_close(bg.grad, gb_ref, torch.float32)


def _opcheck_cases(device):
    cfg = CONFIGS[3]
    x, weight, packed, bias, args = _make(cfg, device, torch.float32)
    g = torch.randn_like(modsplit.ops.masked_conv2d(x, weight, packed, bias, *args))
    yield ops.masked_conv2d, (x.requires_grad_(), weight, packed, bias, *args)
    yield ops.masked_conv2d_backward, (g, x.detach(), weight, packed, *args, [True, True, True])
    for shared in (True, False):
        x, weight, packed, bias, args = _make(cfg, device, torch.float32, K=2, shared=shared)
        g = torch.randn_like(modsplit.ops.multi_masked_conv2d(x, weight, packed, bias, *args))
        yield ops.multi_masked_conv2d, (x.requires_grad_(), weight, packed,
                                        bias.requires_grad_(), *args)
        yield ops.multi_masked_conv2d_backward, (g, x.detach(), weight, packed, *args,
                                                 [True, False, True])


def test_opcheck(device):
    for op, op_args in _opcheck_cases(device):
        torch.library.opcheck(op, op_args)


def test_torch_compile_fullgraph(device):
    """Forward and backward of both ops (the bank through the straight-through function)."""
    K = 3
    x, weight, packed, bias, args = _make(CONFIGS[3], device, torch.float32)
    packed_k = _random_packed((K,), weight.shape[0], weight[0].numel(), 0.5, device)
    scores = torch.randn(K, *weight.shape, device=device)

    def step(x, bias, scores):
        y = modsplit.ops.masked_conv2d(x, weight, packed, bias, *args)  # [B, O, Ho, Wo]
        z = functional.multi_masked_conv2d(x, weight, scores, packed_k, bias, *args)
        return y.square().sum() + (z * y).sum()

    leaves = (x, bias, scores)
    eager = [t.clone().requires_grad_() for t in leaves]
    compiled = [t.clone().requires_grad_() for t in leaves]
    step(*eager).backward()
    torch.compile(step, fullgraph=True)(*compiled).backward()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- errors

def _bad_cases():
    """(name, mutate) pairs: mutate(kwargs) breaks one argument; name is the expected message."""
    def set_(**kw):
        return lambda a: a.update(kw)
    yield "x has dtype", lambda a: a.update(x=a["x"].double())
    yield "weight must be a floating", lambda a: a.update(weight=a["weight"].int(), x=a["x"].int())
    yield "weight must be", lambda a: a.update(weight=a["weight"][0])
    yield "x must be", lambda a: a.update(x=a["x"][0])
    yield "packed must be an int32", lambda a: a.update(packed=a["packed"].long())
    yield "packed has shape", lambda a: a.update(packed=a["packed"][..., 1:, :])
    yield "bias must have shape", lambda a: a.update(bias=a["bias"][:-1])
    yield "bias has dtype", lambda a: a.update(bias=a["bias"].double())
    yield "stride must be positive", set_(stride=[0, 1])
    yield "padding must be non-negative", set_(padding=[1, -1])
    yield "dilation must be positive", set_(dilation=[1, 0])
    yield "groups=4 must be positive and divide", set_(groups=4)
    yield "x has 3 channels", lambda a: a.update(x=a["x"][..., :3, :, :])
    yield "smaller than the dilated kernel", lambda a: a.update(x=a["x"][..., :2, :2], padding=[0, 0])


def _bad_params():
    """(op, message, mutation) for every op; the backward ops take no bias, so no bias cases."""
    for op_name in ("masked_conv2d", "multi_masked_conv2d", "masked_conv2d_backward",
                    "multi_masked_conv2d_backward"):
        for message, mutate in _bad_cases():
            if not (op_name.endswith("backward") and message.startswith("bias")):
                yield pytest.param(op_name, message, mutate, id=f"{op_name}-{message}")


@pytest.mark.parametrize("op_name,message,mutate", list(_bad_params()))
def test_bad_inputs_raise(device, op_name, message, mutate):
    multi = op_name.startswith("multi")
    x, weight, packed, bias, args = _make(CONFIGS[3], device, torch.float32, K=2 if multi else None)
    a = dict(x=x, weight=weight, packed=packed, bias=bias, stride=list(args[0]),
             padding=list(args[1]), dilation=list(args[2]), groups=args[3])
    mutate(a)
    conv = [a["stride"], a["padding"], a["dilation"], a["groups"]]
    if op_name.endswith("backward"):
        fwd = modsplit.ops.multi_masked_conv2d if multi else modsplit.ops.masked_conv2d
        g = torch.zeros_like(fwd(x, weight, packed, bias, *args))
        call = lambda: getattr(ops, op_name)(g, a["x"], a["weight"], a["packed"], *conv,
                                             [True, True, True])
    else:
        call = lambda: getattr(ops, op_name)(a["x"], a["weight"], a["packed"], a["bias"], *conv)
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_bad_grad_out_raises(device, multi):
    x, weight, packed, bias, args = _make(CONFIGS[3], device, torch.float32, K=2 if multi else None)
    fwd = modsplit.ops.multi_masked_conv2d if multi else modsplit.ops.masked_conv2d
    op = ops.multi_masked_conv2d_backward if multi else ops.masked_conv2d_backward
    g = fwd(x, weight, packed, bias, *args)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        op(g[..., 1:], x, weight, packed, *args, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_out has dtype"):
        op(g.double(), x, weight, packed, *args, [True, True, True])


def test_bad_module_count_raises(device):
    x, weight, packed, bias, args = _make(CONFIGS[3], device, torch.float32, K=3, shared=False)
    with pytest.raises(RuntimeError, match="x has 2 modules"):
        ops.multi_masked_conv2d(x[:2], weight, packed, bias, *args)
