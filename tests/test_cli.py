"""End-to-end tests of the command line on tiny digits runs (in-process, via cli.main)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from modsplit import CompactModel, ModuleBank
from modsplit.app import cli, config, data, model_io
from modsplit.metrics import recomposed_accuracy

TINY = ["--quiet", "--limit", "300", "--test-limit", "120"]


def run(*argv):
    """cli.main on argv (strings), returning the exit code."""
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trained model, its bank, and a second model (another seed) in tmp folders."""
    root = tmp_path_factory.mktemp("runs")
    assert run("train", "--epochs", 10, "--out", root / "train", *TINY) == 0
    assert run("train", "--epochs", 1, "--seed", 1, "--out", root / "other", *TINY) == 0
    assert run("decompose", "--config", root / "train" / "config.yaml", "--epochs", 1,
               "--out", root / "dec", "--quiet") == 0
    return root


def test_train_writes_model_file_config_and_metrics(runs):
    cfg = yaml.safe_load((runs / "train" / "config.yaml").read_text())
    assert cfg["model"] == str(runs / "train" / "model.pt")
    assert cfg["train"]["model_args"] == {"in_features": 64, "num_classes": 10}
    assert cfg["data"]["limit"] == 300 and cfg["train"]["epochs"] == 10
    model = model_io.load_file(cfg["model"])
    x, y = data.load_dataset("digits", "test", limit=50).tensors
    assert model(x).shape == (50, 10)
    metrics = json.loads((runs / "train" / "metrics.json").read_text())
    assert 0.5 < metrics["test_accuracy"] <= 1


def test_decompose_writes_bank_metrics_plots(runs):
    out = runs / "dec"
    for name in ("bank.msb", "config.yaml", "metrics.json", "history.png", "module_class.png",
                 "layers.png", "report.md"):
        assert (out / name).is_file(), name
    bank = ModuleBank.load(out / "bank.msb", model_io.load_file(runs / "train" / "model.pt"))
    assert bank.classes == tuple(range(10)) and len(bank.history) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["modules"]) == 10 and len(metrics["matrix"]) == 10
    assert metrics["subsets"][0]["classes"] == [0, 1]
    assert "![module x class](module_class.png)" in (out / "report.md").read_text()


def test_eval_test_scores_every_epoch(runs, tmp_path):
    assert run("decompose", "--config", runs / "train" / "config.yaml", "--epochs", 2,
               "--eval-test", "--out", tmp_path, "--quiet") == 0
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert [len(h["eval_module_acc"]) for h in history] == [10, 10]
    assert all(0 <= h["eval_acc"] <= 1 for h in history)
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["decompose"]["eval_test"] is True
    model = model_io.load_file(runs / "train" / "model.pt")
    bank = ModuleBank.load(tmp_path / "bank.msb", model)
    test = data.load_dataset("digits", "test", limit=120)
    assert history[-1]["eval_acc"] == pytest.approx(recomposed_accuracy(bank, test, range(10)))
    assert (tmp_path / "history.png").is_file()


