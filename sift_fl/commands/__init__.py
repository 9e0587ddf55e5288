"""Subcommands of the `sift-fl` command-line interface."""
