"""End to end: vLLM-CPU with prompt-lookup (ngram) speculation on SmolLM2-135M-Instruct, stock
against the dspark-ext plugin, tokens/s and greedy identity.

Every (run, plugin on/off) is its own process, because vLLM loads the plugin at start-up; runs
alternate off, on, off, on, ... and each cell reports the median over its repeats. A cell is
one `LLM.generate` over the prompts (16 by default, mixed from the packaged MT-Bench, GSM8K and
HumanEval first turns), at one temperature and batch size.

    ~/.cache/dspark-ci/venv-vllm/bin/python bench/bench_vllm_e2e.py --repeats 3 --markdown out.md

The model is the float32 copy of the default target that `dspark_ext.targets.load_default_model`
writes (`--model` to use another). Stock vLLM-CPU samples the wrong law at T > 0 (vllm#55005),
so its T > 0 tokens/s are those of a broken sampler; the comparison is still the cost.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def eval_prompts(count: int) -> list:
    """First turns, round-robin over the three packaged evaluation sets."""
    sets = [[json.loads(line)["turns"][0] for line in open(ROOT / "dspark_ext" / "data" / "eval" / f"{name}.jsonl")]
            for name in ("mt-bench", "gsm8k", "humaneval")]
    return [sets[i % 3][i // 3] for i in range(count)]


def worker(args) -> None:
    """One vLLM process: every cell, written as JSON to args.worker_out."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              speculative_config=SPEC if not args.no_spec else None)
    tokenizer = llm.get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in eval_prompts(args.num_prompts)]
    cells = []
    for temperature in args.temperatures:
        for batch in args.batch_sizes:
            params = SamplingParams(temperature=temperature, max_tokens=args.max_tokens, ignore_eos=True, seed=None)
            llm.generate(prompts[:batch], params, use_tqdm=False)  # warm-up at this shape
            tokens, seconds, outputs = 0, 0.0, []
            for start in range(0, len(prompts), batch):
                t0 = time.perf_counter()
                results = llm.generate(prompts[start:start + batch], params, use_tqdm=False)
                seconds += time.perf_counter() - t0
                tokens += sum(len(r.outputs[0].token_ids) for r in results)
                outputs += [list(r.outputs[0].token_ids) for r in results]
            cells.append({"temperature": temperature, "batch": batch, "tokens": tokens, "seconds": seconds,
                          "outputs": outputs if temperature == 0 else None})
    json.dump(cells, open(args.worker_out, "w"))


def run_worker(args, plugin: bool, out: Path) -> list:
    cmd = [sys.executable, __file__, "--worker-out", str(out), "--model", args.model, "--num-prompts",
           str(args.num_prompts), "--max-tokens", str(args.max_tokens),
           "--temperatures", *map(str, args.temperatures), "--batch-sizes", *map(str, args.batch_sizes)]
    env = dict(os.environ, DSPARK_VLLM_PLUGIN="1" if plugin else "0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"vLLM run failed (plugin={plugin}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    uses_plugin = "vLLM rejection sampling takes the" in proc.stdout + proc.stderr
    if uses_plugin != plugin:
        sys.exit(f"plugin={plugin} but the run {'did' if uses_plugin else 'did not'} use it")
    return json.load(open(out))


def machine() -> str:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    except (OSError, StopIteration):
        isa = "?"
    import vllm

    return f"{cpu} ({isa}), {os.cpu_count()} cores, torch {torch.__version__}, vLLM {vllm.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model folder (default: the cached default target)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=3, help="processes per setting, alternating off/on")
    parser.add_argument("--markdown", default=None, help="write the table here too")
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-spec", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from dspark_ext.targets import DEFAULT_MODEL_ID, default_cache_dir

        args.model = str(default_cache_dir() / DEFAULT_MODEL_ID)
        if not (Path(args.model) / "config.json").is_file():
            sys.exit(f"{args.model} is missing: run `python -c 'import dspark_ext.targets as t; "
                     "t.load_default_model()'` once (it writes the float32 copy of the default target)")
    if args.worker_out:
        worker(args)
        return

    runs = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for plugin in (False, True):
                started = time.perf_counter()
                runs[plugin].append(run_worker(args, plugin, Path(tmp) / f"{repeat}_{plugin}.json"))
                print(f"run {repeat + 1}/{args.repeats} plugin={'on' if plugin else 'off'}: "
                      f"{time.perf_counter() - started:.0f} s", flush=True)

    lines = [f"vLLM-CPU, ngram speculation (K = 4), {args.num_prompts} prompts x {args.max_tokens} tokens, "
             f"{args.repeats} processes per side, medians. Machine: {machine()}.", "",
             "| T | batch | stock tok/s | plugin tok/s | plugin / stock | greedy identical |",
             "|---|---|---|---|---|---|"]
    for index, cell in enumerate(runs[False][0]):
        rate = {plugin: statistics.median(r[index]["tokens"] / r[index]["seconds"] for r in runs[plugin])
                for plugin in (False, True)}
        identical = "-"
        if cell["outputs"] is not None:
            identical = "yes" if all(r[index]["outputs"] == cell["outputs"] for r in runs[False] + runs[True]) else "NO"
        lines.append(f"| {cell['temperature']:g} | {cell['batch']} | {rate[False]:.1f} | {rate[True]:.1f} | "
                     f"{rate[True] / rate[False]:.2f}x | {identical} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
