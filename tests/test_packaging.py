"""What a packaged build promises (these also run against the installed wheel in
.ci/wheel_smoke.sh): the torch it was built against is recorded and checked at import, with one
clear line when another torch is installed, and the library shares torch's OpenMP runtime."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dspark_ext
from dspark_ext import _build_info, _loader

PACKAGE_PARENT = str(Path(dspark_ext.__file__).resolve().parent.parent)


def _built(version, cuda=None, with_cuda=False):
    return SimpleNamespace(TORCH_VERSION=version, TORCH_CUDA_VERSION=cuda, WITH_CUDA=with_cuda)


def _refusal(build, torch_version, torch_cuda) -> str:
    with pytest.raises(ImportError) as error:
        _loader.check_torch_matches(build, torch_version, torch_cuda)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_the_exact_torch_is_recorded():
    assert _build_info.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]
    info = dspark_ext.build_info()
    assert info["torch_version_full"] == _build_info.TORCH_VERSION
    assert info["torch_git_version"] == _build_info.TORCH_GIT_VERSION
    assert info["torch_cuda_version"] == _build_info.TORCH_CUDA_VERSION
    assert info["with_cuda"] == _build_info.WITH_CUDA


def test_another_torch_release_is_refused_in_one_line():
    message = _refusal(_built("2.13.0+cpu"), "2.14.1+cu130", "13.0")
    assert message.startswith("dspark_ext was built against torch 2.13.0+cpu but torch 2.14.1+cu130 is installed")
    assert "install torch==2.13.0" in message and "rebuild" in message


def test_a_cpu_build_works_with_any_variant_of_its_release():
    _loader.check_torch_matches(_built("2.13.0+cpu"), "2.13.0", "13.0")
    _loader.check_torch_matches(_built("2.13.0"), "2.13.0+cpu", None)


@pytest.mark.parametrize("torch_cuda", [None, "12.8"])
def test_a_cuda_build_needs_its_cuda_version(torch_cuda):
    message = _refusal(_built("2.14.1+cu130", "13.0", with_cuda=True), "2.14.1+cpu" if torch_cuda is None else "2.14.1+cu128",
                       torch_cuda)
    assert "(CUDA 13.0)" in message and "rebuild" in message
    assert ("no CUDA" if torch_cuda is None else "CUDA 12.8") in message


def test_import_next_to_another_torch_fails_with_one_clear_line():
    """The whole import path: dspark_ext/_build_info.py recording another release (as a wheel built
    for another torch would) makes `import dspark_ext` fail before the library is loaded."""
    code = ("import sys, types; info = types.ModuleType('dspark_ext._build_info'); "
            "info.TORCH_VERSION = '2.11.0+cpu'; info.TORCH_CUDA_VERSION = None; info.WITH_CUDA = False; "
            "sys.modules['dspark_ext._build_info'] = info; import dspark_ext")
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: dspark_ext was built against torch 2.11.0+cpu but torch {torch.__version__} "
                           "is installed; install torch==2.11.0, or rebuild"), result.stderr
    assert "dspark_ext._C" not in {line.split()[-1] for line in result.stderr.splitlines() if line.strip()}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_one_openmp_runtime_shared_with_torch():
    """dspark_ext._C needs libgomp.so.1 and finds the one torch loaded (the wheel does not bundle
    its own): a second runtime would run its own thread pool, deaf to torch.set_num_threads."""
    logits = torch.randn(64 * 3 + 64, 5000)
    torch.ops.dspark.verify(logits, torch.zeros(64 * 3, dtype=torch.int64), None,
                            torch.arange(0, 64 * 3 + 1, 3, dtype=torch.int32), torch.ones(64),
                            torch.arange(64), torch.zeros(64, dtype=torch.int64), 3)
    with open("/proc/self/maps") as maps:
        runtimes = {os.path.realpath(line.split()[-1]) for line in maps if "libgomp" in line.split()[-1]}
    assert len(runtimes) == 1, f"more than one OpenMP runtime loaded: {sorted(runtimes)}"
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    if list(torch_lib.glob("libgomp*")):
        assert Path(next(iter(runtimes))).parent == torch_lib, (runtimes, torch_lib)