def test_config_written_back_reproduces_the_run(runs, tmp_path):
    assert run("decompose", "--config", runs / "dec" / "config.yaml", "--out", tmp_path) == 0
    first = yaml.safe_load((runs / "dec" / "config.yaml").read_text())
    again = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert {**first, "out": None, "bank": None} == {**again, "out": None, "bank": None}
    model = model_io.load_file(runs / "train" / "model.pt")
    a = ModuleBank.load(runs / "dec" / "bank.msb", model).masks()
    b = ModuleBank.load(tmp_path / "bank.msb", model).masks()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_toml_config_and_flag_precedence(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('seed = 3\n[decompose]\nepochs = 7\ndensity = 0.2\n')
    cfg = config.resolve(path, {"decompose.epochs": 2})
    assert (cfg["seed"], cfg["decompose"]["epochs"], cfg["decompose"]["density"]) == (3, 2, 0.2)
    assert cfg["train"] == config.DEFAULTS["train"]


def test_compose_writes_a_compact_model_with_its_report(runs, tmp_path, capsys):
    assert run("compose", "--config", runs / "dec" / "config.yaml", "--classes", "3,7",
               "--out", tmp_path) == 0
    compact = CompactModel.load(tmp_path / "composed.msc")
    cfg = yaml.safe_load((runs / "dec" / "config.yaml").read_text())
    bank = ModuleBank.load(cfg["bank"], model_io.load_file(cfg["model"]))
    x, _ = data.load_dataset("digits", "test", limit=40).tensors
    assert torch.equal(compact.predict(x), bank.compose([3, 7]).predict(x))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["classes"] == [3, 7] and metrics["format"] == "compact"
    assert metrics["bytes"] == os.path.getsize(tmp_path / "composed.msc")
    assert set(metrics["latency_us"]["composed"]) == {"b1", "b64"}
    assert "x the base model's state_dict" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_compose_writes_plain_files(runs, tmp_path, fmt):
    assert run("compose", "--config", runs / "dec" / "config.yaml", "--classes", "0,1",
               "--format", fmt, "--out", tmp_path, "--quiet") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["format"] == fmt and os.path.getsize(tmp_path / f"composed.{fmt}") == \
        metrics["bytes"]
    assert metrics["latency_ratio"]["b1"] > 0


def test_evaluate_subsets(runs, tmp_path, capsys):
    assert run("evaluate", "--config", runs / "dec" / "config.yaml", "--subsets", "0,1",
               "2-4", "--out", tmp_path) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [s["classes"] for s in metrics["subsets"]] == [[0, 1], [2, 3, 4]]
    assert all(0 <= s["rps"] <= 1 and 0 <= s["accuracy"] <= 1 for s in metrics["subsets"])
    assert "| 2,3,4 |" in capsys.readouterr().out


def test_report_writes_plots_and_summary(runs, tmp_path):
    assert run("report", "--model", runs / "train" / "model.pt", "--bank",
               runs / "dec" / "bank.msb", "--test-limit", 120, "--quiet",
               "--out", tmp_path) == 0
    for name in ("history.png", "module_class.png", "layers.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0


def test_entry_point_and_torch_export_models(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(in_features, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.ReLU(),\n"
        "                         nn.Linear(16, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run("train", "--model", "mynets:tiny", "--epochs", 1, "--out", tmp_path / "t",
               *TINY) == 0
    model = model_io.load_file(tmp_path / "t" / "model.pt")
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.zeros(4, 1, 8, 8),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "tiny.pt2")
    assert run("decompose", "--model", tmp_path / "tiny.pt2", "--epochs", 1,
               "--classes", "0-2", "--out", tmp_path / "d", *TINY) == 0
    bank = ModuleBank.load(tmp_path / "d" / "bank.msb", model_io.load_file(tmp_path / "tiny.pt2"))
    assert bank.classes == (0, 1, 2)


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("argv, message", [
    (["decompose", "--model", "{tmp}/missing.pt"], "no model file"),
    (["train", "--dataset", "nosuchdata"], "unknown dataset 'nosuchdata'"),
    (["train", "--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["train", "--model", "nosuchpkg.mod:f"], "cannot import 'nosuchpkg.mod'"),
    (["decompose", "--model", "fc1"], "untrained built-in"),
    (["compose", "--config", "{dec}/config.yaml", "--classes", "3,12"],
     "class ids [12] out of range: the bank has classes 0-9"),
    (["decompose", "--config", "{dec}/config.yaml", "--classes", "10"],
     "class ids [10] out of range: dataset digits has classes 0-9"),
    (["evaluate", "--config", "{dec}/config.yaml", "--subsets", "0,99"], "out of range"),
    (["compose", "--model", "{other}/model.pt", "--bank", "{dec}/bank.msb"],
     "was decomposed from a different model"),
    (["compose", "--model", "{other}/model.pt", "--bank", "{tmp}/missing.msb"], "no bank file"),
    (["compose", "--model", "{other}/model.pt", "--bank", "{other}/config.yaml"],
     "is not a modsplit bank file"),
    (["evaluate", "--config", "{tmp}/bad.yaml"], "unknown setting 'decompose.epoch'"),
    (["train", "--config", "{tmp}/missing.yaml"], "no config file"),
    (["train", "--device", "nosuchdevice"], "unknown device"),
    (["train", "--backend", "nosuchbackend"], "unknown backend 'nosuchbackend'"),
])
def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys, argv, message):
    _write(tmp_path / "bad.yaml", "decompose:\n  epoch: 3\n")
    where = {"tmp": tmp_path, "dec": runs / "dec", "other": runs / "other"}
    argv = [a.format(**where) for a in argv] + ["--quiet", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_bad_flag_value_exits_2_with_one_line():
    with pytest.raises(SystemExit) as exc:
        cli.main(["compose", "--classes", "three"])
    assert exc.value.code == 2


def test_python_dash_m_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "modsplit", "evaluate", "--model",
                           str(tmp_path / "nope.pt"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("modsplit evaluate: error: no model file")
    assert "Traceback" not in proc.stderr


def test_decompose_checkpoints_and_a_rerun_resumes(runs, tmp_path):
    """--checkpoint-dir: the run leaves a checkpoint; rerunning with more epochs resumes from it
    and gives the bank of a run that went straight to that many epochs (1 then 2 epochs: the
    cosine rate of epoch 1 is the full rate whatever the total)."""
    ckpt = tmp_path / "ckpt"
    args = ("decompose", "--config", runs / "train" / "config.yaml", "--quiet")
    assert run(*args, "--epochs", 1, "--checkpoint-dir", ckpt, "--out", tmp_path / "a") == 0
    assert (ckpt / "decompose.ckpt").is_file()
    assert run(*args, "--epochs", 2, "--checkpoint-dir", ckpt, "--out", tmp_path / "b") == 0
    assert run(*args, "--epochs", 2, "--out", tmp_path / "c") == 0
    model = model_io.load_file(runs / "train" / "model.pt")
    resumed = ModuleBank.load(tmp_path / "b" / "bank.msb", model)
    straight = ModuleBank.load(tmp_path / "c" / "bank.msb", model)
    assert len(resumed.history) == 2
    assert all(torch.equal(resumed.masks()[k], straight.masks()[k]) for k in straight.masks())


def test_reproduce_bad_request_goes_through_the_error_path(capsys):
    from modsplit.app.reproduce import main_reproduce
    assert cli.main(["reproduce", "table1", "--models", "fc9"]) == 2
    assert "error: unknown models ['fc9']" in capsys.readouterr().err
    assert main_reproduce(["table1", "--methods", "magic"]) == 2
    assert "error: unknown methods ['magic']" in capsys.readouterr().err
