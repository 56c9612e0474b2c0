"""prunevlm: visual token pruning for stock Hugging Face vision-language models."""

from .api import PruneHandle, list_methods, prune, select
from .budget import Budget
from .methods import Selection

__all__ = ["Budget", "PruneHandle", "Selection", "list_methods", "prune", "select"]
__version__ = "0.1.0"
