"""Names of the methods the experiment compares, and parsing of the `--methods` option."""

from __future__ import annotations

# The compared methods, in table order.
METHODS = (
    "local",
    "ft_merge",
    "sift_merge",
    "sift_masks",
    "ties",
    "tall_masks",
    "central",
    "sift_masks_coverage",
    "mask_only",
)
# Diagnostics run with "all": each client's own SIFT model (the upper bound for sift_masks).
EXTRA_METHODS = ("local_sift",)
ALL_METHODS = METHODS + EXTRA_METHODS

# Methods that need each client's plain finetuning residual, or its SIFT residual.
PLAIN_METHODS = frozenset({"local", "ft_merge", "ties", "tall_masks"})
SIFT_METHODS = frozenset({"local_sift", "sift_merge", "sift_masks", "sift_masks_coverage", "mask_only"})


def parse_methods(text: str) -> tuple[str, ...]:
    """Return the methods named in a comma-separated list, in table order; "all" selects every method."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("no method given; pass a comma-separated list such as ft_merge,sift_masks, or all")
    if "all" in names:
        return ALL_METHODS

    unknown = [name for name in names if name not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)} or all")
    return tuple(method for method in ALL_METHODS if method in names)
