"""The one GPU check: everything a first run on a GPU (an H200) must show, in one command.

    bash benchmarks/gpu_check.sh            # or: python benchmarks/gpu_check.py [--deadline-s 480]

Steps, in order, each a subprocess with its own timeout, cut to what is left of the overall
deadline (8 minutes by default, the build included):
  probe       python / torch / triton / nvcc versions, the GPU, compute-sanitizer, ncu
  build       MODSPLIT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 (or the GPU's) setup.py build_ext --inplace
  op-tests    the `-k cuda` twins of the op tests, then the Triton tests on the GPU
  selftest    python -m modsplit.selftest, float16/bfloat16/float32/float64, backends cuda + triton
  values      odd sizes vs the reference, a non-default stream, CUDA-graph capture (gpu_values.py)
  sanitizer   compute-sanitizer memcheck and racecheck on tiny shapes (gpu_values.py --tiny)
  timings     CUDA-event timings against cuBLAS / cuDNN / torch.topk (gpu_timings.py)
benchmarks/RESULTS-gpu.md is rewritten after every step, so a run cut short still leaves what it
found. Without a CUDA device the check stops before the first step that needs one, says so in
the file and on stdout, and exits with status 3. Exit status: 0 all steps passed, 1 a step
failed or timed out, 3 no device.
"""
import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
NO_DEVICE = 3
TIMINGS = os.path.join(tempfile.gettempdir(), "modsplit_gpu_timings.md")  # the timings step's table


@dataclasses.dataclass
class Step:
    """One step: `commands` (argv lists, run in order from the repository root) under at most
    `timeout_s` in all; needs_device steps are not run without a CUDA device."""
    name: str
    what: str
    commands: list
    timeout_s: float
    needs_device: bool = True
    env: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    name: str
    what: str
    status: str  # "ok", "FAILED", "TIMEOUT", "not run: ..."
    seconds: float = 0.0
    output: str = ""


def _py(*args):
    return [sys.executable, *args]


def steps(arch, skip_build=False):
    """The steps of the check, in order."""
    tests = ["tests/test_masked_linear.py", "tests/test_masked_conv2d.py",
             "tests/test_topk_mask.py", "tests/test_pack_mask.py", "tests/test_cuda_build.py",
             "tests/test_selftest.py", "tests/test_ragged_linear.py",
             "tests/test_ragged_conv.py"]
    selftests = [_py("-m", "modsplit.selftest", "--device", "cuda", "--backend", b, "--dtype", d)
                 for b in ("cuda", "triton") for d in ("float16", "bfloat16", "float32", "float64")]
    sanitizer = shutil.which("compute-sanitizer") or "compute-sanitizer"
    tiny = _py(os.path.join(BENCH, "gpu_values.py"), "--tiny")
    build = [] if skip_build else [Step(
        "build", "CUDA build of modsplit._C", [_py("setup.py", "build_ext", "--inplace")], 270,
        env={"MODSPLIT_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch,
             "MAX_JOBS": str(os.cpu_count() or 4)})]
    return [
        Step("probe", "environment", [_py(os.path.join(BENCH, "gpu_check.py"), "--probe")], 60,
             needs_device=False),
        *build,
        Step("op-tests", "-k cuda op tests, Triton tests on the GPU",
             [_py("-m", "pytest", "-q", "-x", "-k", "cuda", *tests),
              _py("-m", "pytest", "-q", "-x", "tests/test_triton_routing.py",
                  "tests/test_triton_topk.py", "tests/test_triton_mask.py")], 150),
        Step("selftest", "modsplit.selftest, 4 dtypes x backends cuda, triton", selftests, 120),
        Step("values", "odd sizes vs the reference; side stream; CUDA graph",
             [_py(os.path.join(BENCH, "gpu_values.py"))], 90),
        Step("sanitizer", "compute-sanitizer memcheck + racecheck, tiny shapes",
             [[sanitizer, "--tool", "memcheck", "--error-exitcode", "9", *tiny],
              [sanitizer, "--tool", "racecheck", "--error-exitcode", "9", *tiny]], 120,
             env={"MODSPLIT_BACKEND": "cuda"}),
        Step("timings", "CUDA-event timings vs cuBLAS / cuDNN / torch.topk",
             [_py(os.path.join(BENCH, "gpu_timings.py"), "--out", TIMINGS)], 150),
    ]


