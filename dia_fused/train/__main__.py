"""`python -m dia_fused.train`: see dia_fused/train/cli.py for the options and examples."""
from .cli import main

if __name__ == "__main__":
    main()
