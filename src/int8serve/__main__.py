"""`python -m int8serve` runs the command line."""

from int8serve.cli import main

main()