def _run(step, budget):
    """Runs the step's commands within `budget` seconds: (status, output)."""
    env = {**os.environ, **step.env}
    out, start = [], time.monotonic()
    for cmd in step.commands:
        left = budget - (time.monotonic() - start)
        if left <= 1:
            return "TIMEOUT", "\n".join(out)
        out.append("$ " + " ".join(cmd))
        try:
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=left)
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            out.append(partial + f"\n(timed out after {left:.0f} s)")
            return "TIMEOUT", "\n".join(out)
        except FileNotFoundError as exc:
            out.append(str(exc))
            return "FAILED", "\n".join(out)
        out.append((done.stdout + done.stderr).rstrip())
        if done.returncode != 0:
            out.append(f"(exit status {done.returncode})")
            return "FAILED", "\n".join(out)
    return "ok", "\n".join(out)


def run_steps(todo, deadline_s, has_device, report):
    """Runs `todo` in order against an overall deadline; report(results) after every step."""
    results, start = [], time.monotonic()
    for i, step in enumerate(todo):
        left = deadline_s - (time.monotonic() - start)
        if step.needs_device and not has_device:
            results.append(Result(step.name, step.what, "not run: no CUDA device (this is the "
                                  "first step that needs one; the check stops here)"))
            results += [Result(s.name, s.what, "not run: no CUDA device") for s in todo[i + 1:]]
            report(results)
            break
        if left <= 1:
            results.append(Result(step.name, step.what, "not run: overall deadline reached"))
            report(results)
            continue
        t0 = time.monotonic()
        status, output = _run(step, min(step.timeout_s, left))
        results.append(Result(step.name, step.what, status, time.monotonic() - t0, output))
        report(results)
    return results


def _tail(text, lines=40):
    rows = text.splitlines()
    return "\n".join(rows[-lines:])


def render(results, device, started, timings_md=None):
    """RESULTS-gpu.md: the device, a summary table and each step's output tail."""
    lines = ["# GPU check results", "",
             f"Device: **{device}**. Started {started} UTC; written by benchmarks/gpu_check.py "
             "(see its docstring for the steps).", "",
             "| step | what | status | seconds |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.what} | {r.status} | {r.seconds:.1f} |" for r in results]
    if timings_md:
        lines += ["", "## Timings", "", timings_md.rstrip()]
    for r in results:
        if r.output:
            lines += ["", f"## {r.name}: {r.status}", "", "```", _tail(r.output), "```"]
    return "\n".join(lines) + "\n"


def probe():
    """Prints the environment as JSON (the probe step)."""
    info = {"python": sys.version.split()[0]}
    try:
        import torch
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(device=p.name, capability=f"{p.major}.{p.minor}",
                        sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    except ImportError as exc:
        info["torch"] = f"missing ({exc})"
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    try:
        info["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                      timeout=20).stdout.strip().splitlines()[-1]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        info["nvcc"] = None
    for tool in ("compute-sanitizer", "ncu", "nvidia-smi"):
        info[tool] = shutil.which(tool)
    info["cpus"] = os.cpu_count()
    print(json.dumps(info, indent=1))


def _device():
    """(has a CUDA device, its name) from a subprocess, so this process never initialises CUDA."""
    code = ("import torch; print(torch.cuda.get_device_name(0) "
            "if torch.cuda.is_available() else '')")
    try:
        name = subprocess.run(_py("-c", code), capture_output=True, text=True,
                              timeout=120).stdout.strip()
    except subprocess.TimeoutExpired:
        name = ""
    return bool(name), name or "none (no CUDA device visible)"


def _arch():
    code = ("import torch; p = torch.cuda.get_device_capability(0); print(f'{p[0]}.{p[1]}')")
    done = subprocess.run(_py("-c", code), capture_output=True, text=True, timeout=120)
    return done.stdout.strip() or "9.0"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deadline-s", type=float, default=480)
    parser.add_argument("--out", default=os.path.join(BENCH, "RESULTS-gpu.md"))
    parser.add_argument("--skip-build", action="store_true", help="use the built extension")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe()
        return 0
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    has_device, device = _device()
    timings = TIMINGS
    if os.path.exists(timings):
        os.remove(timings)

    def report(results):
        extra = open(timings).read() if os.path.exists(timings) else None
        with open(args.out, "w") as f:
            f.write(render(results, device, started, extra))
        last = results[-1]
        print(f"[gpu_check] {last.name}: {last.status} ({last.seconds:.1f} s)", flush=True)

    todo = steps(_arch() if has_device else "9.0", args.skip_build)
    results = run_steps(todo, args.deadline_s, has_device, report)
    print(f"[gpu_check] wrote {args.out}")
    if not has_device:
        print("[gpu_check] no CUDA device: stopped before the first step that needs one")
        return NO_DEVICE
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
