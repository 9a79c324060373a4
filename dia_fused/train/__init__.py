"""Training on CIFAR-10/100: `python -m dia_fused.train` (the official cifar.py options, paper
presets, ablation switches, exact resume, DDP through torchrun)."""
