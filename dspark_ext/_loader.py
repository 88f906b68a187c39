"""Loads dspark_ext._C and fails with a clear message when it cannot work with this torch.

dspark_ext/_build_info.py (written by setup.py at build time, shipped in the wheel) records the
exact torch the library was compiled against. The C++ ABI of torch changes between releases,
so a different release is refused here, in one line, before the library is loaded (it would
otherwise fail with an undefined symbol, or worse, load and misbehave). A CPU-only build works
with any build variant of its release (+cpu or +cuXYZ); a CUDA build needs the same CUDA
version of torch too.
"""

import importlib
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent


def _installed_torch_release() -> str:
    return torch.__version__.split("+")[0]


def _how_to_rebuild() -> str:
    if (_PACKAGE_DIR.parent / "setup.py").exists():  # a source checkout (editable or in place)
        return f"rebuild with `pip install --no-build-isolation -e .` in {_PACKAGE_DIR.parent}"
    return ("rebuild dspark-ext from its source tree against this torch with "
            "`python -m pip install --no-build-isolation .` (README: Install from a wheel)")


def check_torch_matches(build_info, torch_version: str, torch_cuda_version) -> None:
    """Raises ImportError (one line) when ``build_info`` (the _build_info module or an object with
    its attributes) was built against another torch than ``torch_version`` / ``torch_cuda_version``."""
    built = build_info.TORCH_VERSION
    built_release = built.split("+")[0]
    if built_release != torch_version.split("+")[0]:
        raise ImportError(
            f"dspark_ext was built against torch {built} but torch {torch_version} is installed; "
            f"install torch=={built_release}, or {_how_to_rebuild()}."
        )
    built_cuda = getattr(build_info, "TORCH_CUDA_VERSION", None)
    if getattr(build_info, "WITH_CUDA", False) and built_cuda is not None and built_cuda != torch_cuda_version:
        have = f"CUDA {torch_cuda_version}" if torch_cuda_version else "no CUDA"
        raise ImportError(
            f"dspark_ext was built with CUDA kernels against torch {built} (CUDA {built_cuda}) but torch "
            f"{torch_version} ({have}) is installed; install that torch build, or {_how_to_rebuild()}."
        )


def load_compiled_library() -> None:
    try:
        from dspark_ext import _build_info
    except ImportError as error:
        raise ImportError(
            "dspark_ext was not built: run `pip install --no-build-isolation -e .` in the repository "
            "(with torch installed first)."
        ) from error
    check_torch_matches(_build_info, torch.__version__, torch.version.cuda)
    try:
        importlib.import_module("dspark_ext._C")
    except ImportError as error:
        raise ImportError(
            f"dspark_ext._C failed to load ({error}); it was built against torch {_build_info.TORCH_VERSION} "
            f"and torch {torch.__version__} is installed; {_how_to_rebuild()}."
        ) from error


def build_info() -> dict:
    from dspark_ext import _C, _build_info

    info = dict(_C.build_info())
    info["torch_version_full"] = _build_info.TORCH_VERSION
    info["torch_git_version"] = getattr(_build_info, "TORCH_GIT_VERSION", "unknown")
    info["torch_cuda_version"] = getattr(_build_info, "TORCH_CUDA_VERSION", None)
    return info
