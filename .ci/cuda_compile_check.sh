#!/usr/bin/env bash
# Builds the extension wheel against torch 2.14.1+cu130 with nvcc (no GPU needed): sm_80 and sm_90
# machine code plus compute_90 PTX, which newer GPUs JIT-compile instead of failing with "no kernel
# image". Fails on any compile error, any register spill, a missing architecture or missing PTX.
# The repaired manylinux wheel (.ci/build_wheel.sh) is kept as an artifact in
# dist/torch-2.14.1-cu130/ (git-ignored; DSPARK_CUDA_WHEEL_DIR overrides) and its size printed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${DSPARK_CUDA_VENV:-$HOME/.cache/dspark-ci/venv-cu130}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"
export DSPARK_PTXAS_VERBOSE=1
export MAX_JOBS=${MAX_JOBS:-2}

if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') and torch.version.cuda else 1)" 2>/dev/null; then
  echo "cuda-check: creating $venv with torch 2.14.1 (CUDA 13.0 build)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q torch==2.14.1 ninja setuptools wheel
fi

# Build from a copy of the tracked files so the developer's CPU build is left untouched.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 tar -cf -) | tar -xf - -C "$work/"
log="$work/build.log"
artifacts=${DSPARK_CUDA_WHEEL_DIR:-$repo/dist/torch-2.14.1-cu130}
echo "cuda-check: building a wheel with nvcc for $TORCH_CUDA_ARCH_LIST"
if ! wheel=$(PYTHON="$venv/bin/python" DSPARK_WHEEL_SRC="$work" DSPARK_WHEEL_LOG="$log" bash "$repo/.ci/build_wheel.sh" "$artifacts" | tail -n 1); then
  echo "cuda-check: FAILED: the CUDA build did not compile or could not be repaired" >&2
  exit 1
fi

# The PTX must be in the library, not only asked for: list the fatbinary's contents with
# cuobjdump (the toolkit's, else the one in the triton wheel torch depends on).
so=$("$venv/bin/python" - "$wheel" "$work/so" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    (name,) = [n for n in z.namelist() if n.startswith("dspark_ext/_C") and n.endswith(".so")]
    print(z.extract(name, sys.argv[2]))
PY
)
cuobjdump=""
for candidate in "$CUDA_HOME/bin/cuobjdump" "$("$venv/bin/python" -c 'import triton, os; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null)" "$(command -v cuobjdump || true)"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ]; then cuobjdump=$candidate; break; fi
done
if [ -z "$cuobjdump" ]; then
  echo "cuda-check: FAILED: no cuobjdump found (toolkit, triton wheel or PATH) to check the SASS and PTX" >&2
  exit 1
fi
"$cuobjdump" --list-elf "$so" >"$work/elf.txt"
"$cuobjdump" --list-ptx "$so" >"$work/ptx.txt"

"$venv/bin/python" - "$log" "$wheel" "$work/elf.txt" "$work/ptx.txt" <<'PY'
import re, sys, zipfile, glob, subprocess, os
log = open(sys.argv[1]).read()
entries = re.findall(r"Compiling entry function '(\S+)' for '(sm_\d+)'", log)
if not entries:
    sys.exit("cuda-check: FAILED: no ptxas report found (were the CUDA sources compiled?)")
spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
kernels = {}
for name, arch in entries:
    kernels.setdefault(name, set()).add(arch)
missing = {k: {"sm_80", "sm_90"} - archs for k, archs in kernels.items() if {"sm_80", "sm_90"} - archs}
registers = re.findall(r"Used (\d+) registers", log)
print(f"cuda-check: {len(kernels)} kernels compiled, {len(entries)} (kernel, arch) pairs, max registers {max(map(int, registers))}")
bad = [s for s in spills if s != ("0", "0")]
if bad:
    for line in log.splitlines():
        if "spill" in line and not re.search(r"\b0 bytes spill stores, 0 bytes spill loads", line):
            print(line)
    sys.exit(f"cuda-check: FAILED: {len(bad)} kernels spill registers")
if missing:
    sys.exit(f"cuda-check: FAILED: kernels missing an architecture: {missing}")
# cuobjdump names each entry <source>.<arch>.cubin / .ptx: every CUDA source needs both machine
# codes and the compute_90 PTX.
elf = set(re.findall(r"(\w+)\.(sm_\d+)\.cubin", open(sys.argv[3]).read()))
ptx = set(re.findall(r"(\w+)\.(sm_\d+)\.ptx", open(sys.argv[4]).read()))
sources = {source for source, _ in elf | ptx}
if not sources or elf != {(s, a) for s in sources for a in ("sm_80", "sm_90")}:
    sys.exit(f"cuda-check: FAILED: machine code in the library: {sorted(elf)}, expected sm_80 and sm_90 for {sorted(sources)}")
if ptx != {(s, "sm_90") for s in sources}:
    sys.exit(f"cuda-check: FAILED: PTX in the library: {sorted(ptx)}, expected compute_90 (newer GPUs JIT it) for {sorted(sources)}")
elf_archs = sorted({a for _, a in elf})
wheel = sys.argv[2]
print(f"cuda-check: OK, zero spills on sm_80 and sm_90, SASS {elf_archs} + PTX compute_90 for {len(sources)} sources; "
      f"wheel {wheel} ({os.path.getsize(wheel) / 1e6:.1f} MB)")
PY

# The CUDA build must also load (no undefined symbols) and register its CUDA kernels;
# a GPU is not needed for that, and the CPU kernels inside it must answer correctly.
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall --target "$work/site" "$wheel"
(cd "$work/site" && PYTHONPATH="$work/site" "$venv/bin/python" - "$work/site" <<'PY'
import sys, torch, dspark_ext
info = dspark_ext.build_info()
assert info["with_cuda"] and info["cuda_archs"] == "8.0;9.0+PTX", info
assert dspark_ext.__file__.startswith(sys.argv[1]), dspark_ext.__file__
for op in ("dspark::verify", "dspark::markov_draft", "dspark::schedule"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"no CUDA kernel registered for {op}"
logits = torch.randn(3, 50)
out, accepted = torch.ops.dspark.verify(logits, logits[:1].argmax(-1), None, torch.tensor([0, 1, 1], dtype=torch.int32),
                                        torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 1)
assert out.tolist() == [[logits[0].argmax().item(), logits[1].argmax().item()], [logits[2].argmax().item(), -1]], out
w = torch.zeros(50, 4)
ids, _, _ = torch.ops.dspark.markov_draft(logits[None, :2], torch.tensor([7]), w, w, torch.zeros(1),
                                          torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), None, None, None)
assert ids.tolist() == [[logits[0].argmax().item(), logits[1].argmax().item()]], ids
sps = torch.tensor([0.0, 1.0, 0.5, 0.45])
assert torch.ops.dspark.schedule(torch.tensor([[0.8, 0.9]]), sps, None).tolist() == [0]
assert torch.ops.dspark.schedule(torch.tensor([[0.9, 0.9]]), torch.tensor([0.0, 1.0, 0.9, 0.85]), None).tolist() == [2]
print(f"cuda-check: the CUDA build loads with torch {torch.__version__}, registers CUDA kernels, CPU path correct")
PY
)

# Next to another torch (the CPU 2.13.0 of python3, when it has one) the wheel must refuse to
# import, in one line that says how to fix it.
if python3 -c "import torch" 2>/dev/null; then
  bash "$repo/.ci/expect_torch_refusal.sh" cuda-check python3 "$work/site"
fi
