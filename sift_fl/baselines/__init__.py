"""Merging baselines that SIFT-Masks is compared with: FT+Merge, TIES, TALL masks, mask-only, central.

Each module is pure NumPy (TIES also uses PEFT's merge utilities on torch tensors) and
imports no Flower.
"""
