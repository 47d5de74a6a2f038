#!/usr/bin/env bash
# Packaging check, run by `bash .ci/run test` after the suite: in a fresh virtual environment,
#   pip install ".[app]"   (build isolation: pyproject.toml's build requirements)
#   import modsplit; modsplit --help; modsplit demo (tiny settings)
# and `pip wheel .` builds a wheel. The extension is built without its CUDA sources here
# (MODSPLIT_CUDA=0): the CUDA build is checked by the suite's own install; this checks packaging.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
export MODSPLIT_CUDA=0
"$py" -m pip wheel -q --no-deps -w "$work/dist" . 2>&1 | grep -v "^WARNING: Location" || true
wheel="$(ls "$work"/dist/modsplit-*.whl)"
echo "packaging: built $(basename "$wheel")"
"$py" -m pip install -q "$wheel[app]" 2>&1 | grep -v "^WARNING: Location" || true
cd "$work"   # away from the source tree: the installed package is what gets imported
"$py" - <<'PY'
import os
import modsplit
from modsplit.backend import load_triton
print("packaging: import modsplit", modsplit.__version__, "from", modsplit.__file__)
assert "site-packages" in modsplit.__file__, modsplit.__file__
assert modsplit._extension.LOAD_ERROR is None, modsplit._extension.LOAD_ERROR
kernels = load_triton(interpret=True)  # the Triton kernels, under modsplit's own namespace
assert kernels.__name__ == "modsplit.triton_kernels", kernels.__name__
assert kernels.__file__.startswith(os.path.dirname(modsplit.__file__)), kernels.__file__
import modsplit.app.cli  # noqa: E402,F401  (the app extra's dependencies are installed)
PY
"$work/venv/bin/modsplit" --help >/dev/null
"$work/venv/bin/modsplit" demo --train-epochs 2 --epochs 1 --out "$work/demo" --quiet
test -s "$work/demo/bank.msb"
echo "packaging: fresh-venv install, import, --help and demo passed"
