"""`python -m prunevlm`: the same command line as `prunevlm`."""

from .cli import main

main()
