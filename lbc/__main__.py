"""`python -m lbc` is the `lbc` command."""

from lbc.cli import main

main()
