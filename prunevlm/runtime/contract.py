"""The hook contract with transformers: the one module that reads or writes a hooked forward's keywords
and outputs by name (docs/transformers.md).

A pre-hook sees the keywords the caller passed, before any `deprecate_kwarg` wrapper renames them, so the
cache can arrive under its current name (`cache`, 5.24) or its old one (`past_key_values`, 5.23 and callers
still using it). Positional arguments are bound to their names once, so no hook depends on how its module
happens to be called. Anything that does not fit the contract raises `ContractError`: a pruning library that
keeps running on a changed contract would run unpruned, or half-pruned, without a word.
"""

from __future__ import annotations

import inspect
import warnings
from functools import lru_cache
from importlib import metadata

import torch
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from ..errors import PruneError, Unsupported

CACHE_KEYWORDS = ("cache", "past_key_values")  # current name first; 5.24 renamed past_key_values to cache


# The newest transformers release CI has run the whole suite on (requirements.lock pins it; README says it).
# Releases up to the next major are allowed: every assumption of the hooks raises ContractError when broken,
# and CI's newest-release run is what catches a break (docs/transformers.md, "Which releases").
NEWEST_TESTED = "5.25.0"


def transformers_version() -> str:
    return metadata.version("transformers")


def supported_range() -> str:
    """The transformers range this installation of prunevlm declares (pyproject.toml)."""
    try:
        requirements = metadata.requires("prunevlm") or []
    except metadata.PackageNotFoundError:
        return "see prunevlm's pyproject.toml"
    for requirement in requirements:
        name = requirement.split(";")[0].strip()
        if name.startswith("transformers"):
            return name[len("transformers"):].strip() or "any"
    return "any"


def warn_if_untested() -> None:
    """Warn, once per process, when the installed transformers is newer than NEWEST_TESTED or outside the
    declared range; the hooks still check the contract on every call and raise if it does not hold."""
    _warn_once(transformers_version())


@lru_cache(maxsize=None)
def _warn_once(installed: str) -> None:
    try:
        declared = SpecifierSet(supported_range())
    except InvalidSpecifier:
        declared = SpecifierSet()
    newer = Version(installed) > Version(NEWEST_TESTED)
    if declared.contains(installed, prereleases=True) and not newer:
        return
    reason = (f"newer than {NEWEST_TESTED}, the newest release prunevlm was tested with" if newer
              else f"outside the range prunevlm declares (transformers{declared})")
    warnings.warn(f"transformers {installed} is {reason}; pruning runs, and raises ContractError if this release "
                  f"calls the hooks differently", stacklevel=4)


class ContractError(PruneError, RuntimeError):
    """transformers called a hooked module in a way prunevlm does not know; pruning cannot be applied."""

    def __init__(self, what: str):
        super().__init__(
            f"{what}. prunevlm cannot prune safely under transformers {transformers_version()} (supported: "
            f"transformers{supported_range()}, newest tested {NEWEST_TESTED}). Install a supported release (pip install 'transformers"
            f"{supported_range()}'), or remove the pruning handle to run the model unpruned."
        )


class Call:
    """The keywords of one hooked forward call, positional arguments bound to their names."""

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        names = _positional_names(type(module))
        if len(args) > len(names):
            raise ContractError(f"{type(module).__name__} was called with {len(args)} positional arguments, more than "
                                f"its forward names ({len(names)})")
        self.kwargs = {**dict(zip(names, args)), **kwargs}

    def __getitem__(self, name: str):
        return self.kwargs[name]

    def get(self, name: str, default=None):
        return self.kwargs.get(name, default)

    def update(self, **values) -> tuple[tuple, dict]:
        """Replace keywords; returns what a forward pre-hook returns to change the call."""
        self.kwargs.update(values)
        return (), self.kwargs

    def cache(self, required: bool) -> Cache | None:
        """The KV cache of this call. `required`: the caller always passes one (the VLM's own call of its
        language model passes it even when it is None), so its absence means the keyword was renamed."""
        present = [name for name in CACHE_KEYWORDS if name in self.kwargs]
        if len(present) > 1:
            raise ContractError(f"a forward received the cache under both {present[0]!r} and {present[1]!r}")
        if present:
            cache = self.kwargs[present[0]]
            if cache is not None and not isinstance(cache, Cache):
                raise ContractError(f"the cache passed as {present[0]!r} is a {type(cache).__name__}, not a "
                                    f"transformers Cache")
            return cache
        stray = sorted(name for name, value in self.kwargs.items() if isinstance(value, Cache))
        if stray:
            raise ContractError(f"a forward received its cache under {stray[0]!r}, a name prunevlm does not know "
                                f"(known: {', '.join(CACHE_KEYWORDS)})")
        if required:
            raise ContractError(f"the language model was called without a cache keyword ({' or '.join(CACHE_KEYWORDS)}); "
                                f"its keywords were {sorted(self.kwargs)}")
        return None


@lru_cache(maxsize=None)
def _positional_names(module_class: type) -> tuple[str, ...]:
    """Names of forward's parameters that can be given by position (signature seen through decorators)."""
    parameters = inspect.signature(module_class.forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in kinds and p.name != "self")


def is_prefill(cache: Cache | None) -> bool:
    return cache is None or cache.get_seq_length() == 0


def check_dynamic(cache: Cache | None) -> None:
    """Refuse caches whose length is fixed in advance: pruning shortens the sequence they would follow."""
    if cache is not None and cache.is_compileable:
        raise Unsupported(
            f"pruning needs a dynamic KV cache; got a {type(cache).__name__} (a static or other compileable cache, "
            f"e.g. generate(cache_implementation='static')). Use the default dynamic cache, or remove the pruning handle."
        )


def output_cache(output) -> Cache | None:
    """The cache a forward returned, found among the keys the output really holds: on 5.24 both the old
    attribute and even a membership test under the old name (`"past_key_values" in output`) print
    transformers' deprecation warning."""
    for name in output.keys():
        if name in CACHE_KEYWORDS:
            return output[name]
    return None


def layer_cache_length(cache: Cache, layer: int) -> int:
    """Tokens held by one decoder layer's cache (layers of one model may hold different lengths once pruned)."""
    return cache.get_seq_length(layer)


def causal_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache: Cache | None, layer: int):
    """transformers' own mask for one layer, sized against that layer's cache (the cache by position: its
    keyword was renamed in 5.24)."""
    return create_causal_mask(config, inputs_embeds, attention_mask, cache, layer_idx=layer)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which `model`'s forward takes a cache on the installed transformers, for callers that
    pass one themselves (the old name still works on 5.24, with a deprecation warning)."""
    parameters = inspect.signature(type(model).forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise ContractError(f"{type(model).__name__}.forward takes no cache keyword ({' or '.join(CACHE_KEYWORDS)})")


def layer_keys(cache: Cache, layer: int) -> torch.Tensor:
    """[B, H_kv, L, d_h] the post-RoPE keys one decoder layer's cache holds."""
    return cache.layers[layer].keys
