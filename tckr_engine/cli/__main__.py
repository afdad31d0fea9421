"""`python -m tckr_engine.cli ...`, as the `tckr-engine` script."""

from tckr_engine.cli import main

main()
