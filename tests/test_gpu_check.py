"""benchmarks/gpu_check.py: its step runner (deadline, per-step timeouts, partial reports) and,
without a GPU, a real run that stops before the first step needing a device and says so."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "gpu_check", os.path.join(REPO, "benchmarks", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _step(name, code, timeout_s=30, needs_device=False):
    return gpu_check.Step(name, name, [[sys.executable, "-c", code]], timeout_s, needs_device)


def test_runner_times_out_a_step_and_goes_on():
    reports = []
    results = gpu_check.run_steps(
        [_step("fast", "print('hello')"), _step("slow", "import time; time.sleep(30)", 1),
         _step("fails", "raise SystemExit(4)"), _step("after", "print('still ran')")],
        deadline_s=60, has_device=True, report=lambda r: reports.append(list(r)))
    assert [r.status for r in results] == ["ok", "TIMEOUT", "FAILED", "ok"]
    assert "hello" in results[0].output and "exit status 4" in results[2].output
    assert [len(r) for r in reports] == [1, 2, 3, 4]  # a report after every step


def test_runner_respects_the_overall_deadline():
    results = gpu_check.run_steps(
        [_step("slow", "import time; time.sleep(30)", 30), _step("late", "print(1)")],
        deadline_s=2, has_device=True, report=lambda r: None)
    assert results[0].status == "TIMEOUT" and results[0].seconds < 10
    assert results[1].status == "not run: overall deadline reached"


def test_runner_stops_at_the_first_step_needing_a_device():
    results = gpu_check.run_steps(
        [_step("probe", "print(1)"), _step("gpu", "print(2)", needs_device=True),
         _step("gpu2", "print(3)", needs_device=True)],
        deadline_s=60, has_device=False, report=lambda r: None)
    assert results[0].status == "ok"
    assert results[1].status.startswith("not run: no CUDA device (this is the first step")
    assert results[2].status == "not run: no CUDA device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the check itself")
def test_cpu_run_end_to_end(tmp_path):
    out = tmp_path / "RESULTS-gpu.md"
    done = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable})
    assert done.returncode == gpu_check.NO_DEVICE, done.stdout + done.stderr
    assert "stopped before the first step that needs one" in done.stdout
    text = out.read_text()
    assert "Device: **none (no CUDA device visible)**" in text
    assert "| probe | environment | ok |" in text and '"torch"' in text
    assert "| build | CUDA build of modsplit._C | not run: no CUDA device (this is the first" in text
    for name in ("op-tests", "selftest", "values", "sanitizer", "timings"):
        assert f"| {name} |" in text
