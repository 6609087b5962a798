"""`python -m igpt_core.cli`: the same as the `igpt` command."""

from igpt_core.cli import main

main()
