"""Exceptions raised by aqformat. Every failure a user can cause is an ``AqmError``."""


class AqmError(Exception):
    """Base class of every error aqformat raises on bad input."""


class AqmFormatError(AqmError):
    """The file is not a well-formed .aqm file (bad magic, header, bounds...)."""


class AqmVersionError(AqmFormatError):
    """The file's major format version is not supported by this reader."""


class AqmIntegrityError(AqmError):
    """A checksum does not match: the bytes on disk were corrupted."""


class AqmUnsupportedError(AqmError):
    """The file is valid but uses a feature (e.g. a codec) this reader lacks."""


class AqmInputError(AqmError):
    """An argument given to aqformat (a model, a path, a setting) is not usable."""


class AqmWarning(UserWarning):
    """Something a user asked for that works but is probably not what they meant."""
