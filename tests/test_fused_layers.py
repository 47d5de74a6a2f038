"""MultiModuleNet's fused view (modsplit.fused_layers): BatchNorm + ReLU pairs and 2 x 2 max
pools on one-pass kernels compute what the network computes, share its state, and step aside
wherever they do not apply."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

from modsplit import backend
from modsplit.app.models import small_resnet, small_vgg
from modsplit.convert import convert
from modsplit.fused_layers import MaxPool2x2, NormReLU

K, DENSITY = 3, 0.2


def _trained_like(model, seed=0):
    """Non-trivial BatchNorm statistics and affine maps, eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def _run(net, x, fuse):
    net = copy.deepcopy(net)
    net.fuse_layers = fuse
    y = net(x)
    (y.square().sum()).backward()
    return y.detach(), [s.grad for s in net.score_parameters()], net


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("norm_mode", ["frozen", "module-train", "module-eval"])
@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_fused_view_computes_what_the_network_does(arch, norm_mode, dtype):
    model = _trained_like(small_vgg(3, 5, 8) if arch == "vgg" else small_resnet(3, 5, 8))
    net = convert(model.to(dtype), K, DENSITY, seed=0,
                  batchnorm="frozen" if norm_mode == "frozen" else "module")
    net.train_module_norms(norm_mode == "module-train")
    x = torch.randn(5, 3, 11, 10, generator=torch.Generator().manual_seed(1)).to(dtype)
    y_f, g_f, fused = _run(net, x, True)
    y_p, g_p, plain = _run(net, x, False)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_f, y_p, **tol)
    for a, b in zip(g_f, g_p):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(fused.state_dict().values(), plain.state_dict().values()):  # running stats
        torch.testing.assert_close(a, b, **tol)
    body = list(fused._body().modules())
    assert any(isinstance(m, NormReLU) for m in body)
    if arch == "vgg":
        assert any(isinstance(m, MaxPool2x2) for m in body)
        assert sum(isinstance(m, NormReLU) and m.relu for m in body) == 4  # every BN-ReLU pair


def test_the_network_and_its_state_are_untouched():
    net = convert(_trained_like(small_vgg(3, 5, 8)), K, DENSITY, seed=0)
    before = [type(m) for m in net.net.modules()]
    keys = list(net.state_dict())
    net(torch.randn(2, 3, 8, 8))
    assert [type(m) for m in net.net.modules()] == before
    assert list(net.state_dict()) == keys
    assert not any(isinstance(m, (NormReLU, MaxPool2x2)) for m in net.modules())


def test_copies_and_pickles_drop_the_view():
    net = convert(_trained_like(small_vgg(3, 5, 8)), K, DENSITY, seed=0)
    x = torch.randn(2, 3, 8, 8)
    y = net(x)
    assert "_layout_cache" in net.__dict__
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert "_layout_cache" not in other.__dict__
        torch.testing.assert_close(other(x), y)


def test_a_changed_network_gets_a_new_view():
    net = convert(_trained_like(small_vgg(3, 5, 8)), K, DENSITY, seed=0)
    x = torch.randn(2, 3, 8, 8)
    net(x)
    net.net[2] = nn.Tanh()  # the ReLU after the first BatchNorm
    want = copy.deepcopy(net)
    want.fuse_layers = False
    torch.testing.assert_close(net(x), want(x))
    assert not net._body()[1].relu


def test_train_and_eval_reach_copied_containers():
    class Gate(nn.Module):  # a container whose forward reads its own training flag
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            return self.body(x) * (2.0 if self.training else 1.0)

    model = nn.Sequential(Gate(), nn.Flatten(), nn.Linear(4 * 16, 5))
    _trained_like(model)
    net = convert(model, K, DENSITY, seed=0)
    x = torch.randn(2, 3, 4, 4)
    y_eval = net(x)
    net.net[0].train()
    net.net[0].body[1].eval()  # the frozen BatchNorm stays in eval mode
    y_train = net(x)
    assert isinstance(net._body()[0].body[1], NormReLU)
    want = copy.deepcopy(net)
    want.fuse_layers = False
    torch.testing.assert_close(y_train, want(x))
    assert not torch.allclose(y_train, y_eval)


def test_layers_with_hooks_and_other_pools_are_left_alone():
    model = _trained_like(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(3),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(), nn.Linear(4, 5)))
    net = convert(model, K, DENSITY, seed=0)
    seen = []
    net.net[5].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 3, 6, 6)
    y = net(x)
    body = net._body()
    assert isinstance(body[1], NormReLU) and body[1].relu and isinstance(body[2], nn.Identity)
    assert body[3] is net.net[3] and body[7] is net.net[7]  # not 2 x 2 / floor mode
    assert body[5] is net.net[5] and body[6] is net.net[6] and seen  # hooked: not fused
    want = copy.deepcopy(net)
    want.fuse_layers = False
    torch.testing.assert_close(y, want(x))


@pytest.mark.parametrize("where", ["torch backend", "float16"])
def test_the_original_layers_run_where_the_kernels_do_not(where):
    model = _trained_like(small_vgg(3, 5, 8))
    dtype = torch.float16 if where == "float16" else torch.float32
    net = convert(model, K, DENSITY, seed=0)
    if dtype == torch.float16:
        net = net.to(dtype)
    x = torch.randn(2, 3, 8, 8).to(dtype)
    want = copy.deepcopy(net)
    want.fuse_layers = False
    with backend.use("torch" if where == "torch backend" else "auto"):
        got = net(x)
        torch.testing.assert_close(got, want(x))


def test_a_trainable_batchnorm_keeps_its_gradient():
    model = _trained_like(small_vgg(3, 5, 8))
    net = convert(model, K, DENSITY, seed=0)
    bn = net.net[1]
    bn.weight.requires_grad_(True)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0


class _NoView:
    """FusedView's stand-in that runs the network itself."""

    def __init__(self, net):
        self.view = net

    def sync(self):
        return self.view

    def stale(self):
        return False


def test_decompose_gives_the_same_bank_with_and_without_the_view(monkeypatch):
    """decompose()'s default per-module BatchNorm: the fused ReLU and the pool compute the same
    values bit for bit, so two epochs give identical masks, grafts and history."""
    import sys

    from modsplit import decompose
    torch.manual_seed(0)
    model = _trained_like(small_vgg(3, 4, 8))
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(16, 3, 12, 12, generator=g), torch.randint(0, 4, (16,), generator=g))
              for _ in range(3)]
    banks = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(sys.modules["modsplit.convert"], "FusedView", _NoView)
        banks.append(decompose(model, loader, 4, epochs=2, seed=0, progress=False))
    a, b = banks
    assert all(torch.equal(a.masks()[n], b.masks()[n]) for n in a.masks())
    assert torch.equal(a.grafts.weight, b.grafts.weight)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_a_hook_added_later_runs():
    """A hook registered on a fused BatchNorm after the view was built: the view is rebuilt
    without that layer fused, and the hook sees the BatchNorm's own output."""
    net = convert(_trained_like(small_vgg(3, 5, 8)), K, DENSITY, seed=0)
    x = torch.randn(2, 3, 8, 8)
    y = net(x)
    assert isinstance(net._body()[1], NormReLU)
    seen = []
    net.net[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    torch.testing.assert_close(net(x), y)
    assert len(seen) == 1 and (seen[0] < 0).any()  # before the ReLU: not fused any more
    assert net._body()[1] is net.net[1]
