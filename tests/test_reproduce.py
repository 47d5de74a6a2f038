"""End-to-end tests of `modsplit.app.reproduce` commands with tiny settings (MNIST, small --limit,
1 decomposition epoch): output files, their structure, the recorded settings and value ranges."""
import argparse
import json
import os

import pytest
import torch
from torch.utils.data import TensorDataset

from modsplit.app import reproduce
from modsplit.app.data import load_dataset, read_idx
from modsplit.app.models import FC1
from modsplit.app.train import evaluate, train_classifier
from tests.conftest import data_path

pytestmark = pytest.mark.skipif(
    not os.path.isfile(data_path("mnist", "t10k-images-idx3-ubyte.gz")),
    reason="MNIST files not in the shared data folder")

TINY = ["--dataset", "mnist", "--limit", "3000", "--epochs-base", "4", "--epochs-decomp", "1",
        "--seed", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One output folder for the whole module, so base models are trained once and cached."""
    return str(tmp_path_factory.mktemp("reproduce"))


def _run(out, command, *extra, name, epochs=1, protocol="paper"):
    assert reproduce.main_reproduce([command, *TINY, "--out", out, *extra]) == 0
    assert os.path.isfile(os.path.join(out, f"{name}.md"))
    with open(os.path.join(out, f"{name}.json")) as f:
        data = json.load(f)
    s = data["settings"]
    assert s["command"] == command and s["seed"] == 0 and s["epochs_decomp"] == epochs
    assert s["limit"] == 3000 and s["train_examples"] == 3000 and s["test_examples"] == 10000
    assert s["wall_time_s"] >= 0 and s["machine"]
    assert all(0 <= v <= 1 for v in s["base_test_accuracy"].values())
    assert s["base_protocol"] == protocol
    assert s["base_dead_units"].keys() == s["base_test_accuracy"].keys()
    assert all(0 <= v <= 49 for v in s["base_dead_units"].values())
    return data["results"]


def _history_ok(history, epochs=1):
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    for r in history:
        assert 0 <= r["ji"] <= 1 and 0 < r["rps_pair"] <= 1 and 0 <= r["module_acc"] <= 1


def test_table1(out):
    res = _run(out, "table1", "--models", "fc1", name="table1_mnist")
    assert set(res) == {"fc1"}
    r = res["fc1"]
    assert set(r) == {"stemming", *reproduce.BASELINES}
    assert 0 <= r["stemming"]["ji"] <= 1 and 0 <= r["stemming"]["acc"] <= 1
    assert [run["seed"] for run in r["stemming"]["runs"]] == [0]
    assert r["stemming"]["ji"] == r["stemming"]["runs"][0]["ji"] and r["stemming"]["ji_std"] is None
    _history_ok(r["stemming"]["runs"][0]["history"])
    for method in reproduce.BASELINES:
        if r[method]["ji"] is None:  # base model too weak for a confident positive of a class
            assert "error" in r[method]["runs"][0]
            continue
        assert 0 <= r[method]["ji"] <= 1 and 0 <= r[method]["value_ji"] <= 1
        assert 0 <= r[method]["acc"] <= 1
    md = open(os.path.join(out, "table1_mnist.md")).read()
    assert "| stemming | FC1 |" in md and "0.60" in md and "96.47" in md  # paper beside ours


def test_table1_over_seeds(out):
    res = _run(out, "table1", "--models", "fc1", "--methods", "stemming", "--seeds", "0,1",
               name="table1_mnist")
    r = res["fc1"]["stemming"]
    runs = r["runs"]
    assert [run["seed"] for run in runs] == [0, 1] and runs[0]["ji"] != runs[1]["ji"]
    for key in ("ji", "acc"):
        a, b = runs[0][key], runs[1][key]
        assert r[key] == pytest.approx((a + b) / 2)
        assert r[f"{key}_std"] == pytest.approx(abs(a - b) / 2 ** 0.5)  # sample std of two
    md = open(os.path.join(out, "table1_mnist.md")).read()
    assert f"{r['ji']:.3f} ± {r['ji_std']:.3f}" in md and "seeds [0, 1]" in md


def test_table1_alpha_chosen_on_validation(out):
    """--select-on validation: the last 1,000 of the 3,000 training images are held out, every
    candidate alpha is scored on them, the chosen one follows the rule on the recorded scores,
    and each decomposition's full DecomposeConfig is in the JSON."""
    argv = ["table1", *TINY, "--models", "fc1", "--methods", "stemming", "--select-on",
            "validation", "--validation-size", "1000", "--alphas", "0,2", "--epochs-decomp", "2",
            "--out", out]
    assert reproduce.main_reproduce(argv) == 0
    with open(os.path.join(out, "table1_mnist.json")) as f:
        data = json.load(f)
    s, run = data["settings"], data["results"]["fc1"]["stemming"]["runs"][0]
    assert s["select_on"] == "validation" and s["train_examples"] == 2000
    assert s["validation_examples"] == 1000 and "last 1000" in s["validation_split"]
    assert set(s["base_validation_accuracy"]) == {"fc1/s0"}
    assert s["decompose_config"]["graft_lr"] == 0.01
    sel = run["selection"]
    assert [c["alpha"] for c in sel["candidates"]] == [0.0, 2.0]
    assert sel["candidates"][1]["ji"] > sel["candidates"][0]["ji"]  # stemming from epoch 2
    ok = [c for c in sel["candidates"] if c["acc_loss"] <= 0.01]
    expect = (max(ok, key=lambda c: c["ji"]) if ok else
              min(sel["candidates"], key=lambda c: c["acc_loss"]))
    assert sel["chosen_alpha"] == expect["alpha"] == run["alpha"]
    config = run["decompose_config"]
    assert config["alpha"] == run["alpha"] and config["epochs"] == 2
    assert run["ji"] == pytest.approx(expect["ji"])


def test_base_protocol_pan_rajan(out):
    """--base-protocol pan-rajan: its own cache file, a model trained on inputs / 255 / 255 with
    Keras-style Adam from Glorot init, evaluated and decomposed on those inputs; `paper` keeps
    today's cache name."""
    res = _run(out, "table1", "--models", "fc1", "--methods", "ti-i,stemming",
               "--base-protocol", "pan-rajan", name="table1_mnist", protocol="pan-rajan")
    _run(out, "table1", "--models", "fc1", "--methods", "ti-i", name="table1_mnist")
    assert set(res["fc1"]) == {"ti-i", "stemming"}
    paper_file = os.path.join(out, "base_mnist_fc1_e4_n3000_s0.pt")
    pr_file = os.path.join(out, "base_mnist_fc1_pan-rajan_e4_n3000_s0.pt")
    assert os.path.isfile(paper_file) and os.path.isfile(pr_file)
    paper_sd, pr_sd = torch.load(paper_file), torch.load(pr_file)
    assert not torch.equal(paper_sd["1.weight"], pr_sd["1.weight"])

    # retrain independently: uint8 pixels / 255 (the loader's [0, 1]) / 255 (their double
    # scaling) -> [0, 1/255], Keras-style Adam from Glorot init
    x, y = load_dataset("mnist", "train", limit=3000).tensors
    raw = torch.from_numpy(
        read_idx(data_path("mnist", "train-images-idx3-ubyte"))[:3000].copy())
    assert torch.equal(x, raw.float().unsqueeze(1) / 255)
    pr_x = raw.float().unsqueeze(1) / 255 / 255
    assert pr_x.max() <= 1 / 255 and pr_x.max() > 0.9 / 255
    scaled = TensorDataset(pr_x, y)
    torch.manual_seed(0)
    model = FC1()
    train_classifier(model, scaled, epochs=4, seed=0, optimizer="adam", lr=1e-3, eps=1e-7,
                     weight_decay=0.0, batch_size=32, init="glorot", progress=False)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, pr_sd[k], atol=1e-6), k

    # the recorded accuracy is on the doubly scaled test set, not on the usual one
    with open(os.path.join(out, "table1_mnist.json")) as f:  # the paper run just above
        assert json.load(f)["settings"]["base_protocol"] == "paper"
    args = reproduce.argparse.Namespace(
        dataset="mnist", limit=3000, data_dir=None, out=out, threads=1, epochs_base=4, seed=0,
        decomp_limit=1000, base_protocol="pan-rajan")
    run = reproduce.Run("table1", args)
    test_x, test_y = load_dataset("mnist", "test").tensors
    assert torch.equal(run.test.tensors[0], test_x / 255)
    assert torch.equal(run.decomp_set()[999][0], x[999] / 255)
    loaded = run.base_model("fc1")
    acc = run.base_accuracy["fc1/s0"]
    assert acc == evaluate(model, TensorDataset(test_x / 255, test_y))
    assert acc != evaluate(loaded, TensorDataset(test_x, test_y))
    assert run.settings()["base_protocol"] == "pan-rajan"
    assert run.settings()["base_training"] == reproduce.base_training_settings("pan-rajan")
    assert run.base_dead_units["fc1/s0"] == int(
        ((pr_x.flatten(1) @ model[1].weight.T + model[1].bias) <= 0).all(0).sum())


