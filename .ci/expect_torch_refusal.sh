#!/usr/bin/env bash
# expect_torch_refusal.sh LABEL PYTHON SITE: importing dspark_ext from SITE with PYTHON (whose
# torch is not the one the build was made for) must fail, ending in the loader's one-line
# ImportError that says how to fix it. Used by .ci/wheel_smoke.sh and .ci/cuda_compile_check.sh.
set -euo pipefail
label=$1 python=$2 site=$3
if message=$(cd "$site" && PYTHONPATH="$site" "$python" -c "import dspark_ext" 2>&1); then
  echo "$label: FAILED: the wheel imported next to torch $("$python" -c 'import torch; print(torch.__version__)')" >&2
  exit 1
fi
last=$(printf '%s\n' "$message" | tail -n 1)
case "$last" in
  "ImportError: dspark_ext was built against torch"*"rebuild"*) echo "$label: next to another torch the import fails with: $last" ;;
  *) printf '%s\n' "$message" >&2; echo "$label: FAILED: unclear import error next to another torch" >&2; exit 1 ;;
esac
