"""Wrong inputs to every op and public wrapper: each must raise, with a message naming the argument.

CASES is the table (call, wrong input, exception type, regex the message must match). It also
renders docs/errors.md: regenerate that file with

    python tests/test_bad_inputs.py    (from the repository root, modsplit importable)

and test_errors_doc_is_current fails when the file is out of date. A case the current code gets
wrong stays in the table as pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=...)):
fixing the code turns it into an XPASS failure, the signal to remove the mark.
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from modsplit import backend, functional, ops
from modsplit import reference as ref

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_PATH = os.path.join(_REPO, "docs", "errors.md")


@dataclass(frozen=True)
class Case:
    """One wrong input: `call` (no arguments) must raise `error` whose message matches `match`."""
    api: str
    description: str
    call: Callable
    error: type
    match: str


def _rand(*shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)), dtype=dtype)


def _packed(*shape, batch_dims=0):
    """A valid packed mask for a weight (or bank) of `shape`."""
    m = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.5
    return ref.pack_mask(m, batch_dims)


def _nan_scores(*shape):
    s = _rand(*shape)
    s.view(-1)[1] = float("nan")
    return s


@contextlib.contextmanager
def _env(name, value):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _with_backend(name, fn):
    with backend.use(name):
        return fn()


def _with_env(name, value, fn):
    with _env(name, value):
        return fn()


def _with_env_backend(value, fn):
    return _with_env(backend.ENV_VAR, value, fn)


# Linear: weight [5, 40] (2 words per row), x [3, 40], bank of K=2.
W, X, P = _rand(5, 40), _rand(3, 40), _packed(5, 40)
PK, XK = _packed(2, 5, 40, batch_dims=1), _rand(2, 3, 40)
SK = _rand(2, 5, 40)
# Conv: weight [6, 2, 3, 3] with groups=2, x [2, 4, 8, 8], bank of K=3.
CW, CX, CP = _rand(6, 2, 3, 3), _rand(2, 4, 8, 8), _packed(6, 2, 3, 3)
CPK, CSK = _packed(3, 6, 2, 3, 3, batch_dims=1), _rand(3, 6, 2, 3, 3)

_X_NAMED = r"modsplit: .*\bx\b"


def _cases():
    c = []
    for op, shape, short in (("topk_mask", (5, 40), (40,)),
                             ("multi_topk_mask", (2, 5, 40), (5, 40))):
        f = getattr(ops, op)
        api = f"ops.{op}"
        c += [
            Case(api, "int32 scores", lambda f=f, s=shape: f(_rand(*s).int(), 0.5),
                 RuntimeError, r"\bscores\b.*(float|dtype)"),
            Case(api, "bool scores", lambda f=f, s=shape: f(_rand(*s) > 0, 0.5),
                 RuntimeError, r"\bscores\b.*(float|dtype)"),
            Case(api, f"scores with {len(short)} dim(s)", lambda f=f, s=short: f(_rand(*s), 0.5),
                 RuntimeError, r"\bscores\b.*dims"),
            Case(api, "empty scores", lambda f=f, s=shape: f(_rand(*s)[..., :0], 0.5),
                 RuntimeError, r"\bscores\b.*empty"),
            Case(api, "NaN in scores", lambda f=f, s=shape: f(_nan_scores(*s), 0.5),
                 RuntimeError, r"\bscores\b.*NaN"),
        ]
        for d in (0.0, -1.0, 1.5, float("nan"), float("inf")):
            c.append(Case(api, f"density={d}", lambda f=f, s=shape, d=d: f(_rand(*s), d),
                          RuntimeError, r"\bdensity\b"))

    c += [
        Case("ops.pack_mask", "float mask (bool expected)",
             lambda: ops.pack_mask(_rand(2, 3)), RuntimeError, r"\bmask\b.*bool"),
        Case("ops.pack_mask", "int32 mask (bool expected)",
             lambda: ops.pack_mask(torch.ones(2, 3, dtype=torch.int32)), RuntimeError,
             r"\bmask\b.*bool"),
        Case("ops.pack_mask", "1-D mask", lambda: ops.pack_mask(torch.ones(3, dtype=torch.bool)),
             RuntimeError, r"\bmask\b.*dims"),
        Case("ops.pack_mask", "batch_dims=1 leaves no column dim in a 2-D mask",
             lambda: ops.pack_mask(torch.ones(2, 3, dtype=torch.bool), 1), RuntimeError,
             r"\bbatch_dims\b"),
        Case("ops.pack_mask", "batch_dims=-1",
             lambda: ops.pack_mask(torch.ones(2, 3, dtype=torch.bool), -1), RuntimeError,
             r"\bbatch_dims\b.*(-1|>= ?0|non-?negative)"),

        Case("ops.unpack_mask", "float packed", lambda: ops.unpack_mask(P.float(), (5, 40)),
             RuntimeError, r"\bpacked\b.*int32"),
        Case("ops.unpack_mask", "int64 packed", lambda: ops.unpack_mask(P.long(), (5, 40)),
             RuntimeError, r"\bpacked\b.*int32"),
        Case("ops.unpack_mask", "shape needs more words than packed has",
             lambda: ops.unpack_mask(P, (5, 70)), RuntimeError, r"\bshape\b.*\bwords\b"),
        Case("ops.unpack_mask", "shape's rows differ from packed's",
             lambda: ops.unpack_mask(P, (4, 40)), RuntimeError, r"\bshape\b.*\bpacked\b"),
        Case("ops.unpack_mask", "shape without column dims", lambda: ops.unpack_mask(P, (5,)),
             RuntimeError, r"\bshape\b"),
        Case("ops.unpack_mask", "1-D packed (no row dim)",
             lambda: ops.unpack_mask(P[0], (40,)), RuntimeError, r"\bpacked\b"),
        Case("ops.unpack_mask", "negative sizes in shape",
             lambda: ops.unpack_mask(P, (5, -2, -20)), RuntimeError, r"modsplit: .*\bshape\b"),
    ]

    lin = "ops.masked_linear"
    c += [
        Case(lin, "float64 packed", lambda: ops.masked_linear(X, W, P.double()), RuntimeError,
             r"\bpacked\b.*int32"),
        Case(lin, "bool packed", lambda: ops.masked_linear(X, W, P.bool()), RuntimeError,
             r"\bpacked\b.*int32"),
        Case(lin, "packed has 4 rows for a weight of 5",
             lambda: ops.masked_linear(X, W, P[:4]), RuntimeError, r"\bpacked\b.*\bweight\b"),
        Case(lin, "packed has 3 words per row, weight needs 2",
             lambda: ops.masked_linear(X, W, torch.zeros(5, 3, dtype=torch.int32)),
             RuntimeError, r"\bpacked\b.*\bweight\b"),
        Case(lin, "3-D packed (a bank) for one layer", lambda: ops.masked_linear(X, W, PK),
             RuntimeError, r"\bpacked\b.*dims"),
        Case(lin, "x last dim 41 != in_features 40",
             lambda: ops.masked_linear(_rand(3, 41), W, P), RuntimeError,
             _X_NAMED + r".*in_features"),
        Case(lin, "0-d x", lambda: ops.masked_linear(torch.tensor(1.0), W, P), RuntimeError,
             _X_NAMED),
        Case(lin, "float64 x, float32 weight", lambda: ops.masked_linear(X.double(), W, P),
             RuntimeError, _X_NAMED + r".*dtype"),
        Case(lin, "int32 weight", lambda: ops.masked_linear(X, W.int(), P), RuntimeError,
             r"\bweight\b.*(float|dtype)"),
        Case(lin, "1-D weight", lambda: ops.masked_linear(X, W[0], P), RuntimeError,
             r"\bweight\b"),
        Case(lin, "bias of shape [4]", lambda: ops.masked_linear(X, W, P, _rand(4)),
             RuntimeError, r"\bbias\b.*shape"),
        Case(lin, "bias of shape [1, 5]", lambda: ops.masked_linear(X, W, P, _rand(1, 5)),
             RuntimeError, r"\bbias\b.*shape"),
        Case(lin, "float64 bias", lambda: ops.masked_linear(X, W, P, _rand(5).double()),
             RuntimeError, r"\bbias\b.*dtype"),
    ]

    mlin = "ops.multi_masked_linear"
    c += [
        Case(mlin, "x has 3 modules, packed K=2",
             lambda: ops.multi_masked_linear(_rand(3, 2, 40), W, PK), RuntimeError,
             _X_NAMED + r".*\bK\b"),
        Case(mlin, "1-D x without shared_input",
             lambda: ops.multi_masked_linear(_rand(40), W, PK), RuntimeError,
             _X_NAMED + r".*\bK\b"),
        Case(mlin, "2-D packed (one layer) for a bank",
             lambda: ops.multi_masked_linear(XK, W, P), RuntimeError, r"\bpacked\b.*dims"),
        Case(mlin, "packed words mismatch",
             lambda: ops.multi_masked_linear(XK, W, torch.zeros(2, 5, 1, dtype=torch.int32)),
             RuntimeError, r"\bpacked\b.*\bweight\b"),
        Case(mlin, "shared x last dim 41 != in_features 40",
             lambda: ops.multi_masked_linear(_rand(2, 41), W, PK, shared_input=True),
             RuntimeError, _X_NAMED + r".*in_features"),
        Case(mlin, "float64 packed", lambda: ops.multi_masked_linear(XK, W, PK.double()),
             RuntimeError, r"\bpacked\b.*int32"),
        Case(mlin, "bias of shape [3]", lambda: ops.multi_masked_linear(XK, W, PK, _rand(3)),
             RuntimeError, r"\bbias\b.*shape"),
        Case(mlin, "float64 bias",
             lambda: ops.multi_masked_linear(XK, W, PK, _rand(5).double()), RuntimeError,
             r"\bbias\b.*dtype"),
        Case(mlin, "empty bank (K=0)",
             lambda: ops.multi_masked_linear(_rand(0, 3, 40), W, PK[:0]), RuntimeError,
             r"modsplit: .*(\bK\b|\bpacked\b)"),
    ]

    conv = "ops.masked_conv2d"
    c += [
        Case(conv, "x has 5 channels, weight expects 4",
             lambda: ops.masked_conv2d(_rand(2, 5, 8, 8), CW, CP, groups=2), RuntimeError,
             _X_NAMED + r".*channels"),
        Case(conv, "groups=4 does not divide out_channels=6",
             lambda: ops.masked_conv2d(_rand(2, 8, 8, 8), CW, CP, groups=4), RuntimeError,
             r"\bgroups\b"),
        Case(conv, "groups=3 does not divide x's 4 channels",
             lambda: ops.masked_conv2d(CX, _rand(6, 4, 3, 3), _packed(6, 4, 3, 3), groups=3),
             RuntimeError, _X_NAMED + r".*channels"),
        Case(conv, "groups=0", lambda: ops.masked_conv2d(CX, CW, CP, groups=0), RuntimeError,
             r"\bgroups\b"),
        Case(conv, "3-D x", lambda: ops.masked_conv2d(CX[0], CW, CP, groups=2), RuntimeError,
             _X_NAMED),
        Case(conv, "3-D weight",
             lambda: ops.masked_conv2d(CX, CW[:, 0], _packed(6, 3, 3), groups=2), RuntimeError,
             r"\bweight\b"),
        Case(conv, "float64 x, float32 weight",
             lambda: ops.masked_conv2d(CX.double(), CW, CP, groups=2), RuntimeError,
             _X_NAMED + r".*dtype"),
        Case(conv, "packed has 0 words per row, weight needs 1",
             lambda: ops.masked_conv2d(CX, CW, CP[:, :0], groups=2), RuntimeError,
             r"\bpacked\b.*\bweight\b"),
        Case(conv, "float64 packed", lambda: ops.masked_conv2d(CX, CW, CP.double(), groups=2),
             RuntimeError, r"\bpacked\b.*int32"),
        Case(conv, "bias of shape [5]",
             lambda: ops.masked_conv2d(CX, CW, CP, _rand(5), groups=2), RuntimeError,
             r"\bbias\b.*shape"),
        Case(conv, "stride=0", lambda: ops.masked_conv2d(CX, CW, CP, stride=0, groups=2),
             RuntimeError, r"\bstride\b"),
        Case(conv, "stride of 3 values",
             lambda: ops.masked_conv2d(CX, CW, CP, stride=(1, 1, 1), groups=2), RuntimeError,
             r"\bstride\b"),
        Case(conv, "padding=-1", lambda: ops.masked_conv2d(CX, CW, CP, padding=-1, groups=2),
             RuntimeError, r"\bpadding\b"),
        Case(conv, "dilation=0", lambda: ops.masked_conv2d(CX, CW, CP, dilation=0, groups=2),
             RuntimeError, r"\bdilation\b"),
        Case(conv, "3x3 kernel over a 2x2 input, no padding",
             lambda: ops.masked_conv2d(_rand(2, 4, 2, 2), CW, CP, groups=2),
             RuntimeError, r"modsplit: .*\b(x|weight)\b"),
    ]

    mconv = "ops.multi_masked_conv2d"
    c += [
        Case(mconv, "x has 2 modules, packed K=3",
             lambda: ops.multi_masked_conv2d(_rand(2, 2, 4, 8, 8), CW, CPK, groups=2),
             RuntimeError, _X_NAMED + r".*\bK\b"),
        Case(mconv, "3-D x", lambda: ops.multi_masked_conv2d(CX[0], CW, CPK, groups=2),
             RuntimeError, _X_NAMED),
        Case(mconv, "2-D packed (one layer) for a bank",
             lambda: ops.multi_masked_conv2d(CX, CW, CP, groups=2), RuntimeError,
             r"\bpacked\b.*dims"),
        Case(mconv, "x has 5 channels, weight expects 4",
             lambda: ops.multi_masked_conv2d(_rand(2, 5, 8, 8), CW, CPK, groups=2),
             RuntimeError, _X_NAMED + r".*channels"),
        Case(mconv, "bias of shape [5]",
             lambda: ops.multi_masked_conv2d(CX, CW, CPK, _rand(5), groups=2), RuntimeError,
             r"\bbias\b.*shape"),
        Case(mconv, "float64 bias",
             lambda: ops.multi_masked_conv2d(CX, CW, CPK, _rand(6).double(), groups=2),
             RuntimeError, r"\bbias\b.*dtype"),
    ]

    flin, fconv = "functional.multi_masked_linear", "functional.multi_masked_conv2d"
    c += [
        Case(flin, "x last dim 41 != in_features 40",
             lambda: functional.multi_masked_linear(_rand(2, 3, 41), W, SK, PK), RuntimeError,
             _X_NAMED + r".*in_features"),
        Case(flin, "packed words mismatch",
             lambda: functional.multi_masked_linear(
                 XK, W, SK, torch.zeros(2, 5, 1, dtype=torch.int32)),
             RuntimeError, r"\bpacked\b.*\bweight\b"),
        Case(flin, "scores [2, 5, 41] for a weight [5, 40]",
             lambda: functional.multi_masked_linear(XK, W, _rand(2, 5, 41), PK),
             RuntimeError, r"\bscores\b"),
        Case(flin, "scores for K=1 module, packed K=2",
             lambda: functional.multi_masked_linear(XK, W, _rand(1, 5, 40), PK),
             RuntimeError, r"\bscores\b"),
        Case(fconv, "x has 5 channels, weight expects 4",
             lambda: functional.multi_masked_conv2d(_rand(2, 5, 8, 8), CW, CSK, CPK, groups=2),
             RuntimeError, _X_NAMED + r".*channels"),
        Case(fconv, "scores [3, 6, 2, 3, 2] for a weight [6, 2, 3, 3]",
             lambda: functional.multi_masked_conv2d(CX, CW, CSK[..., :2], CPK,
                                                    groups=2),
             RuntimeError, r"\bscores\b"),
    ]

    c += [
        Case("set_backend", "unknown name 'foo'", lambda: backend.set_backend("foo"),
             ValueError, r"\bbackend\b.*'foo'"),
        Case("set_backend", "a non-string (3)", lambda: backend.set_backend(3), ValueError,
             r"\bbackend\b.*\b3\b"),
        Case("backend.use", "unknown name 'gpu'", lambda: _with_backend("gpu", lambda: None),
             ValueError, r"\bbackend\b.*'gpu'"),
        Case("$MODSPLIT_BACKEND", "unknown name 'bar', then an op call",
             lambda: _with_env_backend("bar", lambda: ops.topk_mask(W, 0.5)), ValueError,
             r"'bar'.*MODSPLIT_BACKEND|MODSPLIT_BACKEND.*'bar'"),
        Case("$MODSPLIT_SPARSE_CONV_MAX_DENSITY", "'dense', then a conv op call on the CPU",
             lambda: _with_env("MODSPLIT_SPARSE_CONV_MAX_DENSITY", "dense",
                               lambda: ops.multi_masked_conv2d(
                                   CX, _rand(6, 4, 3, 3), _packed(3, 6, 4, 3, 3, batch_dims=1),
                                   None)),
             RuntimeError, r"MODSPLIT_SPARSE_CONV_MAX_DENSITY.*'dense'"),
        Case("backend.use", "'cuda' with a CPU tensor",
             lambda: _with_backend("cuda", lambda: ops.masked_linear(X, W, P)), RuntimeError,
             r"\bbackend\b.*'cuda'.*cpu"),
    ]
    return [pytest.param(p) if isinstance(p, Case) else p for p in c]


CASES = _cases()


def _case_id(case):
    return f"{case.api}: {case.description}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(p.values[0]) for p in CASES])
def test_bad_input_raises_naming_argument(case):
    with pytest.raises(case.error, match=case.match):
        case.call()


def _cell(text):
    return str(text).replace("|", r"\|")


def render_errors_doc(cases=CASES) -> str:
    """docs/errors.md: the table of wrong inputs and the errors they raise."""
    lines = [
        "# Errors on wrong inputs",
        "",
        "Generated from `tests/test_bad_inputs.py` (`python tests/test_bad_inputs.py`); do not "
        "edit by hand.",
        "Each row is a test: the call must raise the exception, whose message must match the "
        "regular expression (`re.search`), which names the wrong argument.",
        "Rows marked *known issue* are strict xfails: the code does not yet behave as the row "
        "says.",
        "",
        "| call | wrong input | raises | message matches | status |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in cases:
        case = p.values[0]
        reasons = [m.kwargs["reason"] for m in p.marks if m.name == "xfail"]
        status = f"known issue: {reasons[0]}" if reasons else "ok"
        lines.append(f"| `{case.api}` | {_cell(case.description)} | `{case.error.__name__}` "
                     f"| `{_cell(case.match)}` | {_cell(status)} |")
    lines += [
        "",
        "## Numerics",
        "",
        "- NaN in `scores` raises (`topk_mask`, `multi_topk_mask`); `+inf` and `-inf` are valid "
        "scores with the largest magnitude, so they are kept first (ties to the lower flat "
        "index).",
        "- A layer keeps `max(1, floor(density * n + 0.5))` entries per module: a density with "
        "`density * n < 0.5` still keeps exactly one (the largest `|score|`).",
        "- NaN or inf in `x` propagate as in `F.linear` / `F.conv2d` on `W * M`: a masked-out "
        "weight multiplies its input by 0, so `NaN * 0` and `inf * 0` give NaN there too.",
        "",
    ]
    return "\n".join(lines)


def test_errors_doc_is_current():
    with open(DOC_PATH) as f:
        assert f.read() == render_errors_doc(), \
            "docs/errors.md is out of date: run python tests/test_bad_inputs.py"


if __name__ == "__main__":
    os.makedirs(os.path.dirname(DOC_PATH), exist_ok=True)
    with open(DOC_PATH, "w") as f:
        f.write(render_errors_doc())
