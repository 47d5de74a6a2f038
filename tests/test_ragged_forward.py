"""MultiModuleNet.forward_ragged (each module on its own rows, the masked layers' and
ModuleBatchNorm's ragged paths) against one module at a time on its rows, and decompose's
train_step on a conv net with sampled negatives: ragged rows against the padded [K, m] rows."""
import copy

import pytest
import torch

from modsplit import convert
from modsplit.app.models import small_vgg
from modsplit.bank import Grafts
from modsplit.decompose import make_optimizer, sample_rows, train_step
from modsplit.decompose_config import DecomposeConfig
from modsplit.module_norm import ModuleBatchNorm


def _net(batchnorm, k=3, seed=0):
    torch.manual_seed(seed)
    model = small_vgg(3, 10, width=4)
    with torch.no_grad():  # trained-looking BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net = convert(model.eval(), k, 0.3, seed=seed, batchnorm=batchnorm)
    for m in net.modules():
        if isinstance(m, ModuleBatchNorm):
            m.train()  # decompose's training steps
    return net


def _norms(net):
    return [m for m in net.modules() if isinstance(m, ModuleBatchNorm)]


@pytest.mark.parametrize("batchnorm", ["module", "frozen"])
def test_forward_ragged_is_each_module_on_its_rows(batchnorm):
    """Outputs, score gradients and (module BN) running statistics of forward_ragged equal, per
    module, a run of that module alone on its rows; a module without rows keeps its statistics
    and gets a zero score gradient."""
    net = _net(batchnorm)
    x = torch.randn(6, 3, 32, 32)
    offsets = torch.tensor([0, 4, 4, 9])
    rows = torch.tensor([0, 2, 5, 1, 3, 3, 4, 0, 5])
    ragged = copy.deepcopy(net)
    y = ragged.forward_ragged(x, offsets, rows)
    assert y.shape == (9, 10)
    y.square().sum().backward()
    for k, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        alone = copy.deepcopy(net)
        with alone.use_modules([k]):
            if b > a:
                yk = alone.forward_per_module(x[rows[a:b]][None])[0]
                torch.testing.assert_close(y[a:b], yk, rtol=1e-4, atol=1e-4)
                yk.square().sum().backward()
        for (name, p), q in zip(ragged.named_parameters(), alone.parameters()):
            if name.endswith("scores"):
                want = q.grad[k] if q.grad is not None else torch.zeros_like(p.grad[k])
                torch.testing.assert_close(p.grad[k], want, rtol=1e-4, atol=1e-5)
        for m, m_alone, m_before in zip(_norms(ragged), _norms(alone), _norms(net)):
            torch.testing.assert_close(m.running_mean[k], m_alone.running_mean[k])
            torch.testing.assert_close(m.running_var[k], m_alone.running_var[k])
            if b == a:  # no rows: the statistics are unchanged
                assert torch.equal(m.running_mean[k], m_before.running_mean[k])
                assert torch.equal(m.running_var[k], m_before.running_var[k])


def test_forward_ragged_in_eval_mode_uses_each_modules_statistics():
    net = _net("module")
    for m in _norms(net):
        m.eval()
        with torch.no_grad():
            m.running_mean.uniform_(-1, 1)  # different statistics per module
    x = torch.randn(4, 3, 32, 32)
    offsets = torch.tensor([0, 1, 3, 4])
    y = net.forward_ragged(x, offsets)
    for k in range(3):
        with net.use_modules([k]):
            a, b = offsets[k].item(), offsets[k + 1].item()
            torch.testing.assert_close(y[a:b], net.forward_per_module(x[a:b][None])[0])


def test_forward_ragged_rejects_offsets_of_another_module_count():
    net = _net("module")
    with pytest.raises(ValueError, match="offsets"):
        net.forward_ragged(torch.randn(2, 3, 32, 32), torch.tensor([0, 1, 2]))
    for m in net.masked_layers().values():
        assert m.ragged_offsets is None  # cleared after the failed pass


def test_train_step_on_a_conv_net_takes_the_ragged_rows():
    """A conv net (no masked MLP chain) with sampled negatives runs forward_ragged. With frozen
    BatchNorm each row's loss depends on that row only, so the ragged step and the padded
    [K, m] step (ragged=False) are the same step up to rounding."""
    k = 3
    net = _net("frozen", k)
    grafts = Grafts.init_for(range(k), 10)
    cfg = DecomposeConfig.build(None, k, lr=0.1, graft_lr=0.01, momentum=0.9,
                                weight_decay=5e-4, alpha=1.0, p=1.0, density=0.3)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 5, 7, 2])
    classes = torch.arange(k)
    weights = (torch.full((k,), 2.0), torch.full((k,), 0.6))
    rows = sample_rows(y, classes, weights, 1.0, torch.ones(k),
                         torch.Generator().manual_seed(0))
    results = []
    for ragged in (True, False):
        n, g = copy.deepcopy(net), copy.deepcopy(grafts)
        opt = make_optimizer(n, g, cfg)
        out = train_step(n, g, opt, x, y, classes, weights, 1.0, 1.0, None, rows,
                         ragged=ragged)
        results.append((out, [p.detach().clone() for p in n.score_parameters()]))
    (out_r, scores_r), (out_p, scores_p) = results
    seen = out_r[4]
    torch.testing.assert_close(out_r[0][seen], out_p[0][seen], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_r[2], out_p[2], rtol=1e-4, atol=1e-6)  # ce per module
    for a, b in zip(scores_r, scores_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
