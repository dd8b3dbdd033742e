#!/usr/bin/env bash
# The GPU day's one command (tools/gpu_check.py says what it measures; docs/measurements.md, "GPU day"):
#
#     bash tools/gpu_check.sh            # figures in ${OUT:-runs/gpu-check}/gpu_check.{json,txt}
#
# It needs only what the GPU image has (torch >= 2.11, transformers >= 5.17, safetensors, sympy, tqdm)
# plus pytest, which that image lacks: carry its wheels in runs/gpu-wheels (made beforehand, on a
# machine with PyPI, by: pip download --no-deps -d runs/gpu-wheels pytest==9.2.0 iniconfig pluggy
# packaging pygments). No vLLM, no datasets: the vLLM tests skip with their reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
WHEELS="${WHEELS:-runs/gpu-wheels}"
if ! "$PYTHON" -c "import pytest" 2>/dev/null && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
fi
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# 8 minutes at most: the device call's 10-minute limit, with time to copy the figures back
exec timeout 480 "$PYTHON" tools/gpu_check.py --out "${OUT:-runs/gpu-check}" "$@"
