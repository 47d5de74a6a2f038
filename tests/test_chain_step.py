"""decompose.train_step's direct path for masked MLPs (modsplit.chain_step.MaskedChain): the
same ops in the same order as autograd's path, so the same outputs, losses, scores, momentum
and masks bit for bit; and autograd's path wherever the direct one would skip something (hooks,
a module subset, another backend, trainable weights) or does not apply (other networks)."""
import copy
import sys

import pytest
import torch
import torch.nn as nn

from modsplit import Grafts, backend, convert
from modsplit.app.models import FC1, FC2, mnist2_fc, small_vgg
from modsplit.chain_step import MaskedChain
from modsplit.decompose_config import DecomposeConfig

D = sys.modules["modsplit.decompose"]


def _setup(model, k, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = convert(model.to(dtype), k, 0.2, seed=seed)
    grafts = Grafts.init_for(range(k), k).to(dtype)
    cfg = DecomposeConfig.build(None, k, lr=0.1, graft_lr=0.01, momentum=0.9,
                                weight_decay=5e-4, alpha=1.0, p=1.0, density=0.2)
    return net, grafts, cfg


def _steps(net, grafts, cfg, batches, k, direct, anchors=True, rows=None, dtype=torch.float32,
           monkeypatch=None, direct_steps=None, copies=True):
    """train_step over the batches on copies of net and grafts (or on them: copies=False);
    direct_steps: assert that so many steps took the direct path (needs monkeypatch)."""
    if copies:
        net, grafts = copy.deepcopy(net), copy.deepcopy(grafts)
    taken = []
    if direct_steps is not None:
        original = MaskedChain.gradients

        def counted(self, *args):
            taken.append(1)
            return original(self, *args)
        monkeypatch.setattr(MaskedChain, "gradients", counted)
    opt = D.make_optimizer(net, grafts, cfg)
    classes = torch.arange(k)
    weights = (torch.full((k,), 2.0, dtype=dtype), torch.full((k,), 0.6, dtype=dtype))
    outs = []
    for step, (x, y) in enumerate(batches):
        anchor = ([s.detach().mean(0) for s in net.score_parameters()] if anchors else None)
        r = None
        if rows:
            inclusion = torch.full((k,), 0.5)
            r = D.sample_rows(y, classes, weights, rows, inclusion,
                              torch.Generator().manual_seed(step))
        outs.append(D.train_step(net, grafts, opt, x, y, classes, weights, 1.0, 1.0, anchor, r,
                                 direct=direct))
    if direct_steps is not None:
        assert len(taken) == direct_steps
        monkeypatch.undo()
    return outs, net, grafts, opt


def _assert_same_run(a, b):
    outs_a, net_a, grafts_a, opt_a = a
    outs_b, net_b, grafts_b, opt_b = b
    for ta, tb in zip(outs_a, outs_b):
        for u, v in zip(ta, tb):
            assert torch.equal(u, v)
    for la, lb in zip(net_a.masked_layers().values(), net_b.masked_layers().values()):
        assert torch.equal(la.scores, lb.scores)
        assert torch.equal(la.masks(), lb.masks())
        assert torch.equal(opt_a.state[la.scores]["momentum_buffer"],
                           opt_b.state[lb.scores]["momentum_buffer"])
    assert torch.equal(grafts_a.weight, grafts_b.weight)
    assert torch.equal(grafts_a.bias, grafts_b.bias)


def _batches(shape, n_classes, steps=4, b=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return [(torch.rand(b, *shape, generator=g).to(dtype) * (torch.rand(b, *shape, generator=g)
                                                             > 0.4),
             torch.randint(0, n_classes, (b,), generator=g)) for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("arch", ["fc1", "fc2", "mnist2-like"])
@pytest.mark.parametrize("anchors", [True, False])
def test_direct_step_is_autograd_step_bit_for_bit(arch, anchors, dtype, monkeypatch):
    k = 5
    model = {"fc1": lambda: FC1(30, k, hidden=11), "fc2": lambda: FC2(30, k, hidden=9),
             "mnist2-like": lambda: mnist2_fc(1, hidden=12, num_classes=k)}[arch]()
    shape = (1, 28, 56) if arch == "mnist2-like" else (30,)
    net, grafts, cfg = _setup(model, k, dtype)
    assert net.masked_chain() is not None
    batches = _batches(shape, k, dtype=dtype)
    n = len(batches)
    _assert_same_run(_steps(net, grafts, cfg, batches, k, True, anchors, dtype=dtype,
                            monkeypatch=monkeypatch, direct_steps=n),
                     _steps(net, grafts, cfg, batches, k, False, anchors, dtype=dtype,
                            monkeypatch=monkeypatch, direct_steps=0))


def _assert_close_run(a, b, tol):
    """As _assert_same_run, up to rounding (the ragged step sums in another order), the graft
    outputs compared on the rows that count (train_step's seen)."""
    outs_a, net_a, grafts_a, opt_a = a
    outs_b, net_b, grafts_b, opt_b = b
    for (out_a, *rest_a), (out_b, *rest_b) in zip(outs_a, outs_b):
        seen = rest_a[-1]
        assert torch.equal(seen, rest_b[-1])
        torch.testing.assert_close(out_a[seen], out_b[seen], rtol=tol, atol=tol)
        for u, v in zip(rest_a, rest_b):
            torch.testing.assert_close(u, v, rtol=tol, atol=tol)
    for la, lb in zip(net_a.masked_layers().values(), net_b.masked_layers().values()):
        torch.testing.assert_close(la.scores, lb.scores, rtol=tol, atol=tol)
        assert torch.equal(la.masks(), lb.masks())
        torch.testing.assert_close(opt_a.state[la.scores]["momentum_buffer"],
                                   opt_b.state[lb.scores]["momentum_buffer"], rtol=tol, atol=tol)
    torch.testing.assert_close(grafts_a.weight, grafts_b.weight, rtol=tol, atol=tol)
    torch.testing.assert_close(grafts_a.bias, grafts_b.bias, rtol=tol, atol=tol)


def _sampled_case(arch, dtype, k=4):
    model = {"fc2": lambda: FC2(20, k, hidden=10),
             "mnist2-like": lambda: mnist2_fc(1, hidden=12, num_classes=k)}[arch]()
    shape = (1, 28, 56) if arch == "mnist2-like" else (20,)
    net, grafts, cfg = _setup(model, k, dtype)
    return net, grafts, cfg, _batches(shape, k, steps=5, b=24, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("arch", ["fc2", "mnist2-like"])
def test_ragged_direct_step_is_the_ragged_autograd_step(arch, dtype, monkeypatch):
    """Sampled negatives: the direct step and autograd's path both run each module on its own
    rows only (ragged_masked_linear), the same ops: the same run bit for bit."""
    k = 4
    net, grafts, cfg, batches = _sampled_case(arch, dtype, k)
    direct = _steps(net, grafts, cfg, batches, k, True, rows=2.0, dtype=dtype,
                    monkeypatch=monkeypatch, direct_steps=5)
    ragged = []
    original = MaskedChain.ragged_logits
    monkeypatch.setattr(MaskedChain, "ragged_logits",
                        lambda self, *a: ragged.append(1) or original(self, *a))
    _assert_same_run(direct, _steps(net, grafts, cfg, batches, k, False, rows=2.0, dtype=dtype))
    assert len(ragged) == len(batches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("arch", ["fc2", "mnist2-like"])
def test_ragged_step_is_the_padded_step(arch, dtype):
    """A module hook keeps the network's own forward: every module then runs on the rows of
    the widest, padded to [K, m]. Same run as the ragged step up to rounding."""
    k = 4
    net, grafts, cfg, batches = _sampled_case(arch, dtype, k)
    hooked = copy.deepcopy(net)
    hooked.net[-2].register_forward_hook(lambda m, i, o: None)  # the last ReLU
    assert not hooked.masked_chain().ragged_runs(batches[0][0])
    _assert_close_run(_steps(net, grafts, cfg, batches, k, True, rows=2.0, dtype=dtype),
                      _steps(hooked, grafts, cfg, batches, k, True, rows=2.0, dtype=dtype),
                      1e-5 if dtype == torch.float32 else 1e-12)


def test_ragged_autograd_step_on_the_torch_backend(monkeypatch):
    """Off the CPU kernels (here the torch backend) the ragged products run through autograd,
    with the same result as the CPU kernels' direct step up to rounding."""
    k = 4
    net, grafts, cfg, batches = _sampled_case("fc2", torch.float64, k)
    direct = _steps(net, grafts, cfg, batches, k, True, rows=2.0, dtype=torch.float64)
    monkeypatch.setattr(backend, "_selected", "torch")
    _assert_close_run(direct, _steps(net, grafts, cfg, batches, k, True, rows=2.0,
                                     dtype=torch.float64, monkeypatch=monkeypatch,
                                     direct_steps=0), 1e-12)


def test_ragged_rows_of_sampled_rows():
    idx = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 2, 5]])
    seen = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    offsets, rows, slots = D.ragged_rows(idx, seen)
    assert offsets.tolist() == [0, 2, 2, 5]
    assert rows.tolist() == [3, 1, 2, 2, 5]
    assert slots.tolist() == [0, 1, 6, 7, 8]


def test_a_score_gradient_hook_takes_autograd():
    """The direct path builds no graph: a hook on the first layer's scores' gradient (which
    autograd calls) makes the step take autograd's path, and the hook runs."""
    k = 3
    net, grafts, cfg = _setup(FC1(12, k, hidden=6), k)
    batches = _batches((12,), k, steps=2)
    chain = net.masked_chain()
    x = batches[0][0]
    assert chain.runs(x, grafts)
    calls = []
    handle = net.net[1].scores.register_hook(lambda g: calls.append(g.shape))
    assert not chain.runs(x, grafts)
    _steps(net, grafts, cfg, batches, k, True, copies=False)
    handle.remove()
    assert len(calls) == len(batches) and chain.runs(x, grafts)


@pytest.mark.parametrize("case", ["forward-hook", "global-hook", "subset", "torch-backend",
                                  "trainable-bias", "repeated-input", "graft-hook"])
def test_steps_the_direct_path_would_change_take_autograd(case, monkeypatch):
    k = 3
    net, grafts, cfg = _setup(FC1(12, k, hidden=6), k)
    x = _batches((12,), k, steps=1)[0][0]
    assert net.masked_chain().runs(x, grafts)
    undo = None
    if case == "forward-hook":
        undo = net.net[2].register_forward_hook(lambda m, i, o: None)  # on the ReLU
    elif case == "global-hook":
        undo = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    elif case == "subset":
        with net.use_modules([0, 2]):
            assert net.masked_chain() is None
        return
    elif case == "torch-backend":
        monkeypatch.setattr(backend, "_selected", "torch")
    elif case == "trainable-bias":
        net.net[1].bias.requires_grad_(True)
    elif case == "repeated-input":
        net.shared_input = False
        assert net.masked_chain() is None
        return
    else:
        undo = grafts.weight.register_post_accumulate_grad_hook(lambda p: None)
    try:
        chain = net.masked_chain()
        assert chain is not None and not chain.runs(x, grafts)
    finally:
        if undo is not None:
            undo.remove()
    if undo is not None:
        assert chain.runs(x, grafts)


def test_a_hook_forces_autograd_and_runs_with_the_same_result(monkeypatch):
    """A forward hook on a layer: train_step takes autograd's path, calls the hook, and gives
    what the direct path gives."""
    k = 4
    net, grafts, cfg = _setup(FC2(20, k, hidden=10), k)
    batches = _batches((20,), k, steps=3)
    hooked = copy.deepcopy(net)
    seen = []
    hooked.net[3].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _assert_same_run(_steps(net, grafts, cfg, batches, k, True),
                     _steps(hooked, grafts, cfg, batches, k, True, monkeypatch=monkeypatch,
                            direct_steps=0))
    assert len(seen) == len(batches)


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Linear(8, 4)),
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.ReLU(), nn.Linear(6, 3)),
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU()),
])
def test_chains_are_found(build):
    net = convert(build(), 2, 0.5, seed=0)
    chain = net.masked_chain()
    assert chain is not None
    assert [m is None for m in chain.layers] == [type(m) is nn.ReLU for m in net.net
                                                 if type(m) is not nn.Flatten]


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.Dropout(0.1), nn.Linear(6, 3)),
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)),
    lambda: nn.Sequential(nn.ReLU(), nn.Linear(8, 3)),
    lambda: nn.Sequential(nn.Flatten(2), nn.Linear(8, 3)),
    lambda: nn.Sequential(nn.Sequential(nn.Linear(8, 3))),
    lambda: small_vgg(3, 4, 4),
])
def test_other_networks_have_no_chain(build):
    assert convert(build(), 2, 0.5, seed=0).masked_chain() is None
    assert MaskedChain.of(nn.Linear(3, 2)) is None
