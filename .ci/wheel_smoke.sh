#!/usr/bin/env bash
# Wheel smoke test: builds the CPU wheel (.ci/build_wheel.sh; after the README test command's
# build it only links, seconds), installs it into a venv that holds only torch (the release
# python3 has), numpy and pytest, with no compiler reachable, and runs the op, opcheck and
# packaging tests plus `dspark --help` against the installed package, from a folder outside the
# source tree. The venv is created once and cached under ~/.cache/dspark-ci; every run removes
# the previous dspark-ext and checks that nothing else was added since the venv was made.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${DSPARK_SMOKE_VENV:-$HOME/.cache/dspark-ci/venv-wheel-smoke}
start=$SECONDS

wheel=$(bash "$repo/.ci/build_wheel.sh" | tail -n 1)

torch_release=$(python3 -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
if ! "$venv/bin/python" - "$torch_release" <<'PY' 2>/dev/null
import sys, torch, numpy, pytest
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] else 1)
PY
then
  echo "wheel-smoke: creating $venv (torch $torch_release, numpy, pytest; about a minute)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q "torch==$torch_release" numpy pytest
  "$venv/bin/python" -m pip freeze --all >"$venv/base-packages.txt"
fi
"$venv/bin/python" -m pip uninstall -q -y dspark-ext >/dev/null 2>&1 || true
if ! diff <("$venv/bin/python" -m pip freeze --all) "$venv/base-packages.txt" >/dev/null; then
  echo "wheel-smoke: $venv holds packages beyond torch, numpy and pytest; remove it to recreate it" >&2
  diff <("$venv/bin/python" -m pip freeze --all) "$venv/base-packages.txt" >&2 || true
  exit 1
fi

# No compiler: CC/CXX and every compiler name on PATH run a program that fails.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/no-compiler"
for tool in cc gcc g++ c++ clang clang++ nvcc ninja ld; do
  printf '#!/bin/sh\necho "wheel-smoke: %s called, but installing or using the wheel must not compile" >&2\nexit 1\n' "$tool" >"$work/no-compiler/$tool"
  chmod +x "$work/no-compiler/$tool"
done
export CC=/bin/false CXX=/bin/false PATH="$work/no-compiler:$PATH"
unset PYTHONPATH

# --no-index: the wheel's own requirement (torch==<the release it was built against>) must be
# met by the venv as it is.
"$venv/bin/python" -m pip install -q --no-index --no-cache-dir "$wheel"

# The tests, copied out of the source tree (conftest.py and helpers.py come along).
mkdir "$work/tests"
tests=(test_verify.py test_markov_draft.py test_schedule.py test_opcheck.py test_bad_input.py test_packaging.py test_exp.py
       test_cpu_isa.py test_skinny_linear.py test_cached_attention.py test_draft_layer.py test_draft_context.py)
for f in conftest.py helpers.py "${tests[@]}"; do cp "$repo/tests/$f" "$work/tests/"; done
cat >"$work/tests/test_installed_wheel.py" <<PY
import sysconfig
from pathlib import Path

import dspark_ext
from dspark_ext import _C


def test_dspark_ext_comes_from_the_installed_wheel():
    site = Path(sysconfig.get_paths()["platlib"]).resolve()
    for module in (dspark_ext, _C):
        assert Path(module.__file__).resolve().is_relative_to(site), module.__file__
    assert not Path(dspark_ext.__file__).resolve().is_relative_to(Path("$repo").resolve())
    assert dspark_ext.build_info()["torch_version_full"] == "$(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)"
PY
cd "$work/tests"
# Not the torch.compile tests: inductor compiles C++ for CPU, torch's need for a compiler, not the wheel's.
"$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$work/tests" -k "not torch_compile" \
  test_installed_wheel.py "${tests[@]}"

# The console script and the CLI's help.
"$venv/bin/dspark" --help >"$work/help.txt"
grep -q "usage: dspark" "$work/help.txt" || { cat "$work/help.txt" >&2; echo "wheel-smoke: FAILED: dspark --help" >&2; exit 1; }

# Next to another torch (the cached CUDA-check venv's 2.14.1, when present) the wheel must refuse
# to import in one line that says how to fix it.
other=${DSPARK_CUDA_VENV:-$HOME/.cache/dspark-ci/venv-cu130}/bin/python
if [ -x "$other" ] && "$other" -c "import torch" 2>/dev/null; then
  "$venv/bin/python" -m pip install -q --no-index --no-deps --target "$work/other-site" "$wheel"
  bash "$repo/.ci/expect_torch_refusal.sh" wheel-smoke "$other" "$work/other-site"
fi
echo "wheel-smoke: OK in $((SECONDS - start)) s ($(basename "$wheel"))"
