"""Every exception aqformat raises. Every failure a user can cause is an ``AqmError``.

One class per fault, whichever part of the package meets it: a stored graph
that does not parse is an :class:`AqmFormatError` in the runtime and in the
converters alike.
"""

__all__ = ["AqmError", "AqmFormatError", "AqmVersionError", "AqmIntegrityError", "AqmUnsupportedError",
           "AqmInputError", "AqmIOError", "AqmBudgetError", "TooSmallForAQ", "StageTooLarge", "AqmWarning"]


class AqmError(Exception):
    """Base class of every error aqformat raises on bad input."""


class AqmFormatError(AqmError):
    """The file is not a well-formed .aqm file (bad magic, header, bounds, stored graph...)."""


class AqmVersionError(AqmFormatError):
    """The file's major format version is not supported by this reader."""


class AqmIntegrityError(AqmError):
    """A checksum does not match: the bytes on disk were corrupted."""


class AqmUnsupportedError(AqmError):
    """The input is valid but uses a feature aqformat lacks (a codec, a section encoding, a layer kind)."""


class AqmInputError(AqmError):
    """An argument given to aqformat (a model, a path, a setting) is not usable."""


class AqmBudgetError(AqmError):
    """Decoding a tensor (or the graph) would need more memory than the reader's decode budget."""


class AqmIOError(AqmError):
    """The operating system refused a read or a write (disk full, I/O error); nothing half-written is left."""


class TooSmallForAQ(AqmInputError):
    """The tensor has fewer elements than one vector, or fewer vectors than ``K``.

    Callers keep such a tensor raw (fp16/fp32) instead of coding it.
    """


class StageTooLarge(AqmInputError):
    """One graph node needs more weight bytes at once than a streaming stage may hold.

    Attributes
    ----------
    need : int
        The bytes of weights the node needs at once.
    """

    def __init__(self, node: str, op: str, need: int, kind: str):
        super().__init__(f"node {node!r} ({op}) needs {need} bytes of weights at once, {kind}")
        self.need = need


class AqmWarning(UserWarning):
    """Something a user asked for that works but is probably not what they meant."""
