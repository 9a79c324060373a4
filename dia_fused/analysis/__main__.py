"""`python -m dia_fused.analysis`: see dia_fused/analysis/cli.py."""

from .cli import console_main

if __name__ == "__main__":
    console_main()
