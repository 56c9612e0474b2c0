"""Registry of selection methods: name -> Method class."""

from __future__ import annotations

from .base import SIGNALS, Method, Selection
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .evs import EVS
from .fastv import FastV
from .flashvlm import FlashVLM
from .pdrop import PyramidDrop
from .random import Random
from .sparsevlm import SparseVLM
from .uniform import Uniform
from .vflowopt import VFlowOpt
from .vispruner import VisPruner
from .visionzip import VisionZip
from ..errors import InvalidOption

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FlashVLM, VisPruner, VFlowOpt, Random, Uniform, VisionZip, DivPrune, CDPruner,
                                EVS, FastV, PyramidDrop, DART, SparseVLM)
}


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str) or name not in METHODS:
        raise InvalidOption(f"unknown method {name!r}; available: {', '.join(METHODS)} (see prunevlm.list_methods())")
    return METHODS[name]


def make_method(method: str | Method, **options) -> Method:
    """An instance from a name and options (unknown options are refused), or a ready instance."""
    if isinstance(method, Method):
        if options:
            raise InvalidOption("pass options either to the method instance or here, not both")
        return method
    cls = get_method(method)
    known = cls.options()
    unknown = set(options) - set(known)
    if unknown:
        raise InvalidOption(f"{cls.name} has no option(s) {sorted(unknown)}; its options are {known}")
    return cls(**options)


__all__ = ["METHODS", "SIGNALS", "Method", "Selection", "get_method", "make_method"]
