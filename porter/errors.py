"""Exceptions porter raises for bad input. Each message says what is wrong and what to do."""


class PorterError(Exception):
    """Base class of every error porter reports to a user (the CLI prints these without a traceback)."""


class GGMLVersionError(PorterError):
    """The installed ggml library is not the one the cffi declarations were generated from."""


class ShapeError(PorterError, ValueError):
    """An op was given tensors whose shapes or types ggml would reject (and abort the process)."""


class SpecError(PorterError, ValueError):
    """A graph spec is invalid or of an unknown version."""


class ModelError(PorterError):
    """A checkpoint or GGUF file is missing, malformed, or not supported."""


class UnsupportedArchitecture(ModelError):
    """No plugin claims this architecture."""


class OptionError(PorterError):
    """A command-line option or argument is outside its valid range."""
