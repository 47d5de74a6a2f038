"""The bank file: one versioned, checksummed file of named tensors plus a JSON header.

Layout (all integers little-endian):
  magic    8 bytes  b"MODSPLIT"
  version  u32      FORMAT_VERSION
  hlen     u64      length of the header
  header   hlen     UTF-8 JSON: {"meta": {...}, "tensors": [{name, dtype, shape, offset, nbytes}]}
  payload           the tensors' raw bytes (C order), at the header's offsets
  sha256   32 bytes digest of every byte before it
Nothing is pickled. read_file() checks magic, version, checksum and every tensor entry before it
builds any tensor, so a truncated, corrupt or foreign file is rejected whole. The same container
holds decomposition checkpoints (modsplit.checkpoint): meta["kind"] tells the two apart.

write_file() is durable: the bytes go to a temporary file in the target's folder, which is
flushed and fsync'ed, renamed over the target (os.replace, atomic on POSIX) and the folder is
fsync'ed, so after a crash the path holds either the old or the new complete file.
"""
import hashlib
import json
import os
import struct

import torch

from modsplit.errors import BankFileError

MAGIC = b"MODSPLIT"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
_DIGEST = 32
_DTYPES = {"int32": torch.int32, "int64": torch.int64, "float32": torch.float32,
           "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "bool": torch.bool, "uint8": torch.uint8}


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 hex of the model's architecture string (repr) and its state_dict tensors (names,
    dtypes, shapes, bytes): identifies the exact trained model a bank was decomposed from."""
    h = hashlib.sha256(repr(model).encode())
    for name, t in model.state_dict().items():
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_raw_bytes(t))
    return h.hexdigest()


def _fsync_dir(folder):
    """fsync a folder so that a rename inside it survives a crash (no-op where folders cannot
    be opened, e.g. Windows)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path, meta: dict, tensors: dict):
    """Write `meta` (JSON-serialisable) and `tensors` {name: tensor of a _DTYPES dtype} to
    `path`, atomically and durably (module docstring)."""
    entries, blobs, offset = [], [], 0
    for name, t in tensors.items():
        dtype = str(t.dtype).replace("torch.", "")
        if dtype not in _DTYPES:
            raise TypeError(f"modsplit: cannot store tensor {name!r} of dtype {t.dtype}")
        raw = _raw_bytes(t)
        entries.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset,
                        "nbytes": len(raw)})
        blobs.append(raw)
        offset += len(raw)
    header = json.dumps({"meta": meta, "tensors": entries}, sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(blobs)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(body + hashlib.sha256(body).digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_file(path) -> tuple:
    """-> (meta dict, {name: tensor}) of a file written by write_file. Raises BankFileError
    (naming the file and the problem) on anything but a complete, intact file of this version."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _PREFIX.size + _DIGEST or data[:8] != MAGIC:
        raise BankFileError(f"modsplit: {path} is not a modsplit bank file (bad magic or too "
                            "short)")
    _, version, hlen = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise BankFileError(f"modsplit: {path} has bank format version {version}; this modsplit "
                            f"reads version {FORMAT_VERSION}")
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise BankFileError(f"modsplit: {path} is truncated or corrupt (checksum mismatch)")
    start = _PREFIX.size + hlen
    payload = data[start:-_DIGEST]
    try:
        header = json.loads(data[_PREFIX.size:start].decode())
        tensors = {}
        for e in header["tensors"]:
            dtype = _DTYPES[e["dtype"]]
            n = torch.Size(e["shape"]).numel() * torch.empty((), dtype=dtype).element_size()
            if n != e["nbytes"] or e["offset"] < 0 or e["offset"] + n > len(payload):
                raise ValueError(f"tensor {e['name']!r} lies outside the payload")
            raw = bytearray(payload[e["offset"]:e["offset"] + n])
            tensors[e["name"]] = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(
                e["shape"]) if n else torch.empty(e["shape"], dtype=dtype)
        return header["meta"], tensors
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BankFileError(f"modsplit: {path} has a malformed header ({exc})") from exc
