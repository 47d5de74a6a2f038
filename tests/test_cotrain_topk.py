"""cotrain_sgd_topk_step_: the score update fused with the next top-k mask. The update must be
cotrain_sgd_step_'s bit for bit and the mask exactly multi_topk_mask of the updated scores,
whatever the bracket state (hits, misses, ties, stale or absurd brackets), on the C++ kernel and
the pure-PyTorch twin; decompose() gives the same banks with and without the fusion."""
import importlib
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import modsplit
from modsplit import backend, reference
from modsplit.ops.mask import multi_topk_mask
from modsplit.score_update import CoTrainSGD, cotrain_sgd_step_, cotrain_sgd_topk_step_

decompose_module = importlib.import_module("modsplit.decompose")

SHAPES = [(1, 1, 1), (3, 7, 33), (10, 49, 784), (4, 5, 3, 3, 3), (2, 3, 31), (2, 1, 1000),
          (3, 2, 64), (5, 4, 97)]
DENSITIES = [1e-3, 0.1, 0.5, 0.999, 1.0]
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, stem_coef=1e-3, nesterov=True)


def _args(h, init, sign):
    return (h["lr"], h["momentum"], h["weight_decay"], h["stem_coef"], h["nesterov"], init, sign)


def _run_both(shape, dtype, density, steps=5, sign=True, anchor_kind="shared", seed=0,
              jump_at=None, ties_at=None, grad_scale=0.1, hyper=HYPER):
    """Run `steps` fused steps and the unfused twin (update, then multi_topk_mask) side by side;
    assert bit-equal scores and buffers and equal masks at every step. Returns (the bracket, the
    scores, per step whether every module's new threshold lay inside its previous bracket, i.e.
    whether the fused select ran without a fallback: None at the first step)."""
    g = torch.Generator().manual_seed(seed)
    s1 = torch.randn(shape, generator=g).to(dtype)
    b1 = torch.zeros_like(s1)
    s2, b2 = s1.clone(), b1.clone()
    anchor = {"shared": s1.mean(0, keepdim=True), "per_module": s1.flip(0).contiguous(),
              None: None}[anchor_kind]
    bracket = torch.full((shape[0], 2), float("nan"), dtype=torch.float64)
    hits = []
    for t in range(steps):
        grad = (torch.randn(shape, generator=g) * grad_scale).to(dtype)
        if jump_at == t:  # every score moves far: the threshold leaves the bracket
            grad = grad + 5.0
        if ties_at == t:  # a block of equal scores (and momentum) straddling the threshold
            n = s1[0].numel()
            half, big = n // 2, reference.keep_count(density, n) // 2  # big < keep <= big + half
            rest = torch.rand(shape[0], n - half, generator=g, dtype=torch.float64).to(dtype)
            rest[:, :big] += 3.0  # kept for sure; the rest is well below the tied block
            rest[:, big:] *= 0.1
            for s in (s1, s2):
                s.view(shape[0], -1)[:, :half] = 1.0
                s.view(shape[0], -1)[:, half:] = rest
            for b in (b1, b2):
                b.view(shape[0], -1)[:, :half] = 0.0
        if ties_at is not None and t >= ties_at:  # the block stays tied: same updates
            grad.view(shape[0], -1)[:, : s1[0].numel() // 2] = 0
        stem_ref = cotrain_sgd_step_(s2, b2, grad, anchor, *_args(hyper, t == 0, sign))
        mask_ref = multi_topk_mask(s2, density)
        old = bracket.clone()
        stem, mask = cotrain_sgd_topk_step_(s1, b1, grad, anchor, *_args(hyper, t == 0, sign),
                                            density, bracket)
        hits.append(None if t == 0 else bool(((bracket[:, 0] >= old[:, 0] - old[:, 1])
                                              & (bracket[:, 0] <= old[:, 0] + old[:, 1])).all()))
        assert torch.equal(s1, s2) and torch.equal(b1, b2), f"step {t}: update differs"
        assert torch.equal(mask, mask_ref), f"step {t}: {(mask != mask_ref).sum()} words differ"
        torch.testing.assert_close(stem, stem_ref, rtol=1e-5, atol=1e-6)
        assert stem.dtype == torch.float64 and mask.dtype == torch.int32
        if ties_at is not None and t >= ties_at:  # the block ties and straddles the threshold
            flat = s1.abs().flatten(1)
            tied = flat[:, 0:1]
            assert (flat[:, : s1[0].numel() // 2] == tied).all()
            kept = reference.unpack_mask(mask, shape).flatten(1)[:, : s1[0].numel() // 2]
            assert kept.any() and not kept.all()
    return bracket, s1, hits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_mask_and_update_match_the_unfused_step(shape, dtype, density):
    bracket, scores, _ = _run_both(shape, dtype, density)
    flat = scores.abs().flatten(1)
    keep = reference.keep_count(density, flat.shape[1])
    if keep == flat.shape[1]:
        assert torch.isnan(bracket).all()
    else:
        tau = flat.topk(keep, dim=1).values[:, -1].double()
        assert torch.equal(bracket[:, 0], tau)  # the threshold of the mask just returned
        assert (bracket[:, 1] >= 0).all()


@pytest.mark.parametrize("width", [70, 64, 784])  # 64, 784: rows of whole 8-lane groups
@pytest.mark.parametrize("sign", [True, False])
@pytest.mark.parametrize("anchor_kind", ["shared", "per_module", None])
def test_update_switches(sign, anchor_kind, width):
    """Every switch of the update, on rows that end in a partial group (70) and on rows of whole
    8-lane groups, where float32 updates and scans each group in one pass (64, 784)."""
    _, _, hits = _run_both((4, 6, width), torch.float32, 0.1, sign=sign, anchor_kind=anchor_kind)
    assert any(hits[1:])  # the fused select ran (not only the full top-k)


@pytest.mark.parametrize("nesterov,weight_decay", [(False, 1e-4), (True, 0.0), (False, 0.0)])
@pytest.mark.parametrize("width", [64, 70])
def test_update_without_nesterov_or_decay(nesterov, weight_decay, width):
    hyper = dict(HYPER, nesterov=nesterov, weight_decay=weight_decay)
    _, _, hits = _run_both((3, 5, width), torch.float32, 0.2, hyper=hyper)
    assert any(hits[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7, 33), (10, 49, 784), (2, 3, 31)])
def test_threshold_leaving_the_bracket_falls_back_exactly(shape, dtype):
    _, _, hits = _run_both(shape, dtype, 0.1, steps=6, jump_at=3)
    assert hits[3] is False  # the jump took the threshold out of its bracket: the fallback ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
@pytest.mark.parametrize("shape", [(3, 7, 33), (2, 16, 64), (2, 3, 31)])
def test_ties_at_the_threshold_go_to_the_lower_index(shape, dtype, density):
    _, _, hits = _run_both(shape, dtype, density, steps=5, ties_at=2, anchor_kind=None)
    assert any(hits[3:])  # ties resolved by the fused select, not only by the fallback


@pytest.mark.parametrize("state", [(0.0, 0.0), (1e30, 1.0), (0.0, 1e30), (-1.0, 0.5),
                                   (float("inf"), 1.0), (1.0, float("nan")), (0.5, -1.0)])
def test_any_bracket_state_gives_the_exact_mask(state):
    shape = (3, 9, 100)
    g = torch.Generator().manual_seed(1)
    s1 = torch.randn(shape, generator=g)
    b1 = torch.zeros_like(s1)
    s2, b2 = s1.clone(), b1.clone()
    grad = torch.randn(shape, generator=g)
    bracket = torch.tensor([state] * 3, dtype=torch.float64)
    cotrain_sgd_step_(s2, b2, grad, None, *_args(HYPER, True, True))
    _, mask = cotrain_sgd_topk_step_(s1, b1, grad, None, *_args(HYPER, True, True), 0.2, bracket)
    assert torch.equal(s1, s2)
    assert torch.equal(mask, multi_topk_mask(s2, 0.2))
    assert torch.isfinite(bracket).all() and (bracket[:, 1] >= 0).all()


def test_non_contiguous_grad_and_anchor():
    shape = (4, 8, 40)
    g = torch.Generator().manual_seed(2)
    s1 = torch.randn(shape, generator=g)
    b1 = torch.zeros_like(s1)
    s2, b2 = s1.clone(), b1.clone()
    grad = torch.randn(40, 8, 4, generator=g).permute(2, 1, 0)  # non-contiguous
    anchor = torch.randn(1, 40, 8, generator=g).transpose(1, 2)
    assert not grad.is_contiguous() and not anchor.is_contiguous()
    bracket = torch.full((4, 2), float("nan"), dtype=torch.float64)
    stem_ref = cotrain_sgd_step_(s2, b2, grad.contiguous(), anchor.contiguous(),
                                 *_args(HYPER, True, True))
    stem, mask = cotrain_sgd_topk_step_(s1, b1, grad, anchor, *_args(HYPER, True, True), 0.1,
                                        bracket)
    assert torch.equal(s1, s2) and torch.equal(mask, multi_topk_mask(s2, 0.1))
    torch.testing.assert_close(stem, stem_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_torch_twin_matches_the_kernel(dtype):
    """The pure-PyTorch twin ("torch" backend, and the path of float16 / bfloat16): same update,
    same mask, same bracket (float32 / float64 against the kernel; float16 / bfloat16 values
    against the unfused reference ops)."""
    shape = (3, 6, 45)
    g = torch.Generator().manual_seed(3)
    start = torch.randn(shape, generator=g).to(dtype)
    grads = [(torch.randn(shape, generator=g) * 0.1).to(dtype) for _ in range(4)]
    anchor = start.mean(0, keepdim=True)

    def run(name):
        s, b = start.clone(), torch.zeros_like(start)
        bracket = torch.full((3, 2), float("nan"), dtype=torch.float64)
        out = []
        with backend.use(name):
            for t, grad in enumerate(grads):
                stem, mask = cotrain_sgd_topk_step_(s, b, grad, anchor,
                                                    *_args(HYPER, t == 0, True), 0.15, bracket)
                out.append((s.clone(), mask, stem, bracket.clone()))
        return out

    twin = run("torch")
    if dtype in (torch.float32, torch.float64):
        kernel = run("auto")
        for (s1, m1, st1, br1), (s2, m2, st2, br2) in zip(kernel, twin):
            assert torch.equal(s1, s2) and torch.equal(m1, m2)
            torch.testing.assert_close(st1, st2, rtol=1e-5, atol=0)
            assert torch.equal(br1[:, 0], br2[:, 0])
            torch.testing.assert_close(br1[:, 1], br2[:, 1], rtol=1e-6, atol=0)
    else:
        s, b = start.clone(), torch.zeros_like(start)
        bracket = torch.full((3, 2), float("nan"), dtype=torch.float64)
        for t, (grad, (s_twin, m_twin, _, br_twin)) in enumerate(zip(grads, twin)):
            _, mask = reference.cotrain_sgd_topk_step_(s, b, grad, anchor,
                                                       *_args(HYPER, t == 0, True), 0.15, bracket)
            assert torch.equal(s, s_twin)
            assert torch.equal(m_twin, mask)
            assert torch.equal(br_twin, bracket)


def test_nan_scores_are_an_error():
    s = torch.randn(2, 3, 40)
    b = torch.zeros_like(s)
    grad = torch.zeros_like(s)
    grad[1, 2, 5] = float("nan")
    bracket = torch.tensor([[1.0, 0.1], [1.0, 0.1]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="NaN"):
        cotrain_sgd_topk_step_(s, b, grad, None, *_args(HYPER, True, False), 0.1, bracket)


@pytest.mark.parametrize("bad, match", [
    (dict(bracket=torch.zeros(3, 2, dtype=torch.float64)), "bracket"),
    (dict(bracket=torch.zeros(2, 2)), "bracket"),
    (dict(bracket=torch.zeros(2, 2, dtype=torch.float64).t()), "bracket"),
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(scores=torch.randn(2, 40)), "scores"),
    (dict(grad=torch.randn(2, 3, 41)), "grad"),
    (dict(lr=float("inf")), "lr"),
])
def test_bad_inputs_name_the_argument(bad, match):
    args = dict(scores=torch.randn(2, 3, 40), grad=torch.randn(2, 3, 40), lr=0.1, density=0.1,
                bracket=torch.zeros(2, 2, dtype=torch.float64))
    args.update(bad)
    s = args["scores"]
    with pytest.raises((RuntimeError, ValueError), match=match):
        cotrain_sgd_topk_step_(s, torch.zeros_like(s), args["grad"], None, args["lr"], 0.9, 0.0,
                               0.0, True, True, False, args["density"], args["bracket"])


def test_opcheck():
    s = torch.randn(3, 4, 40)
    args = (s, torch.zeros_like(s), torch.randn(3, 4, 40), s.mean(0, keepdim=True), 0.1, 0.9,
            1e-4, 1e-3, True, True, True, 0.2, torch.full((3, 2), float("nan"),
                                                         dtype=torch.float64))
    torch.library.opcheck(torch.ops.modsplit.cotrain_sgd_topk_step_.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_step_with_densities_leaves_the_next_masks():
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))])  # wraps SGD.step in hooks too
    g = torch.Generator().manual_seed(4)
    ps = [torch.nn.Parameter(torch.randn(3, 5, 70, generator=g)),
          torch.nn.Parameter(torch.randn(3, 2, 5, generator=g))]
    opt = CoTrainSGD(ps, [], 0.1, 0.1, 0.9, True, 1e-4)
    hooks = []
    opt.register_step_post_hook(lambda *a: hooks.append(1))  # once per step
    with pytest.raises(ValueError, match="densities"):
        opt.step(densities=[0.1])
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step(densities=[0.1, 0.4])
        assert torch.equal(opt.next_masks[0], multi_topk_mask(ps[0].detach(), 0.1))
        assert torch.equal(opt.next_masks[1], multi_topk_mask(ps[1].detach(), 0.4))
    assert len(hooks) == 3
    opt.step(densities=[0.1, 0.4])
    assert opt.next_masks == [None, None]  # no gradients: nothing updated
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    assert opt.next_masks is None


def _bank(monkeypatch, fused):
    if not fused:
        monkeypatch.setattr(decompose_module, "uses_cpu_kernel", lambda scores: False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 33), torch.nn.ReLU(), torch.nn.Linear(33, 4))
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(96, 20, generator=g), torch.randint(0, 4, (96,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    bank = modsplit.decompose(model, loader, 4, density=0.2, alpha=1.0, epochs=2,
                              progress=False, seed=0)
    monkeypatch.undo()
    return bank


def test_decompose_banks_are_the_same_with_and_without_the_fusion(monkeypatch):
    fused, plain = _bank(monkeypatch, True), _bank(monkeypatch, False)
    masks, plain_masks = fused.masks(), plain.masks()
    assert masks.keys() == plain_masks.keys()
    for name in masks:
        assert torch.equal(masks[name], plain_masks[name]), name
    assert [h["ce"] for h in fused.history] == [h["ce"] for h in plain.history]


def test_decompose_adopts_the_fused_masks(monkeypatch):
    """After a fused step the layers' cached masks are the top-k of their new scores (no
    recomputation in the next forward)."""
    calls = []
    original = modsplit.ops.multi_topk_mask
    model = torch.nn.Sequential(torch.nn.Linear(20, 33), torch.nn.ReLU(), torch.nn.Linear(33, 4))
    net = modsplit.convert(model, 4, 0.2, seed=0)
    grafts = modsplit.Grafts.init_for(range(4), 4)
    cfg = modsplit.DecomposeConfig.build(None, 4, density=0.2)
    opt = decompose_module.make_optimizer(net, grafts, cfg)
    x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    weights = (torch.ones(4), torch.ones(4))
    decompose_module.train_step(net, grafts, opt, x, y, torch.arange(4), weights, 1.0, 1, None)
    monkeypatch.setattr(modsplit.ops, "multi_topk_mask",
                        lambda *a: calls.append(1) or original(*a))
    for layer in net.masked_layers().values():
        cached = layer.masks()
        assert torch.equal(cached, original(layer.scores.detach(), layer.density))
    assert not calls and math.isfinite(float(opt._brackets[net.score_parameters()[0]][0, 0]))
