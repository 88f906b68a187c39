"""dspark-ext: DSpark speculative-decoding kernels as ``torch.ops.dspark.*``.

Importing the package loads the compiled library (which registers the ops with the
dispatcher) and the Python fake kernels that make the ops traceable.
"""

from dspark_ext import _loader

_loader.load_compiled_library()

from dspark_ext import ops  # noqa: E402  (registers the fake kernels)
from dspark_ext.ops import markov_draft, schedule, verify  # noqa: E402
from dspark_ext.heads import ConfidenceHead, MarkovHead  # noqa: E402
from dspark_ext.scheduling import schedule_async  # noqa: E402
from dspark_ext.calibration import calibrate_sts, load_sps, profile_sps, reliability_diagram, save_sps  # noqa: E402
from dspark_ext.generate import GenerationResult, generate  # noqa: E402
from dspark_ext.defaults import DefaultSetup, load_default  # noqa: E402
from dspark_ext.drafters import AutoregressiveDrafter, DSparkDrafter, MarkovDrafter, NgramDrafter  # noqa: E402

__all__ = [
    "verify",
    "markov_draft",
    "schedule",
    "schedule_async",
    "MarkovHead",
    "ConfidenceHead",
    "profile_sps",
    "save_sps",
    "load_sps",
    "calibrate_sts",
    "reliability_diagram",
    "generate",
    "GenerationResult",
    "load_default",
    "DefaultSetup",
    "AutoregressiveDrafter",
    "MarkovDrafter",
    "NgramDrafter",
    "ops",
    "build_info",
]


def build_info() -> dict:
    """Torch version, CUDA support and CUDA architectures the library was compiled for."""
    return _loader.build_info()
