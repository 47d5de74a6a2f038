"""Distributed decomposition benchmark: 100 modules of a small conv net on CIFAR-100-shaped
synthetic data (3x32x32, 100 classes), a few steps, on 1 vs 2 gloo processes (one thread each).

    python benchmarks/bench_distributed.py [--steps 4] [--batch 25] [--width 8]

Prints, per world size, the decomposition wall time (the slowest rank's) and the peak resident
memory (VmHWM) of every rank, and the speed-up. Each rank trains 100 / W modules on the full
data stream, so the work per rank falls with W; on a machine with fewer free cores than ranks the
speed-up is bounded by the cores (and the per-epoch all-gathers add a little).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(args):
    """One rank: decompose, then print {rank, seconds, peak_rss} as JSON."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from modsplit import decompose, distributed
    from modsplit.app.models import small_vgg
    torch.set_num_threads(1)
    distributed.init_from_env()
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch  # labels i % 100: every class needs one sample (n >= 100)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 100)
    torch.manual_seed(0)
    model = small_vgg(3, 100, width=args.width).eval()
    loader = DataLoader(ds, batch_size=args.batch, shuffle=True)
    start = time.perf_counter()
    decompose(model, loader, 100, epochs=1, progress=False, distributed="auto")
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "seconds": seconds,
                      "peak_rss": peak}), flush=True)


def _run(world, args):
    """Launch `world` ranks of this script; -> their JSON results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--batch",
             str(args.batch), "--width", str(args.width)], env=env, stdout=subprocess.PIPE))
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"rank failed with exit code {p.returncode}")
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    times = {}
    for world in (1, 2):
        res = _run(world, args)
        times[world] = max(r["seconds"] for r in res)
        rss = ", ".join(f"rank {r['rank']} {r['peak_rss'] / 2**20:.0f} MiB" for r in res)
        print(f"{world} process(es): {times[world]:.2f} s; peak RSS {rss}")
    print(f"speed-up 2 vs 1: {times[1] / times[2]:.2f}x ({os.cpu_count()} CPU cores visible)")


if __name__ == "__main__":
    main()
