"""Upload size of an encoded residual against the same residual sent dense in float32."""

from __future__ import annotations

import logging

from benchmarks.common import Figure
from benchmarks.workload import synthetic_residual
from sift_fl.codec import decode_residual, dense_nbytes, encode_residual
from sift_fl.layout import ParameterLayout
from sift_fl.sign import SignVector

logger = logging.getLogger(__name__)

MASK_OVERHEAD = 0.03  # the packed mask costs 1 bit per 32-bit coordinate, 1/32 = 0.031


def upload_ratio(layout: ParameterLayout, sign_vector: SignVector, density: float, magnitude_dtype: str) -> tuple[float, float]:
    """Encode a synthetic dense residual with the codec; return (bytes / dense fp32 bytes, actual density)."""
    encoded = synthetic_residual(layout, density, seed=100)
    dense = decode_residual(encoded, layout, sign_vector)
    reencoded = encode_residual(dense, layout, sign_vector, magnitude_dtype)
    return reencoded.nbytes / dense_nbytes(layout), reencoded.density()


def measure_upload(layout: ParameterLayout, sign_vector: SignVector, measured_density: float) -> list[Figure]:
    """Return the fp32 upload figures at density 0.5 and at the measured density, and the fp16 one at 0.5."""
    figures = []
    cases = [
        ("upload_fp32_density_0.5", "float32", 0.5, 0.53),
        ("upload_fp32_measured_density", "float32", measured_density, round(measured_density + MASK_OVERHEAD, 2)),
        ("upload_fp16_density_0.5", "float16", 0.5, 0.30),
    ]
    for name, dtype, density, target in cases:
        ratio, actual = upload_ratio(layout, sign_vector, density, dtype)
        logger.info("upload: %s ratio %.4f at density %.4f", name, ratio, actual)
        figures.append(
            Figure.compare(
                name,
                f"upload bytes, packed mask + {dtype} magnitudes, density {actual:.3f}",
                "dense float32 residual",
                ratio,
                target,
                "<=",
                decimals=2,
                measured={"density": actual, "num_parameters": layout.num_parameters, "dense_bytes": dense_nbytes(layout)},
                notes=(
                    "compared at two decimals, the precision of the target; the floor of this wire "
                    "format is 1/32 + density * (magnitude bytes / 4)"
                ),
            )
        )
    return figures
