"""Memory estimate of a decomposition, and a check that raises before training runs out of memory.

decompose() trains K modules at once: every nn.Linear / nn.Conv2d weight W of the (frozen) model
gets a float score bank [K, *W.shape], which needs a gradient and the optimizer's state buffers of
the same size, and the K-module network runs a batch K times over (activations scale with K).
estimate_decompose_memory() adds these up; check_memory() compares the total with the memory
available on the model's device and raises ModsplitMemoryError, with the fix, when it does not fit.
"""
import math

import torch
import torch.nn as nn

from modsplit.errors import ModsplitMemoryError

# The layer types decompose() masks: modsplit.convert replaces modules of exactly these types.
MASKABLE = (nn.Linear, nn.Conv2d)

# Optimizer state buffers per trainable element, in units of one score bank.
OPTIMIZER_STATE = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}

# Temporaries of one training step, in units of the largest layer's K-module score bank: its
# score gradient before the sign(S) product, the stemming term's |S - S_avg|, and the optimizer's
# per-tensor temporaries (weight decay and Nesterov each add into a fresh tensor).
_STEP_TEMPORARIES = 3


def format_bytes(n) -> str:
    """n bytes as a short human-readable string: '512 B', '3.00 KiB', '1.50 GiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _activation_bytes_per_sample(model, input_shape, dtype, device) -> int:
    """Bytes of one sample's input plus the outputs of every leaf module in one forward pass of
    the model (eval mode, no grad): the activations a backward pass keeps, per sample."""
    leaves = [m for m in model.modules() if not list(m.children())]
    total = [0]

    def count(_module, _inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    sample = torch.zeros((1, *input_shape), dtype=dtype, device=device)
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return sample.numel() * sample.element_size() + total[0]


def estimate_decompose_memory(model: nn.Module, n_modules: int, optimizer: str = "sgd-momentum",
                              batch_size: int = 32, input_shape=None) -> dict:
    """Estimated peak memory, in bytes, of decomposing `model` into `n_modules` modules at once.

    model: the trained nn.Module (its nn.Linear / nn.Conv2d weights get masks). optimizer: one
    of OPTIMIZER_STATE ("sgd", "sgd-momentum", "adam", "adamw"). input_shape: one sample's
    shape without the batch dim, e.g. (3, 32, 32); when given, a forward pass of one zero sample
    measures the activations. Returns a dict with integer byte counts:

      weights        parameters and buffers of the frozen copy decompose() makes (the caller's
                     original model already occupies memory and is not counted)
      scores         the K score banks, [K, *W.shape] per masked layer, in W's dtype
      gradients      their gradients (same size as scores)
      optimizer_state  the optimizer's state (momentum: one buffer per score; Adam: two)
      packed_masks   the K packed int32 masks, [K, O, ceil(R/32)] per masked layer
      workspace      a training step's temporaries: 3 x the largest layer's K score bank (the
                     score gradient before sign(S), |S - S_avg| of stemming, the optimizer's
                     weight-decay / Nesterov temporaries)
      activations    K * batch_size * (input + every leaf module's output) of one sample, or 0
                     when input_shape is None
      total          the sum of the above
      per_module     the part of total that grows with each module (total - weights) / K
      n_modules, device (torch.device of the model's parameters), optimizer, batch_size
    """
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(f"modsplit: optimizer must be one of {', '.join(OPTIMIZER_STATE)}, got "
                         f"{optimizer!r}")
    k = int(n_modules)
    if k < 1:
        raise ValueError(f"modsplit: n_modules must be >= 1, got {n_modules}")
    if int(batch_size) < 1:
        raise ValueError(f"modsplit: batch_size must be >= 1, got {batch_size}")
    params = list(model.parameters())
    if not params:
        raise ValueError("modsplit: model has no parameters")
    layers = [m for m in model.modules() if type(m) in MASKABLE]
    if not layers:
        raise ValueError("modsplit: model has no nn.Linear or nn.Conv2d layer to decompose")

    weights = sum(t.numel() * t.element_size() for t in (*params, *model.buffers()))
    score_bytes = [m.weight.numel() * m.weight.element_size() for m in layers]
    scores = k * sum(score_bytes)
    packed = k * sum(m.weight.shape[0] * math.ceil(m.weight[0].numel() / 32) * 4 for m in layers)
    workspace = _STEP_TEMPORARIES * k * max(score_bytes)
    activations = 0
    if input_shape is not None:
        per_sample = _activation_bytes_per_sample(model, tuple(input_shape), params[0].dtype,
                                                  params[0].device)
        activations = k * int(batch_size) * per_sample
    parts = {
        "weights": weights,
        "scores": scores,
        "gradients": scores,
        "optimizer_state": OPTIMIZER_STATE[optimizer] * scores,
        "packed_masks": packed,
        "workspace": workspace,
        "activations": activations,
    }
    total = sum(parts.values())
    return {**parts, "total": total, "per_module": (total - weights) // k, "n_modules": k,
            "device": params[0].device, "optimizer": optimizer, "batch_size": int(batch_size)}


def _meminfo_available():
    """MemAvailable of /proc/meminfo in bytes, or None where that file is missing (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except OSError:
        return None
    return None


def available_memory(device):
    """(bytes free on `device`, where that number comes from): torch.cuda.mem_get_info for a CUDA
    device, /proc/meminfo's MemAvailable for the CPU; (None, reason) when it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free memory of {device}"
    if device.type == "cpu":
        free = _meminfo_available()
        if free is None:
            return None, "/proc/meminfo is not readable on this system"
        return free, "MemAvailable in /proc/meminfo"
    return None, f"free memory of a {device.type} device is not known"


def check_memory(estimate: dict, limit_bytes=None):
    """Raise ModsplitMemoryError if estimate["total"] exceeds the memory available.

    estimate: a dict from estimate_decompose_memory. limit_bytes: the budget in bytes; default
    the free memory of estimate["device"] (available_memory). Returns the budget used, or None
    when no limit is given and the device's free memory cannot be known (nothing is checked).
    """
    if limit_bytes is None:
        available, source = available_memory(estimate["device"])
        if available is None:
            return None
    else:
        available, source = int(limit_bytes), "limit_bytes"
    needed = estimate["total"]
    if needed <= available:
        return available
    k = estimate["n_modules"]
    fit = max(0, (available - estimate["weights"]) // max(estimate["per_module"], 1))
    parts = ", ".join(f"{name} {format_bytes(estimate[name])}" for name in (
        "weights", "scores", "gradients", "optimizer_state", "packed_masks", "workspace",
        "activations")
        if estimate[name])
    raise ModsplitMemoryError(
        f"modsplit: decomposing {k} modules at once needs about {format_bytes(needed)} "
        f"({parts}) but only {format_bytes(available)} is available ({source}). About "
        f"{format_bytes(estimate['per_module'])} per module: at most {fit} modules fit. Train "
        "fewer modules per rank: split the classes over several processes (distributed "
        "decomposition), or decompose a subset at a time with decompose(..., classes=[...]); a "
        "smaller batch_size lowers the activations.", needed, available)
