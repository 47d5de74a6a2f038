"""`modsplit reproduce figure4`: the CPU-scale cell end to end on tiny CIFAR-10 data, its
measures (composition_scores, anchor_units) on hand-made inputs, and the first steps of the
full-scale recipes on synthetic files in torchvision's layout."""
import copy
import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from modsplit import files
from modsplit.app import figure4, reproduce
from modsplit.decompose import decompose
from tests.conftest import data_path

HAVE_CIFAR = os.path.isfile(data_path("cifar10", "cifar-10-batches-bin", "data_batch_1.bin"))


@pytest.mark.skipif(not HAVE_CIFAR, reason="CIFAR-10 files not in the shared data folder")
def test_figure4_cell_end_to_end(tmp_path):
    out = str(tmp_path)
    argv = ["figure4", "--models", "small_resnet", "--limit", "300", "--select-on",
            "validation", "--validation-size", "100", "--test-limit", "100", "--decomp-limit",
            "64", "--epochs-base", "1", "--epochs-decomp", "2", "--alphas", "0,1", "--threads",
            "1", "--out", out]
    assert reproduce.main_reproduce(argv) == 0
    with open(os.path.join(out, "figure4_cifar10.json")) as f:
        data = json.load(f)
    s, res = data["settings"], data["results"]
    assert s["train_examples"] == 200 and s["validation_examples"] == 100
    assert s["test_examples"] == 100 and s["decomp_examples"] == 64
    assert s["decompose_config"]["graft_lr"] == 0.01 and s["base_training"]["augment"] == \
        "crop-flip"
    for alpha in ("0", "1"):
        r = res[f"small_resnet,s0,{alpha}"]
        assert r["decompose_config"]["alpha"] == float(alpha)
        meta, _ = files.read_file(os.path.join(out, r["bank_file"]))  # the bank, for reuse
        assert meta["kind"] == "modsplit.ModuleBank" and meta["classes"] == list(range(10))
        assert [h["epoch"] for h in r["history"]] == [1, 2]
        assert all(len(h["eval_module_acc"]) == 10 for h in r["history"])
        for split, n in (("val", 100), ("test", 100)):
            t = r[split]
            assert t["n"] == n and 0 <= t["acc10"] <= 1 and 0 <= t["acc2"] <= 1
            assert 0 <= t["base_acc2"] <= 1 and t["acc2_min"] <= t["acc2"]
        lo, hi = r["test"]["acc10_ci"]
        assert lo <= r["test"]["acc10"] <= hi
        u = r["units"]
        assert u["weights_module"] == pytest.approx(0.1, abs=0.01)
        assert u["weights_module"] <= u["weights_pair"] <= 2 * u["weights_module"]
        assert u["kernels_module"] <= u["kernels_pair"] <= 1
        assert len(r["matrix"]) == 10 and all(len(row) == 10 for row in r["matrix"])
    sel = res["small_resnet,s0,selection"]
    assert sel["chosen_alpha"] in (0.0, 1.0) and len(sel["candidates"]) == 2
    for name in ("figure4_cifar10_small_resnet.png", "figure4_cifar10_small_resnet_front.png"):
        assert open(os.path.join(out, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "validation chose α" in open(os.path.join(out, "figure4_cifar10.md")).read()
    assert not any(r["bank_reused"] for k, r in res.items() if "selection" not in k)

    # a rerun reuses the saved banks of the same config (same results), redoes a changed one
    assert reproduce.main_reproduce(argv[:-2] + ["--alphas", "0,2", "--out", out]) == 0
    with open(os.path.join(out, "figure4_cifar10.json")) as f:
        again = json.load(f)["results"]
    assert again["small_resnet,s0,0"]["bank_reused"]
    assert again["small_resnet,s0,0"]["decompose_s"] is None
    assert again["small_resnet,s0,0"]["test"] == res["small_resnet,s0,0"]["test"]
    assert again["small_resnet,s0,0"]["history"] == res["small_resnet,s0,0"]["history"]
    assert not again["small_resnet,s0,2"]["bank_reused"]


def test_saved_bank_needs_the_same_model_and_config(tmp_path):
    bank, model = _tiny_bank(0.3)
    path = str(tmp_path / "b.msb")
    bank.save(path)
    cfg = figure4.DecomposeConfig(**{k: v for k, v in bank.config.items() if k != "classes"})
    assert figure4.saved_bank(path, model, cfg, "cpu") is not None
    assert figure4.saved_bank(path, model, dataclasses.replace(cfg, seed=1), "cpu") is None
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.add_(1)
    assert figure4.saved_bank(path, other, cfg, "cpu") is None  # another base model
    assert figure4.saved_bank(str(tmp_path / "none.msb"), model, cfg, "cpu") is None


def test_composition_scores_by_hand():
    # 4 images of classes 0, 0, 1, 2; modules of classes (0, 1, 2).
    labels = torch.tensor([0, 0, 1, 2])
    conf = torch.tensor([[0.9, 0.2, 0.1, 0.1],    # module 0
                         [0.1, 0.8, 0.7, 0.1],    # module 1: wins image 1 (a 0) and image 2
                         [0.0, 0.0, 0.9, 0.6]])   # module 2: wins image 2 (a 1) and image 3
    base = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    s = figure4.composition_scores(conf, labels, base, (0, 1, 2))
    assert s["acc10"] == pytest.approx(2 / 4) and s["base_acc10"] == 1.0 and s["n"] == 4
    # pairs: (0,1) on images 0,1,2: module votes 0,1,1 -> 2/3; (0,2) on 0,1,3: 0,0,2 -> 1;
    # (1,2) on 2,3: 1 (0.7 vs 0.9 -> 2, wrong), 2 -> 1/2.
    assert s["acc2"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert s["base_acc2"] == 1.0 and s["acc2_min"] == pytest.approx(0.5)
    assert s["acc2_loss_max"] == pytest.approx(0.5)


def _tiny_bank(density):
    """(bank, model): a bank of 3 modules of a conv net with one 3x3 conv (2 -> 2 channels) and
    one 1x1 conv, decomposed for 1 epoch on 8 random images."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(2, 3, 1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten()).eval()
    data = TensorDataset(torch.randn(8, 2, 4, 4), torch.arange(8) % 3)
    return decompose(model, DataLoader(data, batch_size=4), 3, density=density, epochs=1,
                     progress=False, check_memory=False), model


def test_anchor_units_keep_everything_at_density_one():
    u = figure4.anchor_units(_tiny_bank(1.0)[0])
    assert u == {"weights_module": 1.0, "weights_pair": 1.0, "kernels_total": 4,
                 "kernels_module": 1.0, "kernels_pair": 1.0}


def test_anchor_units_count_kernels_of_kxk_convs_only():
    bank = _tiny_bank(0.3)[0]
    u = figure4.anchor_units(bank)
    from modsplit import ops
    bits = ops.unpack_mask(bank.masks()["0"], (3, 2, 18)).view(3, 4, 9).any(-1)
    assert u["kernels_total"] == 4
    assert u["kernels_module"] == pytest.approx(bits.float().sum(1).mean().item() / 4)
    pair = [(bits[i] | bits[j]).sum().item() / 4 for i, j in ((0, 1), (0, 2), (1, 2))]
    assert u["kernels_pair"] == pytest.approx(sum(pair) / 3)


# --- full-scale recipes: first steps on synthetic files in torchvision's layout ---------------

def _cifar_python(root, folder, files, label_key, n):
    os.makedirs(os.path.join(root, folder))
    rng = np.random.default_rng(0)
    for name in files:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 label_key: list(rng.integers(0, 10, n))}
        with open(os.path.join(root, folder, name), "wb") as f:
            pickle.dump(entry, f)


def _synthetic(root, dataset):
    """Write a few random images of `dataset` in torchvision's on-disk layout under root."""
    if dataset == "cifar10":
        _cifar_python(root, "cifar-10-batches-py",
                      [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", 8)
        with open(os.path.join(root, "cifar-10-batches-py", "batches.meta"), "wb") as f:
            pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    elif dataset == "cifar100":
        _cifar_python(root, "cifar-100-python", ["train", "test"], "fine_labels", 8)
        with open(os.path.join(root, "cifar-100-python", "meta"), "wb") as f:
            pickle.dump({"fine_label_names": [str(i) for i in range(100)]}, f)
    else:
        from scipy.io import savemat
        rng = np.random.default_rng(0)
        for split in ("train", "test"):
            savemat(os.path.join(root, f"{split}_32x32.mat"),
                    {"X": rng.integers(0, 256, (32, 32, 3, 8), dtype=np.uint8),
                     "y": rng.integers(1, 11, (8, 1))})


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks its files' MD5s; the synthetic files pass."""
    from torchvision import datasets
    from torchvision.datasets import cifar
    for cls in (datasets.CIFAR10, datasets.SVHN):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args: True)  # the meta file


@pytest.mark.parametrize("recipe", sorted(figure4.RECIPES))
def test_recipe_first_steps(recipe, tmp_path, no_md5):
    dataset = figure4.RECIPES[recipe]["dataset"]
    _synthetic(str(tmp_path), dataset)
    out = str(tmp_path / "out")
    argv = ["figure4", "--recipe", recipe, "--data-dir", str(tmp_path), "--limit", "8",
            "--validation-size", "4", "--test-limit", "4", "--estimate-only", "--estimate-steps",
            "1", "--estimate-modules", "1", "--threads", "1", "--out", out]
    assert reproduce.main_reproduce(argv) == 0
    with open(os.path.join(out, f"figure4_estimate_{dataset}.json")) as f:
        data = json.load(f)
    s, (e,) = data["settings"], data["results"].values()
    assert s["recipe"] == recipe and s["dataset"] == dataset and s["select_on"] == "validation"
    assert s["train_examples"] == 4 and s["validation_examples"] == 4
    assert s["seeds"] == [0, 1, 2, 3, 4]
    assert s["base_training"]["lr"] == figure4.RECIPES[recipe]["base_lr"]
    assert s["decompose_config"]["lr"] == figure4.RECIPES[recipe]["lr"]
    assert e["base_step_s"] > 0 and e["decomp_step_s"] > 0
    assert e["base_steps_per_epoch"] == 1 and e["decomp_steps_per_epoch"] == 1
    assert e["base_epoch_s"] == pytest.approx(e["base_step_s"]) and e["decomp_memory_gb"] > 0


def test_recipe_without_files_says_how_to_get_them(tmp_path, capsys):
    code = reproduce.main_reproduce(["figure4", "--recipe", "wrn28-10-cifar100", "--data-dir",
                                     str(tmp_path), "--estimate-only", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar100: dataset files not found" in err and "download=True" in err


def test_seed_means_table():
    def cell(seed, alpha, acc10):
        return {"model": "m", "seed": seed, "alpha": alpha,
                "units": {"weights_pair": 0.1 + seed / 100, "kernels_module": 0.5},
                "test": {"acc10": acc10, "base_acc10": 0.9, "acc2": 0.95, "base_acc2": 0.97}}
    results = {"a": cell(0, 1.0, 0.70), "b": cell(2, 1.0, 0.80), "c": cell(0, 0.0, 0.75),
               "m,s0,selection": {"chosen_alpha": 1.0}}
    lines = figure4._seed_means(results)
    rows = [l for l in lines if l.startswith("| m |")]
    assert rows == ["| m | 0 | 1 | 0.1000 | 0.5000 | 75.00 | 90.00 | 95.00 | 97.00 |",
                    "| m | 1 | 2 | 0.1100 ± 0.0141 | 0.5000 ± 0.0000 | 75.00 ± 7.07 | "
                    "90.00 ± 0.00 | 95.00 ± 0.00 | 97.00 ± 0.00 |"]
    assert figure4._seed_means({"a": cell(0, 1.0, 0.7)}) == []
