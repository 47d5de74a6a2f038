"""CoTrainSGD / cotrain_sgd_step_: the fused score update reproduces torch.optim.SGD plus the
autograd stemming gradient bit for bit, on every backend, and decompose() gives the same banks."""
import importlib

import pytest
import torch
from torch.utils.data import DataLoader

import modsplit
from modsplit import backend, decompose, reference
from modsplit.score_update import CoTrainSGD, cotrain_sgd_step_, stem_coefficient

decompose_module = importlib.import_module("modsplit.decompose")

SHAPES = [(1, 1, 1), (3, 5, 7), (10, 49, 784), (2, 4, 3, 3, 3), (4, 1, 16387), (7, 33, 1)]
BACKENDS = ["auto", "torch"]


def _autograd_sgd(scores, anchors, grads, alpha, steps, lr=0.1, momentum=0.9, nesterov=True,
                  weight_decay=5e-4):
    """The unfused path: torch.optim.SGD after autograd of sum_k (CE_k + alpha * stem_k), CE's
    score gradient given. Returns the scores after `steps` steps and the stem values."""
    ps = [torch.nn.Parameter(s.clone()) for s in scores]
    opt = torch.optim.SGD(ps, lr=lr, momentum=momentum, nesterov=nesterov,
                          weight_decay=weight_decay)
    per_module = sum(s[0].numel() for s in scores)
    stems = []
    for t in range(steps):
        stem = sum((p - a).abs().flatten(1).sum(1) for p, a in zip(ps, anchors)) / per_module
        ce_part = sum((p * g[t]).sum() for p, g in zip(ps, grads))  # dCE/dS = g[t]
        opt.zero_grad(set_to_none=True)
        (ce_part + (alpha * stem).sum()).backward()
        opt.step()
        stems.append(stem.detach())
    return [p.detach() for p in ps], stems


def _fused_sgd(scores, anchors, grads, alpha, steps, lr=0.1, momentum=0.9, nesterov=True,
               weight_decay=5e-4, raw=False):
    """CoTrainSGD on the same gradients; raw: it is handed dCE/dS / sgn(S) (the masked ops'
    gradient before the straight-through factor, where sgn(S) != 0) and multiplies sgn(S) in."""
    ps = [torch.nn.Parameter(s.clone()) for s in scores]
    opt = CoTrainSGD(ps, [], lr, lr, momentum, nesterov, weight_decay)
    per_module = sum(s[0].numel() for s in scores)
    coef = stem_coefficient(alpha, per_module, scores[0].dtype)
    stems = []
    for t in range(steps):
        for p, g in zip(ps, grads):
            p.grad = g[t] * p.detach().sign() if raw else g[t].clone()
        stems.append(opt.step(anchors, coef, raw_grad=raw) / per_module)
    return [p.detach() for p in ps], stems


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_sgd_and_autograd_bit_for_bit(shape, dtype, name):
    g = torch.Generator().manual_seed(sum(shape))
    k = shape[0]
    scores = [torch.randn(shape, generator=g).to(dtype),
              torch.randn(k, 3, 2, generator=g).to(dtype)]
    # anchors: shared [1, ...] and one equal to the scores somewhere (sgn(0) = 0, ties)
    anchors = [scores[0].mean(0, keepdim=True), scores[1][:1].clone()]
    grads = [[torch.randn(s.shape, generator=g).to(dtype) * 0.1 for _ in range(4)]
             for s in scores]
    grads[0][1].view(-1)[::3] = 0  # zero gradients (dead units)
    for alpha, raw in ((0.0, False), (2.0, False), (2.0, True)):
        with backend.use(name):
            want, want_stem = _autograd_sgd(scores, anchors, grads, alpha, 4)
            got, got_stem = _fused_sgd(scores, anchors, grads, alpha, 4, raw=raw)
        for a, b in zip(want, got):
            assert torch.equal(a, b), (a - b).abs().max()
        for a, b in zip(want_stem, got_stem):
            torch.testing.assert_close(b.to(a.dtype), a, rtol=1e-2 if dtype in (
                torch.float16, torch.bfloat16) else 1e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov,weight_decay", [(False, 5e-4), (True, 0.0), (False, 0.0)])
def test_plain_momentum_and_no_decay(nesterov, weight_decay):
    g = torch.Generator().manual_seed(1)
    scores = [torch.randn(4, 9, 33, generator=g)]
    anchors = [torch.randn(4, 9, 33, generator=g)]  # per-module anchors
    grads = [[torch.randn(4, 9, 33, generator=g) for _ in range(3)]]
    kw = dict(nesterov=nesterov, weight_decay=weight_decay)
    want, _ = _autograd_sgd(scores, anchors, grads, 1.0, 3, **kw)
    got, _ = _fused_sgd(scores, anchors, grads, 1.0, 3, **kw)
    assert torch.equal(want[0], got[0])


def test_kernel_matches_reference_on_non_contiguous_grad():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 40, 50, generator=g)
    grad = torch.randn(3, 50, 40, generator=g).transpose(1, 2)  # non-contiguous
    anchor = torch.randn(1, 40, 50, generator=g)
    buf = torch.randn(3, 40, 50, generator=g)
    s2, buf2 = s.clone(), buf.clone()
    for sign_grad in (False, True):
        got = torch.ops.modsplit.cotrain_sgd_step_(s, buf, grad, anchor, 0.05, 0.9, 1e-3, 0.01,
                                                   True, False, sign_grad)
        want = reference.cotrain_sgd_step_(s2, buf2, grad, anchor, 0.05, 0.9, 1e-3, 0.01, True,
                                           False, sign_grad)
        assert torch.equal(s, s2) and torch.equal(buf, buf2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)  # |S - A| sums: float lanes


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_arguments_name_the_argument(name):
    s, buf = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    hp = (0.1, 0.9, 0.0, 0.0, True, False, False)  # lr, momentum, wd, coef, nesterov, init, sign
    with backend.use(name):
        with pytest.raises((RuntimeError, ValueError), match="grad"):
            cotrain_sgd_step_(s, buf, torch.zeros(2, 3, 5), None, *hp)
        with pytest.raises((RuntimeError, ValueError), match="momentum_buffer"):
            cotrain_sgd_step_(s, buf.double(), s, None, *hp)
        with pytest.raises((RuntimeError, ValueError), match="anchor"):
            cotrain_sgd_step_(s, buf, s, torch.zeros(2, 3, 3), *hp)
        with pytest.raises((RuntimeError, ValueError), match="nesterov"):
            cotrain_sgd_step_(s, buf, s, None, 0.1, 0.0, *hp[2:])
    with pytest.raises(ValueError, match="momentum"):
        CoTrainSGD([torch.nn.Parameter(s)], [], 0.1, 0.1, 0.0, False, 0.0)
    with pytest.raises(ValueError, match="anchors"):
        p = torch.nn.Parameter(s.clone())
        p.grad = torch.zeros_like(s)
        CoTrainSGD([p], [], 0.1, 0.1, 0.9, True, 0.0).step([s, s], 0.1)


