"""Synthesizers: turn teachers (and the current student) into batches of [0,1] images.

Importing this package registers every built-in method.
"""
from generators import adversarial, cmi, dafl, deepinversion, dfnd, fast, kegnet, lopes, mosaickd, real, zskd  # noqa: F401
from generators.base import (
    Synthesizer,
    SynthesizerOptionError,
    SyntheticBatch,
    UnknownSynthesizerError,
    create_synthesizer,
    list_synthesizers,
    register_synthesizer,
    synthesizer_class,
)
from generators.pool import ImagePool

__all__ = [
    "ImagePool",
    "Synthesizer",
    "SynthesizerOptionError",
    "SyntheticBatch",
    "UnknownSynthesizerError",
    "create_synthesizer",
    "list_synthesizers",
    "register_synthesizer",
    "synthesizer_class",
]
