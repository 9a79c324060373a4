"""Analysis of DIANets (paper Figures 5 and 6): `python -m dia_fused.analysis gini|gradients`."""
