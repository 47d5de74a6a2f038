#!/usr/bin/env bash
# The one GPU check (benchmarks/gpu_check.py): build, op tests, selftest, value checks,
# compute-sanitizer and timings in at most 8 minutes; writes benchmarks/RESULTS-gpu.md.
# Usage: bash benchmarks/gpu_check.sh [--deadline-s 480] [--skip-build]; PYTHON picks the interpreter.
set -u
cd "$(dirname "$0")/.."
exec timeout 510 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
