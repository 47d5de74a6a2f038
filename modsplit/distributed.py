"""Distributed co-training: the K modules of a decomposition sharded over torch.distributed ranks.

Rank r of W trains a contiguous block of the classes' modules (Shard.split) on the full data
stream (every rank iterates the same loader in the same order). What couples the modules is
exchanged with torch.distributed collectives (gloo on CPU, NCCL on GPUs):
  - S_avg of the stemming term, once per epoch (Shard.module_sum);
  - the per-module epoch metrics and packed masks (Shard.gather), so every rank computes the same
    history (JI, RPs) from all modules;
  - the checkpoint state (gathered; rank 0 writes, every rank reads its block back on resume);
  - the final bank (packed masks and grafts), returned complete on every rank.

Bit-identity. A module's forward/backward/optimizer step only reads that module's scores, so a
module's trajectory does not depend on which other modules share its process, PROVIDED the CPU
kernels reduce the same way for every grouping: with one intra-op thread per process
(torch.set_num_threads(1), torchrun's default OMP_NUM_THREADS=1) they do; with several threads
the at::mm calls inside the kernels may split their reductions differently for different K and
differ in the last bit. S_avg is summed module after module in class order, each rank continuing
the running sum of the rank before it, so it is bit-identical for every world size. Hence a
W-rank run and a 1-rank run of the same seed (one thread each) give bit-identical masks and
equal grafts and history. See docs/distributed.md.

decompose(..., distributed="auto") uses the default process group when one is initialised;
modsplit.decompose.decompose_distributed() is the same call that insists on one. init_from_env() initialises the
group from torchrun's environment variables.
"""
import datetime
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def init_from_env(device="cpu", timeout=DEFAULT_TIMEOUT) -> bool:
    """Initialise the default process group from torchrun's environment (WORLD_SIZE > 1):
    NCCL for a CUDA device (cuda:LOCAL_RANK), gloo otherwise; `timeout` bounds every collective,
    so a dead rank makes the others fail instead of hanging. Returns whether a group is (now)
    initialised."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return True


def is_writer() -> bool:
    """True in a non-distributed process and on rank 0: the one process that writes outputs."""
    return not dist.is_initialized() or dist.get_rank() == 0


class Shard:
    """The modules this process trains: indices (into the full class tuple) `local`, a
    contiguous block of range(n); rank and world of the process group (0 and 1 without one)."""

    def __init__(self, n: int, group_active: bool):
        self.n, self.active = int(n), bool(group_active)
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        if self.world > self.n:
            raise ValueError(f"modsplit: {self.world} ranks for {self.n} modules: every rank "
                             "needs at least one module")
        self.blocks = self.split(self.n, self.world)
        self.local = self.blocks[self.rank]

    @staticmethod
    def split(n: int, world: int) -> list:
        """Contiguous blocks of range(n) for `world` ranks, sizes differing by at most one."""
        base, extra = divmod(n, world)
        blocks, start = [], 0
        for r in range(world):
            size = base + (r < extra)
            blocks.append(tuple(range(start, start + size)))
            start += size
        return blocks

    def gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's `t` (its modules along `dim`) in rank order, on every rank:
        the tensor of all n modules, on t's device."""
        if not self.active:
            return t
        parts = [None] * self.world
        dist.all_gather_object(parts, t.detach().cpu())
        return torch.cat(parts, dim).to(t.device)

    def gather_dict(self, tensors: dict, dim: int = 0) -> dict:
        """gather() of every tensor of a dict, in one collective."""
        if not self.active:
            return dict(tensors)
        parts = [None] * self.world
        dist.all_gather_object(parts, {k: v.detach().cpu() for k, v in tensors.items()})
        device = {k: v.device for k, v in tensors.items()}
        return {k: torch.cat([p[k] for p in parts], dim).to(device[k]) for k in tensors}

    def module_sum(self, s: torch.Tensor) -> torch.Tensor:
        """Sum over ALL n modules of the scores s [local modules, ...]: module after module in
        class order (rank r continues rank r-1's running sum), so the float result is the same
        for every world size. Returned on every rank."""
        acc = torch.zeros_like(s[0])
        if self.active and self.rank > 0:
            dist.recv(acc, self.rank - 1)
        for k in range(s.shape[0]):
            acc += s[k]
        if self.active:
            if self.rank < self.world - 1:
                dist.send(acc, self.rank + 1)
            dist.broadcast(acc, src=self.world - 1)
        return acc

    def broadcast_object(self, obj):
        """rank 0's `obj` on every rank (the object itself without a group)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def shard_for(distributed, n: int) -> Shard:
    """The Shard of this process for `distributed` (decompose's argument): None -> one process
    trains all n modules; "auto" -> the default process group when initialised; True -> the
    default process group, which must be initialised."""
    if distributed not in (None, False, True, "auto"):
        raise ValueError(f"modsplit: distributed must be None, 'auto' or True, got "
                         f"{distributed!r}")
    active = bool(distributed) and dist.is_available() and dist.is_initialized()
    if distributed is True and not active:
        raise RuntimeError("modsplit: distributed decomposition needs an initialised process "
                           "group: launch with torchrun and call init_from_env() or "
                           "torch.distributed.init_process_group()")
    return Shard(n, active and dist.get_world_size() > 1)
