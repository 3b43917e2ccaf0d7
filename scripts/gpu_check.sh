#!/usr/bin/env bash
# The device check, for a session lent a CUDA machine: one short run (the `device` tool's `run`, which
# starts in the repository root with $OUT set). Installs what it needs, runs the CUDA tests (never run
# on a CPU-only CI), the equivalence tests on CUDA, and the engine benchmark on the device; everything it
# prints goes to $OUT too. About 6-8 minutes on an H200 machine (most of it the install).
set -uo pipefail
OUT="${OUT:-results/gpu}"
mkdir -p "$OUT"
{
  nvidia-smi || true
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -e '.[dev]'
  .venv-gpu/bin/python -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))"
  .venv-gpu/bin/pytest -q -m cuda tests/engine/test_cuda.py
  .venv-gpu/bin/pytest -q tests/engine/test_equivalence.py tests/engine/test_order.py
  .venv-gpu/bin/rnnstream bench engine --device cuda --json "$OUT/engine_bench_cuda.json"
} 2>&1 | tee "$OUT/gpu_check.log"
