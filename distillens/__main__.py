"""`python -m distillens ...`: the same command line as `distillens ...`."""

from distillens.cli import main

main()
