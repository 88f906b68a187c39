"""dspark-ext inside vLLM: the `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (the front end, the engine core, each
worker), before it builds a model runner. On a vLLM version this plugin knows, it replaces:

- V1 runner (CPU and CUDA): `RejectionSampler.forward` -> `torch.ops.dspark.verify`
  (`rejection_v1.py`);
- V2 runner (CUDA): `rejection_sample` -> `torch.ops.dspark.verify`, and DSpark's dense
  `_sample_sequential` -> one `torch.ops.dspark.markov_draft` (`v2_runner.py`);
- vLLM-CPU only: the broken per-token expansion of temperature / top-k / top-p that corrupts
  stock speculative sampling (`cpu_expand_fix.py`, vllm#55005).

`DSPARK_VLLM_PLUGIN=0` switches it off. Nothing in dspark_ext imports this package.
"""

import logging
import os

logger = logging.getLogger("vllm.dspark_ext")

SWITCH_VARIABLE = "DSPARK_VLLM_PLUGIN"
KNOWN_VLLM_VERSIONS = ("0.32.0",)

_registered = False


def switched_off() -> bool:
    return os.environ.get(SWITCH_VARIABLE, "1").strip().lower() in ("0", "false", "off", "no")


def known_version(version: str) -> bool:
    """Local build tags (0.32.0+cpu, 0.32.0+cu130) patch the same sources."""
    return version.split("+", 1)[0] in KNOWN_VLLM_VERSIONS


def register() -> None:
    """The entry point: patch vLLM once per process, or say in one line why not."""
    global _registered
    if _registered:
        return
    _registered = True
    if switched_off():
        logger.info("dspark-ext vLLM plugin: switched off by %s=%s; vLLM runs unpatched", SWITCH_VARIABLE,
                    os.environ[SWITCH_VARIABLE])
        return
    import vllm

    if not known_version(vllm.__version__):
        logger.warning("dspark-ext vLLM plugin: vLLM %s is not a version it knows (%s); nothing patched. "
                       "Install vllm==%s or set %s=0 to silence this.", vllm.__version__,
                       ", ".join(KNOWN_VLLM_VERSIONS), KNOWN_VLLM_VERSIONS[-1], SWITCH_VARIABLE)
        return
    from vllm.platforms import current_platform

    from dspark_ext.integrations.vllm import cpu_expand_fix, rejection_v1, v2_runner

    replaced = rejection_v1.install()
    if current_platform.is_cpu():
        replaced += cpu_expand_fix.install()
    replaced += v2_runner.install_v2_patches()
    logger.info("dspark-ext vLLM plugin (pid %d): replaced %s", os.getpid(), "; ".join(replaced) or "nothing")
