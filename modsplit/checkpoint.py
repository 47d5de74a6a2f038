"""Checkpoints of a running decomposition, so that a killed run resumes where it stopped.

A checkpoint is one file in the bank-file container (modsplit.files: magic, format version,
JSON header, raw tensors, sha256; written atomically and fsync'ed) with meta["kind"] ==
"modsplit.Checkpoint" and its own meta["checkpoint_version"]. It holds the state of ALL modules
(a distributed run gathers its shards first), so a run may resume with another number of ranks:

  tensors  score/<layer>, momentum/score/<layer>   [K, *W.shape] scores and SGD momentum
           graft/weight, graft/bias, momentum/graft/weight, momentum/graft/bias
           anchor/<layer>                          S_avg of the stemming term (absent in epoch 1)
           norm/<layer>/running_mean, .../running_var  [K, C] per-module BatchNorm statistics
                                                   (batchnorm="module" with BatchNorm layers)
           acc/ce, acc/stem [K], acc/hits, acc/seen [K, 2]  the running epoch's metric sums
           rng/torch (+ rng/cuda<i>)               torch's generator states
  meta     fingerprint of the base model, config (every argument the result depends on),
           epoch (the epoch in progress, 1-based), step (its batches already trained), history,
           python_rng (random.getstate())
load() checks container, kind, version, model fingerprint and config before returning anything:
a truncated, corrupt, foreign, wrong-version or wrong-model checkpoint raises CheckpointError and
nothing is restored.
"""
import os
import random

import torch

from modsplit import files
from modsplit.errors import BankFileError, CheckpointError
from modsplit.module_norm import load_norm_statistics, norm_statistics

KIND = "modsplit.Checkpoint"
CHECKPOINT_VERSION = 1
FILE_NAME = "decompose.ckpt"


def path_in(folder) -> str:
    """The checkpoint file of a checkpoint folder."""
    return os.path.join(folder, FILE_NAME)


def rng_state() -> tuple:
    """(meta, tensors) of the RNG states a decomposition uses: torch CPU (and every CUDA
    device's, when CUDA is initialised) and Python's random module. numpy is not used."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng/cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, state, gauss = random.getstate()
    return {"python_rng": [version, list(state), gauss]}, tensors


def set_rng_state(meta: dict, tensors: dict):
    """Restore the states captured by rng_state()."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[f"rng/cuda{i}"] for i in range(len(tensors)) if f"rng/cuda{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python_rng"]
    random.setstate((version, tuple(state), gauss))


def save(path, fingerprint: str, config: dict, position: dict, tensors: dict):
    """Write a checkpoint atomically. position: {epoch, step, history}; tensors: the module
    state (module docstring). The RNG states of this process are added."""
    rng_meta, rng_tensors = rng_state()
    meta = {"kind": KIND, "checkpoint_version": CHECKPOINT_VERSION, "fingerprint": fingerprint,
            "config": config, **position, **rng_meta}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_file(path, meta, {**tensors, **rng_tensors})


def load(path, fingerprint: str, config: dict) -> tuple:
    """-> (meta, tensors) of the checkpoint at `path`, after checking that it is intact, of this
    checkpoint version, from the model with `fingerprint` and written with the same `config`.
    Raises CheckpointError otherwise."""
    try:
        meta, tensors = files.read_file(path)
    except BankFileError as exc:
        raise CheckpointError(f"{exc} (checkpoint; delete it or pass resume=False to start "
                              "over)") from exc
    if meta.get("kind") != KIND:
        raise CheckpointError(f"modsplit: {path} is not a decomposition checkpoint (kind "
                              f"{meta.get('kind')!r})")
    if meta.get("checkpoint_version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"modsplit: checkpoint {path} has checkpoint version "
                              f"{meta.get('checkpoint_version')}; this modsplit resumes version "
                              f"{CHECKPOINT_VERSION}")
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(f"modsplit: checkpoint {path} was written for a different model "
                              "(the architecture or the trained tensors differ)")
    stored = meta.get("config", {})
    differ = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
    if differ:
        raise CheckpointError(f"modsplit: checkpoint {path} was written with other settings: "
                              + ", ".join(f"{k} {stored.get(k)!r} (now {config.get(k)!r})"
                                          for k in differ))
    return meta, tensors


def _named_parameters(net, grafts) -> list:
    """[(checkpoint key, parameter)] of the trainable tensors of a decomposition."""
    pairs = [(f"score/{name}", layer.scores) for name, layer in net.masked_layers().items()]
    return pairs + [("graft/weight", grafts.weight), ("graft/bias", grafts.bias)]


def module_state(net, grafts, opt, anchors, sums: dict, shard) -> dict:
    """The tensors of a checkpoint (module docstring), every per-module tensor gathered over the
    shard's ranks (a collective: every rank calls it)."""
    local = {}
    for key, param in _named_parameters(net, grafts):
        local[key] = param.detach()
        buf = opt.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            local[f"momentum/{key}"] = buf
    local.update({f"acc/{k}": v for k, v in sums.items()})
    local.update({f"norm/{k}": v.detach() for k, v in norm_statistics(net).items()})
    state = shard.gather_dict(local)
    if anchors is not None:
        state.update({f"anchor/{name}": a for name, a in zip(net.masked_layers(), anchors)})
    return state


def restore(path, tensors: dict, net, grafts, opt, local, n: int, device) -> tuple:
    """Load a checkpoint's module state into this process's modules (indices `local` of the n
    modules): scores, grafts, momentum. Every tensor is checked before anything is copied.
    Returns (anchors list or None, the running epoch's sums)."""
    idx = torch.as_tensor(list(local), dtype=torch.long)
    pairs = _named_parameters(net, grafts)
    names = list(net.masked_layers())
    anchors = [f"anchor/{name}" for name in names]
    want = {key: (n, *param.shape[1:]) for key, param in pairs}
    want.update({f"momentum/{key}": shape for key, shape in want.items()
                 if f"momentum/{key}" in tensors})
    want.update({"acc/ce": (n,), "acc/stem": (n,), "acc/hits": (n, 2), "acc/seen": (n, 2)})
    if anchors[0] in tensors:
        want.update({a: tuple(p.shape[1:]) for a, (_, p) in zip(anchors, pairs)})
    for key, shape in want.items():
        if key not in tensors or tuple(tensors[key].shape) != shape:
            found = tuple(tensors[key].shape) if key in tensors else "missing"
            raise CheckpointError(f"modsplit: checkpoint {path}: {key} is {found}, expected "
                                  f"{shape}")
    norms = {k[len("norm/"):]: v for k, v in tensors.items() if k.startswith("norm/")}
    try:  # checks every statistic before copying any, and before the parameters are copied
        load_norm_statistics(net, norms, idx, f"modsplit: checkpoint {path}")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    with torch.no_grad():
        for key, param in pairs:
            param.copy_(tensors[key][idx])
            if f"momentum/{key}" in tensors:
                opt.state[param]["momentum_buffer"] = tensors[f"momentum/{key}"][idx].to(device)
    sums = {k: tensors[f"acc/{k}"][idx].to(device) for k in ("ce", "stem", "hits", "seen")}
    restored = [tensors[a].to(device) for a in anchors] if anchors[0] in tensors else None
    return restored, sums
