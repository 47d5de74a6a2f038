"""Command line: `modsplit <command>` (also `python -m modsplit <command>`)."""
import argparse


def _demo(args):
    import torch

    from modsplit import ops, reference

    torch.manual_seed(args.seed)
    scores = torch.randn(10, 49, 784)
    packed = ops.multi_topk_mask(scores, 0.1)
    x, w = torch.randn(8, 784), torch.randn(49, 784)
    y = ops.multi_masked_linear(x, w, packed, None, shared_input=True)
    y_ref = reference.multi_masked_linear(x, w, packed, None, shared_input=True)
    print(f"10 modules x [49, 784] at density 0.1: packed masks {tuple(packed.shape)} int32, "
          f"{packed.numel() * 4} bytes (float masks: {scores.numel() * 4})")
    print(f"multi_masked_linear max |kernel - reference| = {(y - y_ref).abs().max().item():.3g}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="modsplit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job on the embedded default data")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)
