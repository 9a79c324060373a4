"""`python -m dia_fused.analysis`: see dia_fused/analysis/cli.py."""
from .cli import main

if __name__ == "__main__":
    main()
