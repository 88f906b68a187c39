"""GPU check of the dspark-ext vLLM plugin on vLLM's V2 model runner (for bench/gpu_check.sh).

    python3 bench/vllm_gpu_check.py [--model PATH] [--num-prompts 16] [--max-tokens 128]
                                    [--num-spec-tokens 4] [--cuda-graphs] [--timeout 240]

1. ops: the V2 replacements (dspark_ext/integrations/vllm/v2_*.py) on CUDA tensors shaped as
   vLLM passes them, with torch.cuda's sync debug mode set to "error" (any host sync raises):
   greedy verification equals the argmax walk, with vLLM's -1 placeholder drafts; DSpark's dense
   drafting equals vLLM's loop (teacher-forced) and writes the cache of real rows only; both are
   captured in a torch.cuda.CUDAGraph and replayed with the eager results (markov_draft is retried
   with DSPARK_MARKOV_SEPARATE_LAUNCHES=1 if its cooperative launch cannot be captured).
2. end to end: vLLM with VLLM_USE_V2_MODEL_RUNNER=1 and prompt-lookup (ngram) speculation, greedy,
   once with DSPARK_VLLM_PLUGIN=0 and once with the plugin, each in its own process: the tokens must
   be identical, the plugin run must have called verify, and tokens/s of both are reported (plus a
   sampled, seeded smoke run with the plugin). The model is --model (a local folder) or, without
   one, a tiny random Llama with a 64-token vocabulary built here (tests/integrations/tiny_models.py):
   it checks identity, not speed.
3. with --dspark-drafter DRAFTER --model TARGET: the same two runs, but speculating with vLLM's own
   DSpark path on DRAFTER exported by `dspark export --format vllm`
   (speculative_config={"method": "dspark", "model": EXPORT, "num_speculative_tokens": K}): greedy
   output identical with and without the plugin (which then also drafts through
   dspark::markov_draft), plus a plain run without speculation with --with-plain (bfloat16
   speculative and plain decoding can differ where batch shapes change a reduction; the count of
   identical prompts is reported).

Exits 0 with a SKIP line when vLLM or CUDA is missing; non-zero when a check fails.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NGRAM = {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 2}
TEXT_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, then a second version that uses memoization.",
    "List the numbers from 1 to 40, separated by commas.",
    "Repeat this sentence five times: the quick brown fox jumps over the lazy dog.",
    "Write a C function that reverses a linked list, then write the same function again with comments.",
    "Explain what a hash map is, then give a Python class that implements one with separate chaining.",
    "Write the multiplication table of 7 from 7 x 1 to 7 x 12, one line each.",
    "Translate into JSON: name Alice, age 30, city Paris; name Bob, age 25, city Rome; name Carol, age 41, city Oslo.",
    "Write a SQL query that lists customers with more than three orders, then the same query using a CTE.",
]


def skip(message: str) -> None:
    print(f"SKIP: {message}")
    sys.exit(0)


# --------------------------------------------------------------------------- 1. ops


def v2_greedy_batch(torch, g, lengths, vocab, steps, device):
    """rejection_sample's arguments (rejection_sampler.py:268-281) for greedy requests whose drafts
    are the argmax of their rows, except a -1 placeholder as the second draft of every other one."""
    rows = torch.tensor(lengths) + 1
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(rows, 0)
    n = int(cu[-1])
    max_num_reqs = len(lengths) + 5
    idx_mapping = torch.randperm(max_num_reqs, generator=g)[:len(lengths)]
    target = torch.randn(n, vocab, generator=g).to(torch.bfloat16)
    draft_sampled = torch.zeros(n, dtype=torch.int32)
    for b in range(len(lengths)):
        start, end = int(cu[b]), int(cu[b + 1])
        for r in range(start, end - 1):
            draft_sampled[r + 1] = int(target[r].float().argmax())
        if b % 2 == 0 and end - start > 2:
            draft_sampled[start + 2] = -1
    local = torch.cat([torch.arange(k) for k in rows.tolist()])
    args = (target, None, draft_sampled, cu,
            torch.repeat_interleave(torch.randint(5, 900, (len(lengths),), generator=g), rows) + local,
            idx_mapping, torch.repeat_interleave(idx_mapping, rows), local.to(torch.int32),
            torch.zeros(max_num_reqs), torch.randint(0, 1 << 62, (max_num_reqs,), generator=g), steps, None)
    expected = []
    for b in range(len(lengths)):
        start, end = int(cu[b]), int(cu[b + 1])
        out = []
        for r in range(start, end - 1):
            if int(draft_sampled[r + 1]) != int(target[r].float().argmax()):
                break
            out.append(int(draft_sampled[r + 1]))
        out.append(int(target[start + len(out)].float().argmax()))
        expected.append(out)
    moved = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    return moved, expected


def capture_and_replay(torch, fn):
    """Runs fn eagerly (side stream warm-up), captures it in a CUDA graph and replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out


