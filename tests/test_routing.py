"""modsplit.routing: the fused-row threshold and the scratch bound, their environment overrides
and test overrides, and agreement with the CUDA extension's copy (csrc/cuda/routing.cuh)."""
import os
import re

import pytest
import torch

from modsplit import routing

_HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc",
                       "cuda", "routing.cuh")


def _header():
    return open(_HEADER, encoding="utf-8").read()


def test_cuda_header_has_the_same_thresholds():
    text = _header()
    names = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
             torch.float64: "Double"}
    for dtype, name in names.items():
        found = re.search(rf"kFusedMaxRows{name} = (\d+);", text)
        assert found and int(found.group(1)) == routing.FUSED_MAX_ROWS[dtype], name
    scratch = re.search(r"kScratchBytes = int64_t\{(\d+)\} << (\d+);", text)
    assert scratch and int(scratch.group(1)) << int(scratch.group(2)) == routing.SCRATCH_BYTES
    assert f'"{routing.ENV_ROWS}"' in text and f'"{routing.ENV_SCRATCH}"' in text


@pytest.mark.parametrize("dtype", list(routing.FUSED_MAX_ROWS), ids=str)
def test_both_sides_of_the_default_threshold(monkeypatch, dtype):
    monkeypatch.delenv(routing.ENV_ROWS, raising=False)
    t = routing.FUSED_MAX_ROWS[dtype]
    assert routing.fused_max_rows(dtype) == t
    assert routing.use_fused(t, dtype)  # rows <= t: fused (t = 0: only an empty batch)
    assert not routing.use_fused(t + 1, dtype)


def test_environment_and_override(monkeypatch):
    monkeypatch.setenv(routing.ENV_ROWS, "300")
    monkeypatch.setenv(routing.ENV_SCRATCH, "1000")
    assert routing.use_fused(300, torch.bfloat16) and not routing.use_fused(301, torch.bfloat16)
    assert routing.module_chunk(10, 300) == 3
    with routing.override(fused_max_rows=0, scratch_bytes=10**9):
        assert not routing.use_fused(1, torch.float16)
        assert routing.module_chunk(10, 300) == 10
        with routing.override(fused_max_rows=4):
            assert routing.use_fused(4, torch.float16) and routing.module_chunk(10, 300) == 10
        assert not routing.use_fused(1, torch.float16)
    assert routing.fused_max_rows(torch.float32) == 300 and routing.scratch_bytes() == 1000


@pytest.mark.parametrize("raw", ["many", "-1", "1.5"])
def test_bad_environment_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(routing.ENV_ROWS, raw)
    with pytest.raises(ValueError, match=routing.ENV_ROWS):
        routing.fused_max_rows(torch.float32)
