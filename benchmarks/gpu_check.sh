#!/usr/bin/env bash
# The GPU check, one command: GPU tests, nvImageCodec streaming embedding (resnet50-trunc and ViT-L/16, bf16),
# tiling on all cores and MIL training, into one JSON (default benchmarks/results/gpu_check.json) with the
# targets marked pass or fail. Options go to benchmarks/gpu_check.py (--json PATH, --device, --smoke, --patches).
# PYTHON: the interpreter of the pathomics environment (default .venv/bin/python, else python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