def check_verify_replacement(torch, rejection_sampler, device) -> list:
    failures = []
    g = torch.Generator().manual_seed(0)
    args, expected = v2_greedy_batch(torch, g, [4, 3, 0, 4, 2, 4, 1, 4], 32000, 4, device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampled, num_sampled = rejection_sampler.rejection_sample(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for b, out in enumerate(expected):
        if int(num_sampled[b]) != len(out) or sampled[b, :len(out)].tolist() != out:
            failures.append(f"verify: request {b} gave {sampled[b].tolist()} / {int(num_sampled[b])}, expected {out}")
    graph_sampled, graph_num = capture_and_replay(torch, lambda: rejection_sampler.rejection_sample(*args))
    if not (torch.equal(graph_sampled, sampled) and torch.equal(graph_num, num_sampled)):
        failures.append("verify: the CUDA-graph replay differs from the eager call")
    return failures


def dspark_speculator_on_cuda(torch, dspark_speculator, device, num_reqs=8, padded=2, steps=4, vocab=32003,
                              hidden=256, rank=64):
    """A DSparkSpeculator (no __init__) over vLLM's own DSparkMarkovHead (markov_w2 padded to a
    multiple of 64 rows) and DSparkConfidenceHead (a torch Linear as `proj`: ReplicatedLinear needs
    a tensor-parallel group), with a plain matmul as the backbone's LM head."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.models.qwen3_dspark import DSparkConfidenceHead, DSparkMarkovHead

    nn = torch.nn
    g = torch.Generator().manual_seed(1)
    with set_current_vllm_config(VllmConfig()):
        head = DSparkMarkovHead(vocab, vocab, rank, prefix="model.markov_head")
    confidence = DSparkConfidenceHead.__new__(DSparkConfidenceHead)
    nn.Module.__init__(confidence)
    confidence.with_markov = True
    confidence.proj = nn.Linear(hidden + rank, 1)
    model = nn.Module()
    model.model = nn.Module()
    model.model.markov_head, model.model.confidence_head = head, confidence
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    head.to(device=device, dtype=torch.bfloat16)
    confidence.to(device=device)
    lm_head = (torch.randn(vocab, hidden, generator=g) * 0.3).to(device, torch.bfloat16)
    model.compute_draft_logits = lambda h: h @ lm_head.T
    model.logits_processor = types.SimpleNamespace(scale=1.0, soft_cap=None, logits_as_input=False)
    model.draft_id_to_target_id = None

    total = num_reqs + padded
    spec = dspark_speculator.DSparkSpeculator.__new__(dspark_speculator.DSparkSpeculator)
    spec.model, spec.num_speculative_steps = model, steps
    spec._draft_topk = spec.draft_watermarker = spec._d2t_scatter_index = spec.acceptance_estimator = None
    spec.use_confidence_head = True
    max_num_reqs = total + 4
    states = torch.randperm(max_num_reqs, generator=g)[:num_reqs]
    slot_state = torch.full((total, steps), -1, dtype=torch.int64)
    slot_state[:num_reqs] = states[:, None]
    pos = torch.zeros(total, steps, dtype=torch.int64)
    pos[:num_reqs] = torch.randint(10, 5000, (num_reqs, 1), generator=g) + 1 + torch.arange(steps)
    temperature = torch.rand(max_num_reqs, generator=g) + 0.3
    temperature[states[::3]] = 0.0
    on = dict(device=device)
    spec.sample_idx_mapping, spec.sample_pos = slot_state.flatten().to(**on), pos.flatten().to(**on)
    spec.sample_indices = torch.arange(total * steps, **on)
    spec._anchor_idx = torch.arange(total, **on) * steps
    spec._step_cols = torch.arange(steps, dtype=torch.int32, **on)
    spec.input_buffers = types.SimpleNamespace(
        input_ids=torch.randint(0, vocab, (total * steps,), generator=g, dtype=torch.int32).to(**on))
    spec.temperature = temperature.to(**on)
    spec.seeds = torch.randint(0, 1 << 62, (max_num_reqs,), generator=g).to(**on)
    spec.draft_tokens = torch.zeros(max_num_reqs, steps, dtype=torch.int64, **on)
    spec.draft_token_confidence_probs = torch.zeros(max_num_reqs, steps, **on)
    spec.draft_logits = torch.randn(max_num_reqs, steps, vocab, generator=g).to(device, torch.bfloat16)
    hidden_states = torch.randn(total * steps, hidden, generator=g).to(device, torch.bfloat16)
    return spec, hidden_states, states.to(device), total


def check_markov_replacement(torch, dspark_speculator, v2_markov, device) -> list:
    failures = []
    spec, hidden, states, total = dspark_speculator_on_cuda(torch, dspark_speculator, device)
    num_reqs = states.shape[0]
    reason = v2_markov.fallback_reason(spec)
    if reason is not None:
        return [f"markov: the replacement would run vLLM's loop ({reason})"]
    cache_before = spec.draft_logits.clone()
    calls = v2_markov.call_counts["markov_draft"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            dspark_speculator.DSparkSpeculator._sample_sequential(spec, total, hidden)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if v2_markov.call_counts["markov_draft"] != calls + 1:
        return ["markov: the replacement ran vLLM's loop (fallback) instead of markov_draft"]
    tokens = spec.draft_tokens[:num_reqs].clone()
    model = spec.model
    with torch.inference_mode():  # vLLM's loop, teacher-forced on the drafted tokens (speculator.py:165-185)
        base = model.compute_draft_logits(hidden[:num_reqs * spec.num_speculative_steps]).float()
        base = base.view(num_reqs, spec.num_speculative_steps, -1)
        prev = spec.input_buffers.input_ids[spec._anchor_idx[:num_reqs]].long()
        vocab = base.shape[-1]
        w1 = model.model.markov_head.markov_w1.weight[:vocab].float()
        w2 = model.model.markov_head.markov_w2.weight[:vocab].float()
        for k in range(spec.num_speculative_steps):
            logits_k = (base[:, k] + w1[prev] @ w2.T).to(torch.bfloat16)
            cached = spec.draft_logits[states, k]
            if not torch.allclose(cached.float(), logits_k.float(), atol=0.07, rtol=0.02):
                failures.append(f"markov: cached logits of step {k} differ from vLLM's loop by "
                                f"{(cached.float() - logits_k.float()).abs().max().item():.3g}")
            greedy = spec.temperature[states] == 0
            if not torch.equal(tokens[greedy, k], cached[greedy].argmax(-1)):
                failures.append(f"markov: greedy drafts of step {k} are not the argmax of their logits")
            prev = tokens[:, k]
    untouched = torch.ones(spec.draft_logits.shape[0], dtype=torch.bool, device=device)
    untouched[states] = False
    if not torch.equal(spec.draft_logits[untouched], cache_before[untouched]):
        failures.append("markov: padded rows wrote the draft-logits cache")
    cache_after, confidence = spec.draft_logits.clone(), spec.draft_token_confidence_probs.clone()

    def draft():
        with torch.inference_mode():
            dspark_speculator.DSparkSpeculator._sample_sequential(spec, total, hidden)
        return spec.draft_tokens.clone()

    for separate in (False, True):
        if separate:
            os.environ["DSPARK_MARKOV_SEPARATE_LAUNCHES"] = "1"
        try:
            replayed = capture_and_replay(torch, draft)
        except Exception as error:  # noqa: BLE001 - reported, then retried with separate launches
            failures.append(f"markov: CUDA-graph capture failed{' (separate launches)' if separate else ''}: "
                            f"{type(error).__name__}: {error}")
            continue
        finally:
            os.environ.pop("DSPARK_MARKOV_SEPARATE_LAUNCHES", None)
        if not (torch.equal(replayed[:num_reqs], tokens) and torch.equal(spec.draft_logits, cache_after)
                and torch.equal(spec.draft_token_confidence_probs, confidence)):
            failures.append("markov: the CUDA-graph replay differs from the eager call")
        print(f"  markov_draft captured in a CUDA graph with {'separate' if separate else 'cooperative'} launches")
        break
    return failures


def run_op_checks() -> bool:
    import torch

    import dspark_ext
    from dspark_ext.integrations.vllm import v2_markov, v2_runner
    from dspark_ext.integrations.vllm.v2_verify import op_has_kernel

    if not (op_has_kernel("verify", "cuda") and op_has_kernel("markov_draft", "cuda")):
        print(f"FAIL ops: dspark_ext has no CUDA kernels ({dspark_ext.build_info()})")
        return False
    print(f"installed: {v2_runner.install_v2_patches()}")
    import vllm.v1.worker.gpu.spec_decode.dspark.speculator as dspark_speculator
    import vllm.v1.worker.gpu.spec_decode.rejection_sampler as rejection_sampler

    failures = []
    for name, check in (("verify", lambda: check_verify_replacement(torch, rejection_sampler, "cuda")),
                        ("markov", lambda: check_markov_replacement(torch, dspark_speculator, v2_markov, "cuda"))):
        try:
            failures += check()
        except Exception as error:  # noqa: BLE001
            failures.append(f"{name}: {type(error).__name__}: {error}")
    for failure in failures:
        print(f"  FAIL {failure}")
    print(f"ops: {'PASS' if not failures else 'FAIL'}")
    return not failures


# --------------------------------------------------------------------------- 2. end to end


def child(plan_path: str, out_path: str) -> None:
    """One vLLM run (plugin on or off, decided by DSPARK_VLLM_PLUGIN in this process's env)."""
    plan = json.load(open(plan_path))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    speculative = plan.get("speculative_config", dict(NGRAM, num_speculative_tokens=plan["num_spec_tokens"]))
    llm = LLM(model=plan["model"], dtype="bfloat16", max_model_len=plan["max_model_len"], seed=0,
              enforce_eager=not plan["cuda_graphs"], gpu_memory_utilization=0.4, max_num_seqs=64,
              **({"speculative_config": speculative} if speculative else {}))
    prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in plan["prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=plan["max_tokens"], ignore_eos=True)
    llm.generate(prompts[:2], greedy, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    seeded = [SamplingParams(temperature=0.8, seed=i, max_tokens=32) for i in range(len(prompts))]
    sampled = llm.generate(prompts, seeded, use_tqdm=False)

    def runner_module(worker):
        inner = getattr(worker, "worker", worker)
        return type(getattr(inner, "model_runner", inner)).__module__

    counts = {}
    try:
        from dspark_ext.integrations.vllm import v2_markov, v2_verify

        counts = {"verify": dict(v2_verify.call_counts), "markov": dict(v2_markov.call_counts)}
    except Exception as error:  # noqa: BLE001
        counts = {"error": str(error)}
    try:
        runner = llm.collective_rpc(runner_module)[0]
    except Exception as error:  # noqa: BLE001
        runner = f"unknown ({type(error).__name__})"
    json.dump({"tokens": tokens, "seconds": seconds, "num_tokens": sum(map(len, tokens)), "runner": runner,
               "counts": counts, "sampled_tokens": sum(len(o.outputs[0].token_ids) for o in sampled)},
              open(out_path, "w"))
    sys.stdout.flush()
    os._exit(0)  # skip the engine's slow teardown


def run_vllm(plan: dict, plugin: bool, timeout: float, folder: Path, label: str = ""):
    env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1", DSPARK_VLLM_PLUGIN="1" if plugin else "0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    plan_path, out_path = folder / f"plan{label}.json", folder / f"out{label}_{int(plugin)}.json"
    plan_path.write_text(json.dumps(plan))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(plan_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    label = label or ("plugin" if plugin else "stock")
    if proc.returncode != 0 or not out_path.exists():
        print(f"  FAIL {label} run (exit {proc.returncode}, {time.perf_counter() - start:.0f}s):")
        print("\n".join("    " + line for line in (proc.stdout + proc.stderr).splitlines()[-30:]))
        return None
    result = json.loads(out_path.read_text())
    print(f"  {label:6s}: {result['num_tokens']} tokens in {result['seconds']:.2f}s = "
          f"{result['num_tokens'] / result['seconds']:.1f} tok/s, runner {result['runner']}, "
          f"dspark calls {result['counts']} ({time.perf_counter() - start:.0f}s with start-up)")
    return result


def run_end_to_end(args) -> bool:
    folder = Path(tempfile.mkdtemp(prefix="dspark_vllm_check_"))
    if args.model:
        model = args.model
        prompts = (TEXT_PROMPTS * ((args.num_prompts + len(TEXT_PROMPTS) - 1) // len(TEXT_PROMPTS)))[:args.num_prompts]
        max_model_len = 2048
    else:
        sys.path.insert(0, str(REPO / "tests" / "integrations"))
        import tiny_models

        model = str(tiny_models.build_permutation_llama(folder / "tiny", seed=1))
        prompts = []
        for i in range(args.num_prompts):
            cycle = tiny_models.cycle_prompt_ids(model, 4 + 3 * i, 6 + i % 4)
            prompts.append(cycle + cycle[:2])
        max_model_len = 512
        print(f"  no --model: a tiny random Llama (64-token vocabulary) in {model}; identity only, not speed")
    plan = {"model": model, "prompts": prompts, "max_tokens": args.max_tokens, "num_spec_tokens": args.num_spec_tokens,
            "cuda_graphs": args.cuda_graphs, "max_model_len": max_model_len}
    stock = run_vllm(plan, False, args.timeout, folder)
    patched = run_vllm(plan, True, args.timeout, folder)
    if stock is None or patched is None:
        return False
    ok = True
    if stock["tokens"] != patched["tokens"]:
        differing = [i for i, (a, b) in enumerate(zip(stock["tokens"], patched["tokens"])) if a != b]
        print(f"  FAIL greedy outputs differ for prompts {differing}")
        ok = False
    v2_runner_module = "vllm.v1.worker.gpu."  # V1's is vllm.v1.worker.gpu_model_runner
    if not (stock["runner"].startswith(v2_runner_module) and patched["runner"].startswith(v2_runner_module)):
        print(f"  FAIL not the V2 runner: {stock['runner']} / {patched['runner']}")
        ok = False
    if patched["counts"].get("verify", {}).get("verify", 0) == 0:
        print("  FAIL the plugin run never called torch.ops.dspark.verify")
        ok = False
    if stock["counts"].get("verify", {}).get("verify", 0) != 0:
        print("  FAIL the DSPARK_VLLM_PLUGIN=0 run called torch.ops.dspark.verify")
        ok = False
    speedup = (patched["num_tokens"] / patched["seconds"]) / (stock["num_tokens"] / stock["seconds"])
    print(f"end to end: {'PASS' if ok else 'FAIL'} (greedy identical: {stock['tokens'] == patched['tokens']}, "
          f"plugin/stock throughput {speedup:.3f}x, sampled smoke run {patched['sampled_tokens']} tokens)")
    return ok


def run_dspark_end_to_end(args) -> bool:
    """vLLM's DSpark path serving ``args.dspark_drafter`` exported for vLLM, plugin off and on."""
    sys.path.insert(0, str(REPO))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dspark_ext.drafters.export import export_vllm, load_for_export, needs_target_lm_head

    folder = Path(tempfile.mkdtemp(prefix="dspark_vllm_dspark_"))
    lm_head = None
    if needs_target_lm_head(args.dspark_drafter):  # a draft vocabulary exports its rows of the target's LM head
        lm_head = AutoModelForCausalLM.from_pretrained(args.model).get_output_embeddings().weight.detach().float()
    drafter = load_for_export(args.dspark_drafter, lm_head)
    export = export_vllm(drafter, folder / "export")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True) for text in TEXT_PROMPTS]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    prompts = (prompts * ((args.num_prompts + len(prompts) - 1) // len(prompts)))[:args.num_prompts]
    plan = {"model": args.model, "prompts": prompts, "max_tokens": args.max_tokens, "cuda_graphs": args.cuda_graphs,
            "max_model_len": 2048, "num_spec_tokens": drafter.num_draft,
            "speculative_config": {"method": "dspark", "model": str(export),
                                   "num_speculative_tokens": drafter.num_draft}}
    print(f"  DSpark drafter {args.dspark_drafter} exported to {export} (K = {drafter.num_draft})")
    stock = run_vllm(plan, False, args.timeout, folder, "dspark-stock")
    patched = run_vllm(plan, True, args.timeout, folder, "dspark-plugin")
    if stock is None or patched is None:
        return False
    ok = stock["tokens"] == patched["tokens"]
    if not ok:
        differing = [i for i, (a, b) in enumerate(zip(stock["tokens"], patched["tokens"])) if a != b]
        print(f"  FAIL DSpark greedy outputs differ with and without the plugin for prompts {differing}")
    if patched["counts"].get("markov", {}).get("markov_draft", 0) == 0:
        print(f"  FAIL the plugin run never drafted through torch.ops.dspark.markov_draft: {patched['counts']}")
        ok = False
    if args.with_plain:
        plain = run_vllm(dict(plan, speculative_config=None), False, args.timeout, folder, "plain")
        if plain is None:
            return False
        same = sum(a == b for a, b in zip(plain["tokens"], patched["tokens"]))
        print(f"  DSpark vs plain decoding: {same}/{len(prompts)} prompts identical (bfloat16), "
              f"throughput {patched['num_tokens'] / patched['seconds']:.1f} vs "
              f"{plain['num_tokens'] / plain['seconds']:.1f} tok/s")
    print(f"dspark end to end: {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local model folder (default: a tiny random Llama built here)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-spec-tokens", type=int, default=4)
    parser.add_argument("--cuda-graphs", action="store_true", help="let vLLM capture CUDA graphs (slower start-up)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per vLLM run")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--dspark-drafter", help="a DSpark drafter folder to serve through vLLM's DSpark path "
                        "(exported with dspark export --format vllm); needs --model, its target")
    parser.add_argument("--with-plain", action="store_true", help="also run the target without speculation")
    args = parser.parse_args()
    if args.dspark_drafter and not args.model:
        parser.error("--dspark-drafter needs --model (the drafter's target, a local Hugging Face folder)")
    try:
        import torch
    except ImportError:
        skip("torch is not installed")
    if not torch.cuda.is_available():
        skip("no CUDA device")
    try:
        import vllm
    except Exception as error:  # noqa: BLE001
        skip(f"vLLM is not importable ({type(error).__name__}: {error})")
    print(f"vLLM {vllm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    ok = run_op_checks()
    if args.skip_end_to_end:
        pass
    elif args.dspark_drafter:
        ok = run_dspark_end_to_end(args) and ok
    else:
        ok = run_end_to_end(args) and ok
    print(f"RESULT: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