def test_decompose_gives_the_same_bank_as_torch_sgd(digits_fc1, monkeypatch):
    """The fused optimizer changes no bit of the masks (3 epochs, stemming from epoch 2)."""
    model, small = digits_fc1

    def run():
        loader = DataLoader(small, batch_size=32, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        return decompose(model, loader, 10, epochs=3, alpha=2.0, progress=False)

    fused = run()
    monkeypatch.setattr(decompose_module, "make_optimizer", _torch_sgd)
    plain = run()
    for name, layer in fused.net.masked_layers().items():
        assert torch.equal(layer.fixed_masks, plain.net.masked_layers()[name].fixed_masks)
    assert torch.equal(fused.grafts.weight, plain.grafts.weight)
    for a, b in zip(fused.history, plain.history):
        assert a["ji"] == b["ji"] and a["module_acc"] == b["module_acc"]
        assert a["stem"] == pytest.approx(b["stem"], rel=1e-5)


def _torch_sgd(net, grafts, cfg):
    """Stands in for make_optimizer: plain torch.optim.SGD, so train_step takes the autograd
    path."""
    return torch.optim.SGD([{"params": net.score_parameters(), "lr": cfg.lr},
                            {"params": grafts.parameters(), "lr": cfg.graft_lr}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def test_decompose_uses_the_fused_optimizer_only_for_p_one(digits_fc1):
    model, small = digits_fc1
    net = modsplit.convert(model, 2, 0.1)
    grafts = modsplit.Grafts.init_for([0, 1], 10)
    cfg = modsplit.DecomposeConfig.build(None, 10)
    assert isinstance(decompose_module.make_optimizer(net, grafts, cfg), CoTrainSGD)
    cfg = modsplit.DecomposeConfig.build(None, 10, p=2.0)
    assert type(decompose_module.make_optimizer(net, grafts, cfg)) is torch.optim.SGD
