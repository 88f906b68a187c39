"""Loads dspark_ext._C and fails with a clear message when it cannot work with this torch."""

import importlib

import torch


def _installed_torch_release() -> str:
    return torch.__version__.split("+")[0]


def load_compiled_library() -> None:
    try:
        from dspark_ext import _build_info
    except ImportError as error:
        raise ImportError(
            "dspark_ext was not built: run `pip install --no-build-isolation -e .` in the repository "
            "(with torch installed first)."
        ) from error
    built = _build_info.TORCH_VERSION.split("+")[0]
    if built != _installed_torch_release():
        raise ImportError(
            f"dspark_ext._C was built against torch {_build_info.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed; rebuild with `pip install --no-build-isolation -e .`."
        )
    try:
        importlib.import_module("dspark_ext._C")
    except ImportError as error:
        raise ImportError(
            f"dspark_ext._C failed to load ({error}); it was built against torch {_build_info.TORCH_VERSION} "
            f"and torch {torch.__version__} is installed. Rebuild with `pip install --no-build-isolation -e .`."
        ) from error


def build_info() -> dict:
    from dspark_ext import _C

    return dict(_C.build_info())
