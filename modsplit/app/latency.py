"""Latency and size of a composed model's forms against the base model, measured alike: same
threads, same inputs, warmed up alike, calls of the candidates interleaved round by round (so that
load from other processes hits every candidate equally), median over rounds."""
import io
import os
import statistics
import time

import torch


def state_dict_bytes(model) -> int:
    """Bytes of torch.save(model.state_dict())."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def file_bytes(path) -> int:
    return os.path.getsize(path)


@torch.inference_mode()
def compare_latency(candidates: dict, inputs: dict, rounds: int = 15, min_time: float = 0.02):
    """candidates {name: callable(x)}, inputs {label: x tensor} -> {name: {label: µs per call}}:
    per round and input, every candidate (in rotating order) runs a block of calls sized to last
    about `min_time` s (sized once, after a warm-up); the median over rounds of the mean call
    time of a block."""
    names = list(candidates)
    blocks = {}
    for label, x in inputs.items():
        for name in names:
            fn = candidates[name]
            for _ in range(3):
                fn(x)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < min_time / 4:
                fn(x)
                n += 1
            blocks[name, label] = max(1, 4 * n)
    times = {(name, label): [] for name in names for label in inputs}
    for r in range(rounds):
        for label, x in inputs.items():
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn, n = candidates[name], blocks[name, label]
                start = time.perf_counter()
                for _ in range(n):
                    fn(x)
                times[name, label].append((time.perf_counter() - start) / n * 1e6)
    return {name: {label: statistics.median(times[name, label]) for label in inputs}
            for name in names}
