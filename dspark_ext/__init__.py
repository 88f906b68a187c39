"""dspark-ext: DSpark speculative-decoding kernels as ``torch.ops.dspark.*``.

Importing the package loads the compiled library (which registers the ops with the
dispatcher) and the Python fake kernels that make the ops traceable.
"""

from dspark_ext import _loader

_loader.load_compiled_library()

from dspark_ext import ops  # noqa: E402  (registers the fake kernels)
from dspark_ext.ops import markov_draft, verify  # noqa: E402
from dspark_ext.heads import ConfidenceHead, MarkovHead  # noqa: E402

__all__ = ["verify", "markov_draft", "MarkovHead", "ConfidenceHead", "ops", "build_info"]


def build_info() -> dict:
    """Torch version, CUDA support and CUDA architectures the library was compiled for."""
    return _loader.build_info()
