"""The share of a co-training step that sampled negatives cannot shrink: the score update.

For each workload of bench_cotrain.py: decompose's step with every module on the whole batch
(full) and with sampled negatives r = 3, their ms per step (2 rounds after 2 warm-up rounds
over the same pre-drawn batches), and the time of the fused score updates
(modsplit::cotrain_sgd*, torch.profiler over one round). Every step updates and re-selects the
whole score bank whatever rows it ran, so full step / update is the most any row sampling can
gain per epoch at the same batch size and step count.

Run: python benchmarks/exp_update_share.py fc1,fc2,fc3,fc4,mnist2 out.json (one torch thread).
"""
import json
import os
import sys
import time

import torch
from torch.profiler import profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cotrain as B  # noqa: E402

_SIDES = {"full": "modsplit", "sampled r=3": "modsplit, sampled negatives r=3"}


def measure(name):
    B.K = B.WORKLOADS[name]
    sides, batches, _ = B.build_sides(name, 10, False, compiled=False, ratio=3.0)
    res = {}
    for label, side_name in _SIDES.items():
        side = sides[side_name]
        for _ in range(2):
            for x, y in batches:
                side.step(x, y)
        t0 = time.perf_counter()
        for _ in range(2):
            for x, y in batches:
                side.step(x, y)
        step_ms = (time.perf_counter() - t0) / (2 * len(batches)) * 1e3
        with profile() as prof:
            for x, y in batches:
                side.step(x, y)
        update_ms = sum(e.self_cpu_time_total for e in prof.key_averages()
                        if e.key.startswith("modsplit::cotrain_sgd")) / len(batches) / 1e3
        res[label] = {"step_ms": step_ms, "update_ms": update_ms}
    res["bound_per_epoch_speedup"] = res["full"]["step_ms"] / res["full"]["update_ms"]
    return res


def main(argv):
    torch.set_num_threads(1)
    out = {"machine": B.machine(), "results": {}}
    for name in argv[0].split(","):
        out["results"][name] = measure(name)
        print(name, json.dumps(out["results"][name]), flush=True)
    with open(argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
