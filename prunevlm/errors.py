"""The errors prunevlm raises on purpose (docs/errors.md). Each also derives from the built-in it replaces, so
`except ValueError` (or TypeError, NotImplementedError, RuntimeError) written before the hierarchy keeps
working; `except prunevlm.PruneError` catches them all.

Two more members are defined beside the code that raises them and exported from `prunevlm`: `Refused` and
its `SignalsUnavailable` (methods/base.py), and `ContractError` (runtime/contract.py). This module imports
nothing, so that `prunevlm --help` stays free of torch.
"""

from __future__ import annotations


class PruneError(Exception):
    """The base of every error prunevlm raises on purpose, each with what is wrong and what to do."""


class InvalidSetting(PruneError, ValueError):
    """A setting given by the caller that prunevlm cannot use: a position or newline policy, a device, a dtype,
    a command's flags that contradict each other."""


class InvalidBudget(InvalidSetting, TypeError):
    """A budget or budget scope that is no budget: 0, 1.5, NaN, '64', 'crops' (a TypeError where the type is
    wrong, as Python raises one)."""


class InvalidOption(InvalidSetting, TypeError):
    """An unknown method, an option the method does not have, or an option value of the wrong type or out of
    its range (`prunevlm methods --verbose` lists each option's)."""


class InvalidConfig(InvalidSetting, TypeError):
    """A saved pruning config (prunevlm.config) that cannot be read, or whose fields are missing, unknown or
    invalid; or one that contradicts the method, budget or options given with it."""


class InvalidInput(PruneError, ValueError):
    """Model inputs or files that contradict themselves or cannot be read: placeholders that do not match the
    images, an unreadable image, a JSONL row without a prompt."""


class InvalidSignals(InvalidInput, TypeError):
    """Signals given to a method (`prunevlm.select`, or by an adapter) that are missing, unknown, of the wrong
    type, or whose shape or layout (grid, planes, frames) does not hold the N tokens (a TypeError where a
    signal is missing or of the wrong type, as Python raises one for an argument)."""


class Unsupported(PruneError, NotImplementedError):
    """A model, model configuration or input kind prunevlm does not handle (a text-only LLM, a vision tower
    of another kind, a video on LLaVA-1.5 or LLaVA-NeXT, a static cache, a 4D attention mask): nothing is
    pruned."""


class LoadError(PruneError, RuntimeError):
    """A model folder or hub id whose config, processor or weights could not be read (a damaged or truncated
    weights file, missing processor files)."""


class HandleConflict(PruneError, RuntimeError, TypeError):
    """What was asked conflicts with a pruning handle's hold on its model: a second handle on a model that has
    one, a deep copy of a model under one, a KV cache or image features made outside the handle. Also a
    TypeError because `copy.deepcopy` raises one for what it cannot copy (docs/errors.md §1)."""
