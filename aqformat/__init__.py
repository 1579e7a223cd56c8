"""aqformat: compressed neural-network model files (.aqm).

Weights are stored as bit-packed codes into codebooks shared across layers
(additive quantization), raw tensors, or dithered-lattice indices, in a
versioned, memory-mappable container specified in spec/FORMAT.md.
"""
__version__ = "0.1.0"

from .errors import (AqmBudgetError, AqmError, AqmFormatError, AqmInputError, AqmIntegrityError, AqmIOError,  # noqa: E402
                     AqmUnsupportedError, AqmVersionError, AqmWarning, StageTooLarge, TooSmallForAQ)
from .codecs.aq import AQParts  # noqa: E402
from .reader import AqmFile, TensorInfo, open, set_decode_budget  # noqa: E402
from .writer import Writer  # noqa: E402

__all__ = ["AqmBudgetError", "set_decode_budget", "AqmError", "AqmFormatError", "AqmInputError", "AqmIntegrityError", "AqmIOError", "AqmUnsupportedError",
           "AqmVersionError", "AqmWarning", "StageTooLarge", "TooSmallForAQ", "AqmFile", "AQParts", "TensorInfo",
           "Writer", "open", "__version__"]
