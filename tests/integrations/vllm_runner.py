"""Runs vLLM offline on a local model and writes the generated token ids as JSON.

    python vllm_runner.py PLAN.json OUT.json

PLAN: {"model": path, "speculative_config": {...}, "jobs": [{"name", "requests": [{"prompt": ids,
"params": SamplingParams kwargs}], "fault": optional}]}. Each job is one `LLM.generate` call.
A job's `fault` swaps one helper of the plugin for a deliberately broken one during that job
(the tests' broken variants); faults need the engine in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0). A job that raises records the error; later jobs still run
if the engine survived.
"""

import contextlib
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def faults():
    import torch

    from dspark_ext.integrations.vllm import rejection_v1 as plugin

    real = {name: getattr(plugin, name) for name in (
        "request_seeds", "verify_temperature", "processing_reasons", "draft_probs_as_logits",
        "cu_num_draft_with_leading_zero", "choose_path", "logprobs_tensors")}
    # name -> (attribute, broken function, [attribute, broken function, ...])
    return {
        # every request shares one random stream: samples are no longer independent
        "shared_seed": ("request_seeds", lambda sm, n, device: torch.full((n,), 12345, dtype=torch.int64)),
        # seeded requests draw from the global RNG instead of their own generator
        "global_rng_for_seeded": ("request_seeds", lambda sm, n, device: torch.randint(0, 1 << 62, (n,))),
        # temperature ignored (and greedy rows sampled at T = 1)
        "temperature_one": ("verify_temperature", lambda sm, n, device: torch.ones(n, dtype=torch.float32)),
        # greedy rows sampled at T = 1 (with fresh random keys, as sampled rows get)
        "greedy_as_sampled": ("verify_temperature", lambda sm, n, device: torch.where(
            real["verify_temperature"](sm, n, device) > 0, real["verify_temperature"](sm, n, device), 1.0),
                              "request_seeds", lambda sm, n, device: torch.randint(0, 1 << 62, (n,))),
        # top-k / top-p ignored: the fast path on unprocessed logits
        "no_processing": ("processing_reasons", lambda sampler, sm: []),
        # draft probabilities passed as log q without the temperature: q is wrong at T != 1
        "draft_logits_without_temperature": ("draft_probs_as_logits", lambda q, t, dtype: q.log().to(dtype)),
        # vLLM's inclusive cumsum passed without its leading 0 (same length, shifted by one request)
        "no_leading_zero": ("cu_num_draft_with_leading_zero", lambda md: torch.cat(
            [md.cu_num_draft_tokens, md.cu_num_draft_tokens[-1:]]).to(torch.int32)),
        # logprobs dropped
        "no_logprobs": ("logprobs_tensors", lambda *args: None),
        # not a fault: every call takes vLLM's own forward, under the plugin's CPU expansion fix
        "force_fallback": ("choose_path", lambda *args: (plugin.Path.FALLBACK, "forced by the test")),
    }


@contextlib.contextmanager
def fault_applied(name):
    if not name:
        yield
        return
    from dspark_ext.integrations.vllm import rejection_v1 as plugin

    swaps = faults()[name]
    real = {attribute: getattr(plugin, attribute) for attribute in swaps[::2]}
    for attribute, broken in zip(swaps[::2], swaps[1::2]):
        setattr(plugin, attribute, broken)
    try:
        yield
    finally:
        for attribute, function in real.items():
            setattr(plugin, attribute, function)


def logprob_rows(logprobs):
    """Per position: [[token, logprob, rank], ...] sorted by token, or None without logprobs."""
    if logprobs is None:
        return None
    return [sorted([token, entry.logprob, entry.rank] for token, entry in position.items()) for position in logprobs]


def main(plan_path, out_path):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    plan = json.load(open(plan_path))
    if plan.get("ignore_switch"):
        # broken variant of the switch: a plugin that never reads DSPARK_VLLM_PLUGIN
        import dspark_ext.integrations.vllm as plugin_entry

        plugin_entry.switched_off = lambda: False
    llm = LLM(model=plan["model"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              speculative_config=plan.get("speculative_config"), max_num_seqs=plan.get("max_num_seqs", 256))
    results = {"runner_pid": os.getpid(), "jobs": {}}
    for job in plan["jobs"]:
        prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in job["requests"]]
        params = [SamplingParams(**r["params"]) for r in job["requests"]]
        try:
            with fault_applied(job.get("fault")):
                outputs = llm.generate(prompts, params, use_tqdm=False)
            results["jobs"][job["name"]] = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                                            "logprobs": [logprob_rows(o.outputs[0].logprobs) for o in outputs]}
        except Exception as error:  # noqa: BLE001 - recorded for the test to judge
            results["jobs"][job["name"]] = {"error": f"{type(error).__name__}: {error}"}
    json.dump(results, open(out_path, "w"))
    print(f"vllm_runner: done (pid {os.getpid()})", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
