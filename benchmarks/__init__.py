"""Benchmarks of SIFT-Masks costs, each a ratio against a reference measured in the same run.

Run `python -m benchmarks --json PATH` for the full suite or add `--quick` for a reduced
smoke run. Each figure module measures one ratio and returns a `Figure`.
"""
