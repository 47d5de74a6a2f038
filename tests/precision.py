"""The accuracy check of kernel tests: a kernel's result against the reference run in float64,
with a bound taken from the reference's own error in the kernel's dtype."""
import torch

# Absolute error floor per dtype, relative to the largest reference magnitude (at least 1).
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_matches_ref(got, ref_fn, args):
    """got (a tensor or a tuple of them) vs ref_fn(*args) run in float64: the error may be at most
    twice that of ref_fn run on args as given (the kernel's dtype), plus FLOOR."""
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    refs, lows = ref_fn(*up), ref_fn(*args)
    if torch.is_tensor(refs):
        got, refs, lows = (got,), (refs,), (lows,)
    assert len(got) == len(refs)
    for t, ref, low in zip(got, refs, lows):
        assert t.shape == ref.shape and t.dtype == low.dtype, (t.shape, ref.shape, t.dtype)
        if ref.numel() == 0:
            continue
        scale = max(1.0, ref.abs().max().item())
        ref_err = (low.double() - ref).abs().max().item()
        err = (t.double() - ref).abs().max().item()
        assert err <= 2 * ref_err + FLOOR[t.dtype] * scale, (err, ref_err)
