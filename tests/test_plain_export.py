"""The .pt2 (torch.export) and ONNX files of a compact model load and predict, in a fresh process
where modsplit cannot be imported, exactly what bank.compose() predicts."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modsplit.app.models import get_model
from modsplit.plain_export import export_onnx, export_pt2, plain_module
from test_compact import ARCHS, make_bank, random_bn

# Run in the child before anything else: modsplit is made unimportable (whatever installed it:
# an editable finder, a path entry, the working directory), and the script checks that it is.
_BLOCK = textwrap.dedent("""
    import sys
    class _NoModsplit:
        def find_spec(self, name, path=None, target=None):
            if name == "modsplit" or name.startswith("modsplit."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None
    sys.meta_path.insert(0, _NoModsplit())
    try:
        import modsplit
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("modsplit is importable in the child")
""")

_LOAD = {"pt2": """
import torch
program = torch.export.load(sys.argv[1]).module()
pred = program(data["x"])[1]
""", "onnx": """
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
pred = torch.from_numpy(session.run(["classes"], {"x": data["x"].numpy()})[0])
"""}

_CHECK = """
import torch
data = torch.load(sys.argv[2])
{load}
assert "modsplit" not in sys.modules
assert torch.equal(pred, data["want"]), (pred, data["want"])
print("same predictions", pred.numel())
"""


def run_without_modsplit(fmt, model_path, data_path, tmp_path):
    script = tmp_path / f"check_{fmt}.py"
    script.write_text(_BLOCK + _CHECK.format(load=_LOAD[fmt]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(script), str(model_path), str(data_path)],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "same predictions" in out.stdout


@pytest.mark.parametrize("arch", ["fc2", "small_resnet"])
def test_exports_predict_like_composed_without_modsplit(arch, tmp_path):
    bank = make_bank(random_bn(get_model(arch, **ARCHS[arch])), k=3, density=0.1)
    composed = bank.compose([2, 0])
    compact = composed.compact()
    x = torch.randn(33, 1, 8, 8)
    want = composed.predict(x)
    conf, pred = plain_module(compact)(x)
    assert torch.equal(pred, want)
    torch.testing.assert_close(conf, composed(x), atol=2e-5, rtol=1e-4)
    torch.save({"x": x, "want": want}, tmp_path / "data.pt")
    export_pt2(compact, tmp_path / "m.pt2", x[:4])
    export_onnx(compact, tmp_path / "m.onnx", x[:4])
    for fmt in ("pt2", "onnx"):
        run_without_modsplit(fmt, tmp_path / f"m.{fmt}", tmp_path / "data.pt", tmp_path)


def test_export_needs_a_batch_example(tmp_path):
    compact = make_bank(get_model("fc2", **ARCHS["fc2"])).compose([0, 1]).compact()
    with pytest.raises(ValueError, match="example"):
        export_pt2(compact, tmp_path / "m.pt2", torch.randn(1, 1, 8, 8))
