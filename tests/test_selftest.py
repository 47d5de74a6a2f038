"""`python -m modsplit.selftest`: the one-command check of every op on the current device."""
import io
import subprocess
import sys

import pytest
import torch

from modsplit import backend, ops, selftest


def test_every_op_passes_on_this_device(device):
    out = io.StringIO()
    assert selftest.run(device, torch.float32, out)
    rows = [line for line in out.getvalue().splitlines() if line.endswith(("PASS", "FAIL"))]
    assert len(rows) == 22 and all(r.endswith("PASS") for r in rows)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["auto", "torch"])
def test_every_dtype_on_the_native_and_torch_backends(device, name, dtype):
    out = io.StringIO()
    with backend.use(name):
        assert selftest.run(device, dtype, out), out.getvalue()


def test_a_wrong_kernel_is_reported(monkeypatch):
    real = ops.masked_linear
    monkeypatch.setattr(ops, "masked_linear", lambda *a: real(*a) + 0.1)
    out = io.StringIO()
    assert not selftest.run("cpu", torch.float32, out)
    assert any(line.startswith("masked_linear ") and line.endswith("FAIL")
               for line in out.getvalue().splitlines())


def test_command_line_exit_code():
    done = subprocess.run([sys.executable, "-m", "modsplit.selftest", "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "all ops agree with the reference" in done.stdout
