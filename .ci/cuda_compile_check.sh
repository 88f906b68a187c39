#!/usr/bin/env bash
# Builds the extension wheel against torch 2.14.1+cu130 with nvcc for sm_80 and sm_90 (no GPU
# needed) and fails on any compile error, any register spill, or a missing architecture.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${DSPARK_CUDA_VENV:-$HOME/.cache/dspark-ci/venv-cu130}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST="8.0;9.0"
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
echo "cuda-check: building a wheel with nvcc for $TORCH_CUDA_ARCH_LIST"
if ! (cd "$work" && "$venv/bin/python" -m pip wheel -v --no-build-isolation --no-deps . -w "$work/wheelhouse") >"$log" 2>&1; then
  grep -E "error|Error" "$log" | head -n 40 >&2 || true
  tail -n 40 "$log" >&2
  echo "cuda-check: FAILED: the CUDA build did not compile" >&2
  exit 1
fi

"$venv/bin/python" - "$log" "$work/wheelhouse" <<'PY'
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
wheels = glob.glob(os.path.join(sys.argv[2], "*.whl"))
if len(wheels) != 1:
    sys.exit(f"cuda-check: FAILED: expected one wheel, found {wheels}")
print(f"cuda-check: OK, zero spills on sm_80 and sm_90; wheel {os.path.basename(wheels[0])}")
PY

# The CUDA build must also load (no undefined symbols) and register its CUDA kernels;
# a GPU is not needed for that, and the CPU kernels inside it must answer correctly.
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall --target "$work/site" "$work"/wheelhouse/*.whl
(cd "$work/site" && PYTHONPATH="$work/site" "$venv/bin/python" - <<'PY'
import torch, dspark_ext
info = dspark_ext.build_info()
assert info["with_cuda"] and info["cuda_archs"] == "8.0;9.0", info
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
