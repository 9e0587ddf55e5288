"""Store identity: the parameter layout, base model θ0, sign seed and number format a store is bound to.

A store records these when it is created and rejects any later use with different ones,
because residuals merged under one θ0, sign vector or resolution cannot be mixed with
residuals from another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sift_fl.fixed_point import FixedPointFormat
from sift_fl.layout import ParameterLayout

STORE_FORMAT = "sift-fl-store-1"


class StoreError(RuntimeError):
    """The store directory is missing, damaged or in use in a way that blocks the operation."""


class StoreMismatchError(StoreError):
    """The store was created for a different layout, base model, sign seed or number format."""


def describe_format(number_format: FixedPointFormat) -> str:
    """Return the number format as one sentence: resolution, max magnitude and max clients."""
    return (
        f"int64 fixed point with resolution 2^-{number_format.fraction_bits} "
        f"({number_format.resolution:.3g}), magnitudes up to {number_format.max_magnitude:g}, "
        f"at most {number_format.max_clients:,} clients"
    )


@dataclass(frozen=True)
class StoreIdentity:
    """Layout, base digest, sign seed and fixed-point format that every stored residual shares."""

    layout: ParameterLayout
    base_digest: str
    sign_seed: int
    number_format: FixedPointFormat = field(default_factory=FixedPointFormat)

    @property
    def layout_digest(self) -> str:
        return self.layout.digest()

    def to_meta(self) -> dict[str, str]:
        """Return the identity as the string key/value rows of the manifest's meta table."""
        return {
            "format": STORE_FORMAT,
            "layout": self.layout.to_json(),
            "layout-digest": self.layout_digest,
            "base-digest": self.base_digest,
            "sign-seed": str(self.sign_seed),
            "fraction-bits": str(self.number_format.fraction_bits),
            "max-magnitude": repr(float(self.number_format.max_magnitude)),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> StoreIdentity:
        """Read the identity from the manifest's meta rows.

        Raises
        ------
        StoreError
            If the store format is unknown or the layout does not match its recorded digest.
        """
        if meta.get("format") != STORE_FORMAT:
            raise StoreError(f"store format is {meta.get('format')!r}, this version of sift-fl reads {STORE_FORMAT!r}")
        layout = ParameterLayout.from_json(meta["layout"])
        if layout.digest() != meta["layout-digest"]:
            raise StoreError("the store's recorded layout does not match its recorded layout digest; the manifest is damaged")

        number_format = FixedPointFormat(int(meta["fraction-bits"]), float(meta["max-magnitude"]))
        return cls(layout, meta["base-digest"], int(meta["sign-seed"]), number_format)

    def mismatches(self, expected: StoreIdentity) -> list[str]:
        """Return one line per field where this (stored) identity differs from `expected`."""
        problems = []
        if self.layout_digest != expected.layout_digest:
            problems.append(f"layout digest: store has {self.layout_digest[:16]}, expected {expected.layout_digest[:16]}")
        if self.base_digest != expected.base_digest:
            problems.append(f"base digest: store has {self.base_digest[:16]}, expected {expected.base_digest[:16]}")
        if self.sign_seed != expected.sign_seed:
            problems.append(f"sign seed: store has {self.sign_seed}, expected {expected.sign_seed}")
        if self.number_format != expected.number_format:
            problems.append(
                f"number format: store has {describe_format(self.number_format)}, "
                f"expected {describe_format(expected.number_format)}"
            )
        return problems
