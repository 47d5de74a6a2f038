"""Sampled negatives (DecomposeConfig.neg_ratio): the row sets, the unbiased estimator, and
decompose() with it (determinism, resume, the default path untouched)."""
import pytest
import torch
from torch.utils.data import DataLoader

from modsplit import DecomposeConfig, decompose
from modsplit.decompose import sample_rows


def _weights(n):
    g = torch.Generator().manual_seed(5)
    return torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5


@pytest.mark.parametrize("b,n,ratio", [(32, 10, 1.0), (32, 10, 2.5), (7, 3, 0.3), (32, 100, 2.0),
                                       (1, 4, 1.0)])
def test_rows_hold_the_positives_and_sampled_negatives(b, n, ratio):
    g = torch.Generator().manual_seed(b * n)
    y = torch.randint(0, n, (b,), generator=g)
    classes = torch.arange(n)
    inclusion = torch.full((n,), 0.5)
    idx, weight, positive = sample_rows(y, classes, _weights(n), ratio, inclusion,
                                        torch.Generator().manual_seed(0))
    assert idx.shape == weight.shape == positive.shape and idx.dtype == torch.int64
    for k in range(n):
        used = weight[k] > 0
        pos_rows = idx[k][used & positive[k]]
        assert sorted(pos_rows.tolist()) == (y == k).nonzero().flatten().tolist()
        neg_rows = idx[k][used & ~positive[k]]
        assert (y[neg_rows] != k).all()
        n_pos = int((y == k).sum())
        if n_pos:
            assert len(neg_rows) == max(1, round(ratio * n_pos)) or n_pos == b
        assert (weight[k][~used] == 0).all()


def test_estimator_is_unbiased():
    """Mean over many draws of sum(weight * l) equals the full weighted sum, per module."""
    b, n = 32, 12
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, n, (b,), generator=g)
    y[y == 3] = 4  # class 3 absent from the batch: the inclusion-probability branch
    losses = torch.rand(n, b, generator=g)  # l[k, i]: module k's loss on example i
    w_pos, w_neg = _weights(n)
    pos = y.unsqueeze(0) == torch.arange(n).unsqueeze(1)
    full = torch.where(pos, w_pos[:, None], w_neg[:, None]).mul(losses).sum(1)
    inclusion = torch.full((n,), 0.4)
    total, draws = torch.zeros(n, dtype=torch.float64), 4000
    gen = torch.Generator().manual_seed(2)
    for _ in range(draws):
        idx, weight, _ = sample_rows(y, torch.arange(n), (w_pos, w_neg), 1.5, inclusion, gen)
        total += (weight * losses.gather(1, idx)).sum(1).double()
    torch.testing.assert_close(total / draws, full.double(), rtol=0.05, atol=0)


def test_local_modules_get_the_rows_of_the_full_draw():
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(3))
    args = (torch.arange(10), _weights(10), 2.0, torch.ones(10))
    full = sample_rows(y, *args, torch.Generator().manual_seed(9))
    part = sample_rows(y, *args, torch.Generator().manual_seed(9), local=[2, 7])
    for a, b in zip(full, part):
        assert torch.equal(a[[2, 7]][:, :b.shape[1]], b)


def test_bad_ratio_is_named():
    with pytest.raises(ValueError, match="neg_ratio"):
        DecomposeConfig.build(None, 10, neg_ratio=0)
    with pytest.raises(ValueError, match="neg_ratio"):
        DecomposeConfig.build(None, 10, neg_ratio=float("nan"))


def _loader(ds):
    return DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_decompose_with_sampled_negatives_is_deterministic_and_resumes(digits_fc1, tmp_path):
    model, small = digits_fc1
    a = decompose(model, _loader(small), 10, epochs=2, neg_ratio=2.0, progress=False)
    b = decompose(model, _loader(small), 10, epochs=2, neg_ratio=2.0, progress=False)
    full = decompose(model, _loader(small), 10, epochs=2, progress=False)
    masks = lambda bank: [m.fixed_masks for m in bank.net.masked_layers().values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(b)))
    assert not all(torch.equal(x, y) for x, y in zip(masks(a), masks(full)))
    assert 0 < a.history[-1]["module_acc"] <= 1
    # interrupted after epoch 1 (checkpoint written), resumed: the same bank
    ckpt = tmp_path / "ck"

    class Stop(Exception):
        pass

    def stop_at(record):
        raise Stop

    with pytest.raises(Stop):
        decompose(model, _loader(small), 10, epochs=2, neg_ratio=2.0, progress=False,
                  checkpoint_dir=ckpt, callbacks=[stop_at])
    c = decompose(model, _loader(small), 10, epochs=2, neg_ratio=2.0, progress=False,
                  checkpoint_dir=ckpt)
    assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(c)))
    with pytest.raises(Exception, match="neg_ratio"):
        decompose(model, _loader(small), 10, epochs=2, neg_ratio=1.0, progress=False,
                  checkpoint_dir=ckpt)