def test_base_protocol_helpers():
    assert reproduce.base_cache_name("mnist", "fc2", "paper", 20, None, 1) == \
        "base_mnist_fc2_e20_nall_s1.pt"  # unchanged for existing caches
    assert "pan-rajan" in reproduce.base_cache_name("mnist", "fc2", "pan-rajan", 20, None, 1)
    assert reproduce.base_training_kwargs("paper") == {}
    paper, pr = (reproduce.base_training_settings(p) for p in reproduce.BASE_PROTOCOLS)
    assert (paper["optimizer"], paper["lr"], paper["batch_size"], paper["init"]) == \
        ("sgd", 0.01, 64, None)  # train_classifier's defaults: the paper's Table 3
    assert (pr["optimizer"], pr["lr"], pr["eps"], pr["weight_decay"], pr["batch_size"],
            pr["init"]) == ("adam", 1e-3, 1e-7, 0.0, 32, "glorot")
    with pytest.raises(ValueError):
        reproduce.protocol_inputs(TensorDataset(torch.ones(1, 1, 2, 2), torch.zeros(1)), "x")
    parser = argparse.ArgumentParser()
    reproduce.add_reproduce_parser(parser.add_subparsers())
    assert parser.parse_args(["reproduce", "table1"]).base_protocol == "paper"
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "table1", "--base-protocol", "keras"])


