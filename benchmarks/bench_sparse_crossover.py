"""Where the sparse kernels (sparse_linear, sparse_conv2d: CSR over kept weights) beat the dense
path of a compact layer (BLAS matmul / oneDNN grouped convolution over the K modules' dense
weights, bias and ReLU as separate ops), by density of the modules' weights. K = 2 modules, float32,
CPU, the two paths interleaved (modsplit.app.latency.compare_latency).

Run: python benchmarks/bench_sparse_crossover.py --out docs/runs/sparse_crossover
Writes <out>.json and <out>.md; compact_layers.DENSE_ABOVE is set from the crossovers (where
the sparse / dense ratio passes 1 at the larger batch).
"""
import argparse
import json
import os
import platform

import torch
import torch.nn.functional as F

from modsplit import reference as R
from modsplit.app.latency import compare_latency

K = 2
DENSITIES = [0.01, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0]
LINEAR = [(784, 256), (512, 512)]          # (in, out)
# (C, O, H = W, stride), 3x3, padding 1: a small-VGG layer, ResNet-20's three stages, and
# ResNet-20's two stride-2 convs (kind conv_s2)
CONV = [(32, 32, 32, 1), (64, 64, 16, 1), (16, 16, 32, 1), (32, 32, 16, 1), (64, 64, 8, 1)]
CONV_S2 = [(16, 32, 32, 2), (32, 64, 16, 2)]
_ops = torch.ops.modsplit


def csr(w):
    """Dense [K, O, R] -> (row_ptr [K, O+1] per module from 0, col_idx, values) of the non-zeros,
    as compact_layers.set_weights builds them."""
    k, o = w.shape[:2]
    nz = w != 0
    row_ptr = torch.zeros(k * o + 1, dtype=torch.long)
    row_ptr[1:] = nz.sum(2).reshape(-1).cumsum(0)
    return (row_ptr.unfold(0, o + 1, o).contiguous(), nz.nonzero(as_tuple=True)[2].to(torch.int32),
            w[nz].contiguous())


def linear_case(i, o, density, batch):
    w = torch.randn(K, o, i) * (torch.rand(K, o, i) < density)
    bias, x = torch.randn(K, o), torch.randn(1, batch, i)
    rp, ci, v = csr(w)
    wt = w.transpose(1, 2)
    return {"sparse": lambda t: _ops.sparse_linear(t, rp, ci, v, bias, True),
            "dense": lambda t: (torch.matmul(t, wt) + bias.unsqueeze(1)).relu()}, x


def conv_case(c, o, hw, stride, density, batch):
    w = torch.randn(K, o, c, 3, 3) * (torch.rand(K, o, c, 3, 3) < density)
    bias, x = torch.randn(K, o), torch.randn(K, batch, c, hw, hw)
    rp, ci, v = csr(w.reshape(K, o, -1))
    wg, bg = w.reshape(K * o, c, 3, 3), bias.reshape(-1)
    ho = (hw - 1) // stride + 1

    def dense(t):
        xg = t.transpose(0, 1).reshape(batch, K * c, hw, hw)
        y = F.conv2d(xg, wg, bg, stride, 1, 1, K).relu()
        return y.reshape(batch, K, o, ho, ho).transpose(0, 1)
    return {"sparse": lambda t: _ops.sparse_conv2d(t, rp, ci, v, bias, [3, 3], [stride, stride],
                                                   [1, 1], True),
            "dense": dense}, x


def crossover(rows):
    """Per (shape, batch): the lowest density from which on the dense path is faster at every
    measured density (None: sparse wins throughout)."""
    out = {}
    for key in dict.fromkeys(f"{r['shape']} b{r['batch']}" for r in rows):
        mine = sorted((r for r in rows if f"{r['shape']} b{r['batch']}" == key),
                      key=lambda r: r["density"])
        out[key] = None
        for i, r in enumerate(mine):
            if all(m["sparse_us"] >= m["dense_us"] for m in mine[i:]):
                out[key] = r["density"]
                break
    return out


def markdown(result) -> str:
    lines = [f"# Sparse vs dense compact layers ({result['machine']}, {result['threads']} "
             f"thread(s), K = {result['modules']}, float32)", "",
             "| layer | batch | density | sparse µs | dense µs | sparse / dense |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['batch']} | {r['density']} | {r['sparse_us']:.1f} | "
              f"{r['dense_us']:.1f} | {r['sparse_us'] / r['dense_us']:.2f} |"
              for r in result["rows"]]
    lines += ["", "Lowest density from which on the dense path is faster (crossover):", ""]
    lines += [f"- {k}: {v}" for k, v in result["crossover"].items()]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--machine", default=f"{platform.machine()}, {os.cpu_count()} cores")
    p.add_argument("--kinds", default="linear,conv,conv_s2",
                   help="comma-separated: linear, conv, conv_s2 (stride 2)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    kinds = args.kinds.split(",")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for kind, shapes, make, batches in (("linear", LINEAR, linear_case, (1, 64)),
                                        ("conv", CONV, conv_case, (1, 16)),
                                        ("conv_s2", CONV_S2, conv_case, (1, 16))):
        if kind not in kinds:
            continue
        for shape in shapes:
            for batch in batches:
                for density in DENSITIES:
                    fns, x = make(*shape, density, batch)
                    torch.testing.assert_close(fns["sparse"](x), fns["dense"](x), atol=1e-3,
                                               rtol=1e-3)
                    lat = compare_latency(fns, {"x": x}, rounds=7)
                    rows.append({"kind": kind, "shape": f"{kind} {shape}", "batch": batch,
                                 "density": density, "sparse_us": lat["sparse"]["x"],
                                 "dense_us": lat["dense"]["x"]})
                    print(json.dumps(rows[-1]), flush=True)
    result = {"machine": args.machine, "threads": args.threads, "torch": torch.__version__,
              "modules": K, "rows": rows, "crossover": crossover(rows)}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
