"""How topk_mask reports NaN scores without a host sync (the Triton twin of the CUDA op's rule).

The histogram kernel of the first radix pass sets a per-device int32 flag when a key is NaN.
  CPU tensors (the interpreter) and checked mode: the flag is read right after the launches and
      a NaN raises at once. Checked mode is MODSPLIT_NAN_CHECK=sync; on a GPU it costs one host
      sync per call and cannot run inside CUDA-graph capture.
  lazy mode (the default on a GPU, MODSPLIT_NAN_CHECK=lazy): no host sync, capturable. After its
      launches a call queues a non-blocking copy of the flag into pinned host memory and records
      an event; the next call on that device raises if that event has completed and the copy
      shows a NaN. A NaN is thus reported by a later call (usually the next one), never lost
      while calls continue; the mask computed from NaN scores is undefined.
"""
import os

import torch

ENV = "MODSPLIT_NAN_CHECK"
_MODES = ("lazy", "sync")
_state = {}  # device -> [flag (device int32 [1]), host copy (pinned int32 [1]), event or None]


def mode(device: torch.device) -> str:
    """'sync' (raise in the call) or 'lazy' (raise in a later call); CPU tensors are always
    'sync' (reading the flag is free there)."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw and raw not in _MODES:
        raise ValueError(f"modsplit: ${ENV} must be one of {', '.join(_MODES)}, got {raw!r}")
    if device.type != "cuda":
        return "sync" if raw != "lazy" else "lazy"
    return raw or "lazy"


def _error(earlier):
    when = "an earlier topk_mask call on this device" if earlier else "topk_mask"
    return ValueError(f"modsplit: scores contain NaN (found by {when}; "
                      f"${ENV}=sync reports it in the call itself)")


def flag_for(device: torch.device) -> torch.Tensor:
    """The device's NaN flag to hand to the kernel; first raises a NaN that an earlier lazy call
    saw (once its copy has landed)."""
    state = _state.get(device)
    if state is None:
        pinned = device.type == "cuda"
        state = [torch.zeros(1, dtype=torch.int32, device=device),
                 torch.zeros(1, dtype=torch.int32, pin_memory=pinned), None]
        _state[device] = state
    flag, host, event = state
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return flag  # no event query inside capture; the next eager call reports
    if (event is None or event.query()) and host.item():
        host.zero_()
        flag.zero_()
        raise _error(earlier=True)
    return flag


def after_launch(device: torch.device, flag: torch.Tensor) -> None:
    """Checks the flag now ('sync') or queues its copy for a later call ('lazy')."""
    state = _state[device]
    if mode(device) == "sync":
        if flag.item():
            flag.zero_()
            raise _error(earlier=False)
        return
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return  # captured replays keep setting the flag; the next eager call copies it
        state[1].copy_(flag, non_blocking=True)
        state[2] = state[2] or torch.cuda.Event()
        state[2].record()
    else:
        state[1].copy_(flag)