def test_table2(out):
    res = _run(out, "table2", name="table2_mnist_fc1")
    assert len(res) == 4
    assert {(r["shared_init"], r["stemming"]) for r in res.values()} == {
        (a, b) for a in (False, True) for b in (False, True)}
    for r in res.values():
        assert r["pairs"] == 45
        # two modules of density 0.1 cover between 0.1 and 0.2 of the weights
        assert 0.1 - 1e-6 <= r["best"] <= r["avg"] <= r["worst"] <= 0.2 + 1e-6


def test_table5(out):
    res = _run(out, "table5", "--models", "fc1", "--alphas", "0,0.1", "--epochs-decomp", "2",
               name="table5_mnist", epochs=2)
    assert [(r["model"], r["alpha"]) for r in res.values()] == [("fc1", 0.0), ("fc1", 0.1)]
    for r in res.values():
        per_epoch = [h["eval_module_acc"] for h in r["history"]]
        assert len(per_epoch) == 2 and all(len(a) == 10 for a in per_epoch)
        assert r["module_acc"] == [max(a, b) for a, b in zip(*per_epoch)]
        assert r["last_epoch_module_acc"] == per_epoch[-1]
        assert all(per_epoch[e - 1][c] == r["module_acc"][c]
                   for c, e in enumerate(r["best_epoch"]))
        assert all(0 <= a <= 1 for a in r["module_acc"])
        assert r["avg"] == pytest.approx(sum(r["module_acc"]) / 10)


def test_table6(out):
    res = _run(out, "table6", "--densities", "0.1", name="table6_mnist_fc1")
    m = res["0.1"]["matrix"]
    assert len(m) == 10 and all(len(row) == 10 for row in m)
    assert all(0 <= v <= 1 for row in m for v in row)
    assert 0 <= res["0.1"]["off_diagonal_mean"] <= 1


def test_figure3(out):
    res = _run(out, "figure3", "--alphas", "0,1", "--densities", "0.1", "--epochs-decomp", "2",
               name="figure3_mnist", epochs=2)
    assert len(res) == 2
    for r in res.values():
        _history_ok(r["history"], epochs=2)
        assert r["test_module_acc"] == pytest.approx(
            [sum(h["eval_module_acc"]) / 10 for h in r["history"]])
    png = os.path.join(out, "figure3_mnist.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_hook_for_the_cli():
    parser = argparse.ArgumentParser(prog="modsplit")
    reproduce.add_reproduce_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["reproduce", "table1", "--models", "fc1,fc4", "--limit", "10"])
    assert args.models == ["fc1", "fc4"] and args.limit == 10 and callable(args.func)
    assert args.methods == ["ti-i", "ti-sne", "cm-rie", "stemming"]
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "table9"])


def test_modsplit_cli_runs_reproduce(out, capsys):
    """`modsplit reproduce ...` goes through the package's command line (and its --help works)."""
    from modsplit.app.cli import main

    with pytest.raises(SystemExit) as done:
        main(["reproduce", "--help"])
    assert done.value.code == 0 and "table1" in capsys.readouterr().out
    assert main(["reproduce", "table6", *TINY, "--densities", "0.1", "--out", out]) == 0
    with open(os.path.join(out, "table6_mnist_fc1.json")) as f:
        assert json.load(f)["settings"]["command"] == "table6"
