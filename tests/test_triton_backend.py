"""Backend selection: set_backend / get_backend / MODSPLIT_BACKEND / use(), and routing of the
modsplit.ops wrappers and modsplit.functional to torch.ops.modsplit_triton."""
import importlib.util

import pytest
import torch

import modsplit
import modsplit.functional as F_ms
from modsplit import backend
from modsplit import reference as ref

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
backend.load_triton(interpret=DEVICE == "cpu")


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    backend.set_backend(None)
    yield
    backend.set_backend(None)


def _spy(monkeypatch, name):
    """Counts calls of torch.ops.modsplit_triton.<name> (still running it)."""
    real = getattr(torch.ops.modsplit_triton, name)
    calls = []

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.ops.modsplit_triton, name, spy)
    return calls


def test_default_and_set_get():
    assert modsplit.get_backend() == "auto"
    modsplit.set_backend("Triton")
    assert modsplit.get_backend() == "triton"
    modsplit.set_backend(None)
    assert modsplit.get_backend() == "auto"


def test_env_var(monkeypatch):
    monkeypatch.setenv("MODSPLIT_BACKEND", "triton")
    assert backend.get_backend() == "triton"
    calls = _spy(monkeypatch, "topk_mask")
    modsplit.ops.topk_mask(torch.randn(5, 7, device=DEVICE), 0.5)
    assert calls == ["topk_mask"]
    backend.set_backend("auto")  # an explicit choice overrides the variable
    assert backend.get_backend() == "auto"


def test_use_restores_on_error():
    with pytest.raises(KeyError):
        with backend.use("triton"):
            assert backend.get_backend() == "triton"
            raise KeyError
    assert backend.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["tpu", "", "tritonn", 3])
def test_bad_names(bad, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend .* one of auto, cpu, cuda, torch, triton"):
        backend.set_backend(bad)
    if isinstance(bad, str) and bad:
        monkeypatch.setenv("MODSPLIT_BACKEND", bad)
        with pytest.raises(ValueError, match="MODSPLIT_BACKEND"):
            backend.get_backend()


def test_unusable_device_errors():
    with backend.use("triton"), pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        modsplit.ops.topk_mask(torch.empty(4, 4, device="meta"), 0.5)
    other = "cpu" if DEVICE == "cuda" else "cuda"
    with backend.use(other), pytest.raises(RuntimeError, match=f"backend '{other}' cannot run"):
        modsplit.ops.topk_mask(torch.randn(4, 4, device=DEVICE), 0.5)


def _op_calls():
    """(name of the torch op, call of its modsplit.ops wrapper) for every routed op."""
    s = torch.randn(3, 6, 40, device=DEVICE)
    packed = ref.multi_topk_mask(s.cpu(), 0.5).to(DEVICE)
    w = torch.randn(6, 40, device=DEVICE)
    x = torch.randn(5, 40, device=DEVICE)
    cw = torch.randn(6, 10, 2, 2, device=DEVICE)
    img = torch.randn(2, 10, 5, 4, device=DEVICE)
    ops = modsplit.ops
    return [("topk_mask", lambda: ops.topk_mask(s[0], 0.5)),
            ("multi_topk_mask", lambda: ops.multi_topk_mask(s, 0.5)),
            ("pack_mask", lambda: ops.pack_mask(s > 0, 1)),
            ("unpack_mask", lambda: ops.unpack_mask(packed, s.shape)),
            ("masked_linear", lambda: ops.masked_linear(x, w, packed[0])),
            ("multi_masked_linear", lambda: ops.multi_masked_linear(x, w, packed, None, True)),
            ("masked_conv2d", lambda: ops.masked_conv2d(img, cw, packed[0], None, 1, 1)),
            ("multi_masked_conv2d", lambda: ops.multi_masked_conv2d(img, cw, packed, None, 1, 1))]


@pytest.mark.parametrize("index", range(8))
def test_wrappers_route_to_triton(index, monkeypatch):
    name, call = _op_calls()[index]
    calls = _spy(monkeypatch, name)
    expected = call()  # auto: the torch.ops.modsplit op
    assert calls == []
    with backend.use("triton"):
        got = call()
    assert calls == [name]
    assert torch.equal(got, expected) if got.dtype != torch.float32 else \
        torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_functional_routes_forward_and_backward(monkeypatch):
    fwd = _spy(monkeypatch, "multi_masked_linear")
    bwd = _spy(monkeypatch, "multi_masked_linear_backward")
    scores = torch.randn(3, 6, 40, device=DEVICE, requires_grad=True)
    packed = ref.multi_topk_mask(scores.detach().cpu(), 0.5).to(DEVICE)
    x = torch.randn(5, 40, device=DEVICE)
    with backend.use("triton"):
        y = F_ms.multi_masked_linear(x, torch.randn(6, 40, device=DEVICE), scores, packed,
                                     shared_input=True)
    y.sum().backward()
    assert fwd == ["multi_masked_linear"] and bwd == ["multi_masked_linear_backward"]
    assert scores.grad.shape == scores.shape


def test_opcheck():
    """Schemas, fake impls and autograd registration of the Triton ops."""
    s = torch.randn(3, 13, 33, device=DEVICE)
    packed = ref.multi_topk_mask(s.cpu(), 0.5).to(DEVICE)
    x = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    w = torch.randn(13, 33, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.modsplit_triton.topk_mask.default, (s[0], 0.3))
    torch.library.opcheck(torch.ops.modsplit_triton.multi_masked_linear.default,
                          (x, w, packed, None, True))


def test_torch_compile_fullgraph():
    s = torch.randn(3, 13, 33, device=DEVICE)
    packed = ref.multi_topk_mask(s.cpu(), 0.5).to(DEVICE)
    x = torch.randn(4, 33, device=DEVICE)
    w = torch.randn(13, 33, device=DEVICE)

    def step(x, scores):
        return F_ms.multi_masked_linear(x, w, scores, packed, shared_input=True).square().sum()

    eager_s = s.clone().requires_grad_()
    step(x, eager_s).backward()
    with backend.use("triton"):
        compiled_s = s.clone().requires_grad_()
        loss = torch.compile(step, fullgraph=True)(x, compiled_s)
        loss.backward()
    torch.testing.assert_close(loss, step(x, s), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_s.grad, eager_s.grad, rtol=1e-4, atol=1e-4)
