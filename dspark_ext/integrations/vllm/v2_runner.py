"""Installs the vLLM V2 model-runner patches (`v2_verify.py`, `v2_markov.py`).

- `rejection_sample` (vllm/v1/worker/gpu/spec_decode/rejection_sampler_utils.py:1015, vLLM 0.32)
  is called by name from modules that imported it (`from ... import rejection_sample`:
  rejection_sampler.py:24-26, whose `RejectionSampler._verify` calls it at :268, and
  vllm/v1/watermarking/spec_decode.py:16). Each module keeps its own reference, so every module
  attribute that holds the original is replaced, in the known modules and in any other loaded
  vLLM module.
- `DSparkSpeculator._sample_sequential` (dspark/speculator.py:156) is a method: replacing the class
  attribute covers every instance, including those built before the patch.

Every replacement keeps the original as `__dspark_original__` and calls it for what it cannot
reproduce exactly. The modules are imported here, each under its own guard (a CPU-only vLLM
imports them fine: Triton kernels are only compiled when launched), so the patch is in place
before vLLM builds a runner, whichever process this runs in.
"""

import logging
import sys
from typing import Callable, List, Tuple

logger = logging.getLogger("vllm.dspark_ext")

UTILS_MODULE = "vllm.v1.worker.gpu.spec_decode.rejection_sampler_utils"
#: Modules known to hold `rejection_sample` by `from ... import` (vLLM 0.32).
REJECTION_SAMPLE_IMPORTERS = (
    "vllm.v1.worker.gpu.spec_decode.rejection_sampler",
    "vllm.v1.watermarking.spec_decode",
)
DSPARK_SPECULATOR_MODULE = "vllm.v1.worker.gpu.spec_decode.dspark.speculator"

#: (owner, attribute, original) of every replacement made, for uninstall_v2_patches().
_installed: List[Tuple[object, str, object]] = []


def _import(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any import failure means: not patchable here
        logger.debug("dspark-ext: cannot import %s (%s: %s)", name, type(error).__name__, error)
        return None


def _holds(module, original) -> bool:
    try:
        return getattr(module, "rejection_sample", None) is original
    except Exception:  # noqa: BLE001 - a lazy module's __getattr__ may raise anything
        return False


def _replace(owner, attribute: str, replacement, label: str, replaced: List[str]) -> None:
    _installed.append((owner, attribute, getattr(owner, attribute)))
    setattr(owner, attribute, replacement)
    replaced.append(label)


def _install_rejection_sample(replaced: List[str]) -> None:
    utils = _import(UTILS_MODULE)
    if utils is None or not callable(getattr(utils, "rejection_sample", None)):
        return
    original = utils.rejection_sample
    if getattr(original, "__dspark_original__", None) is not None:
        return  # installed already
    from dspark_ext.integrations.vllm.v2_verify import make_rejection_sample_replacement

    replacement = make_rejection_sample_replacement(original)
    for name in REJECTION_SAMPLE_IMPORTERS:
        _import(name)
    holders = [utils] + [module for name, module in sorted(sys.modules.items())
                         if name.startswith("vllm") and module is not utils and _holds(module, original)]
    for module in holders:
        _replace(module, "rejection_sample", replacement,
                 f"{module.__name__}.rejection_sample -> torch.ops.dspark.verify", replaced)


def _install_sample_sequential(replaced: List[str]) -> None:
    module = _import(DSPARK_SPECULATOR_MODULE)
    speculator = getattr(module, "DSparkSpeculator", None) if module is not None else None
    original = getattr(speculator, "_sample_sequential", None)
    if original is None or getattr(original, "__dspark_original__", None) is not None:
        return
    from dspark_ext.integrations.vllm.v2_markov import make_sample_sequential_replacement

    _replace(speculator, "_sample_sequential", make_sample_sequential_replacement(original),
             f"{DSPARK_SPECULATOR_MODULE}.DSparkSpeculator._sample_sequential (dense) -> "
             "torch.ops.dspark.markov_draft", replaced)


def install_v2_patches() -> List[str]:
    """Patches vLLM's V2 runner; returns what it replaced ([] when the V2 modules do not import,
    when dspark's ops are unavailable, or when already installed). Never raises."""
    replaced: List[str] = []
    try:
        import dspark_ext  # noqa: F401  (loads torch.ops.dspark.*)
    except Exception as error:  # noqa: BLE001
        logger.warning("dspark-ext: the dspark ops do not load (%s: %s); vLLM V2 left unpatched",
                       type(error).__name__, error)
        return replaced
    installers: Tuple[Callable[[List[str]], None], ...] = (_install_rejection_sample, _install_sample_sequential)
    for install in installers:
        try:
            install(replaced)
        except Exception as error:  # noqa: BLE001 - a failed patch must not stop vLLM
            logger.warning("dspark-ext: %s failed (%s: %s)", install.__name__, type(error).__name__, error)
    return replaced


def uninstall_v2_patches() -> List[str]:
    """Puts back every original install_v2_patches() replaced (tests); returns what it restored."""
    restored = []
    while _installed:
        owner, attribute, original = _installed.pop()
        setattr(owner, attribute, original)
        restored.append(f"{getattr(owner, '__name__', owner)}.{attribute}")
    return restored
