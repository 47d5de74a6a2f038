"""A decomposition run in a child process, for the kill/resume tests (checkpoint, distributed).

    python tests/decompose_child.py FOLDER OUT DELAY SEED SHARED_INIT MODEL

decomposes an untrained, seeded FC1 (MODEL "fc1"; "fc1_bn": FC1 with a BatchNorm1d of random
statistics after its hidden layer, decomposed with per-module statistics; "fc1_sampled": FC1 with
sampled negatives, neg_ratio 2, a masked MLP's ragged step; "fc1_bn_sampled": FC1-BN with them,
MultiModuleNet.forward_ragged) on 256 MNIST images (8 batches of 32 per epoch, 2 epochs),
sleeping DELAY seconds per batch, checkpointing every 2 steps into FOLDER ("-": none), as one
rank of a torch.distributed run when WORLD_SIZE is set (else alone), and saves the bank to OUT,
or OUT.rank<RANK> when RANK is set.
"""
import datetime
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(folder, out, delay, seed, shared_init=True, env=None, model="fc1"):
    """Start the child process; env: extra environment (ranks, rendezvous)."""
    full_env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **(env or {})}
    argv = [sys.executable, os.path.abspath(__file__), str(folder), str(out), str(delay),
            str(seed), str(int(shared_init)), model]
    return subprocess.Popen(argv, env=full_env, stderr=subprocess.PIPE)


def same_bank(a, b):
    """Assert two bank files hold the same metadata and bit-identical tensors."""
    from modsplit import files

    (ma, ta), (mb, tb) = files.read_file(a), files.read_file(b)
    assert ma == mb  # classes, fingerprint, history (every epoch's metrics) ...
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


class _Slow:
    """The loader's batches, each after `delay` seconds (so a test can kill mid-epoch)."""

    def __init__(self, loader, delay):
        self.loader, self.dataset, self.batch_size, self.delay = loader, loader.dataset, 32, delay

    def __iter__(self):
        import time

        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def fc1_bn():
    """FC1 with a BatchNorm1d (random running statistics and affine) after its hidden layer."""
    from modsplit.app.models import FC1

    fc = FC1()
    bn = torch.nn.BatchNorm1d(fc[1].out_features)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.1)
    return torch.nn.Sequential(*fc[:2], bn, *fc[2:]).eval()


def main(folder, out, delay, seed, shared_init, model_name="fc1"):
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader

    from modsplit import decompose, distributed
    from modsplit.app.data import load_dataset
    from modsplit.app.models import FC1

    if "WORLD_SIZE" in os.environ:
        distributed.init_from_env(timeout=datetime.timedelta(seconds=20))
    torch.manual_seed(0)
    model = fc1_bn() if model_name.startswith("fc1_bn") else FC1().eval()
    loader = _Slow(DataLoader(load_dataset("mnist", "train", limit=256), batch_size=32,
                              shuffle=True), float(delay))
    bank = decompose(model, loader, 10, epochs=2, progress=False, seed=int(seed),
                     distributed="auto", shared_init=bool(int(shared_init)),
                     neg_ratio=2.0 if model_name.endswith("_sampled") else None,
                     checkpoint_dir=None if folder == "-" else folder, checkpoint_every=2)
    bank.save(f"{out}.rank{os.environ['RANK']}" if "RANK" in os.environ else out)


if __name__ == "__main__":
    main(*sys.argv[1:7])
