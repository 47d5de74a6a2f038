"""The compose command's output file and report: write a composition as a compact model, .pt2 or
ONNX file, load it back, and measure its size and latency (batch 1 and 64) against the base
model (modsplit.app.latency)."""
import torch

from modsplit.app.latency import compare_latency, file_bytes, state_dict_bytes
from modsplit.compact import CompactModel
from modsplit.plain_export import export_onnx, export_pt2


def write_composed(composed, fmt, path, example):
    """Write `composed` (a ComposedModel) as `fmt` ("compact", "pt2", "onnx") to `path`; returns
    the file loaded back as a callable x [B, ...] -> confidences [B, K] (None for ONNX when
    onnxruntime is missing). example: an input batch [2, ...] (traced by the plain exports)."""
    compact = composed.compact()
    if fmt == "compact":
        compact.save(path)
        return CompactModel.load(path)
    if fmt == "pt2":
        export_pt2(compact, path, example)
        program = torch.export.load(path).module()
        return lambda x: program(x)[0]
    export_onnx(compact, path, example)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["confidences"], {"x": x.numpy()})[0])


def size_and_latency(model, path, loaded, test_set, classes) -> dict:
    """{"bytes", "base_bytes" (torch.save of the base state_dict), "size_ratio", "latency_us"
    {"base" | "composed": {"b1", "b64"}} (median µs; composed absent when loaded is None),
    "latency_ratio"} on test images of `classes`."""
    x, y = test_set.tensors
    xs = x[torch.isin(y, torch.tensor(classes))]
    xs = torch.cat([xs] * (-(-64 // max(len(xs), 1)))) if len(xs) < 64 else xs
    inputs = {"b1": xs[:1].contiguous(), "b64": xs[:64].contiguous()}
    candidates = {"base": model.eval()}
    if loaded is not None:
        candidates["composed"] = loaded
    latency = compare_latency(candidates, inputs, rounds=7)
    size, base = file_bytes(path), state_dict_bytes(model)
    out = {"bytes": size, "base_bytes": base, "size_ratio": size / base, "latency_us": latency}
    if loaded is not None:
        out["latency_ratio"] = {b: latency["composed"][b] / latency["base"][b] for b in inputs}
    return out


def summary(results) -> str:
    """Two lines: size and latency against the base model."""
    lines = [f"file {results['bytes']:,} bytes = {results['size_ratio']:.2f} x the base model's "
             f"state_dict ({results['base_bytes']:,} bytes)"]
    lat = results["latency_us"]
    if "composed" in lat:
        lines.append("latency " + ", ".join(
            f"batch {b[1:]}: {lat['composed'][b]:.0f} µs vs base {lat['base'][b]:.0f} µs "
            f"({results['latency_ratio'][b]:.2f} x)" for b in ("b1", "b64")))
    else:
        lines.append("latency: not measured (onnxruntime is not installed)")
    return "\n".join(lines)
