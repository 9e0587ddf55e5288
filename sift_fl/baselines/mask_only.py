"""Mask-only control: serve client c θ0 + m_c ⊙ v ⊙ s_t, one constant magnitude s_t per tensor.

s_t is the mean magnitude of all merged residual entries of tensor t: Σ_i |S_i| / Σ_i C_i with
S and C the merge state's sums and coverage. All SIFT residuals agree with the sign vector,
so |S_i| is the sum of the clients' magnitudes at coordinate i. The control measures how much
of SIFT-Masks' accuracy comes from the client's mask alone rather than the merged values.
A client's mask therefore carries much of its local model and is sensitive data.
"""

from __future__ import annotations

import numpy as np

from sift_fl.codec import EncodedResidual
from sift_fl.layout import ParameterLayout
from sift_fl.merge import MergeState
from sift_fl.sign import SignVector


def tensor_scales(state: MergeState) -> dict[str, float]:
    """Return s_t = Σ|S| / ΣC per tensor, the mean merged magnitude; 0.0 for a tensor no mask covers."""
    scales = {}
    for spec in state.layout.tensors:
        covered = int(state.coverage[spec.name].sum(dtype=np.int64))
        magnitude_units = float(np.abs(state.sums[spec.name]).sum(dtype=np.float64))
        scales[spec.name] = float(np.ldexp(magnitude_units, -state.number_format.fraction_bits) / max(covered, 1))
    return scales


def mask_only_residual(
    masks: dict[str, np.ndarray] | EncodedResidual,
    layout: ParameterLayout,
    sign_vector: SignVector,
    scales: dict[str, float],
) -> dict[str, np.ndarray]:
    """Return the dense residual m ⊙ v ⊙ s_t per tensor (float32, layout shapes).

    `masks` is either flat bool masks per tensor or an encoded residual whose masks are used.
    """
    residual = {}
    for spec in layout.tensors:
        if isinstance(masks, EncodedResidual):
            mask = masks.unpacked_mask(spec.name, spec.numel)
        else:
            mask = np.asarray(masks[spec.name], dtype=bool).reshape(-1)
        signs = sign_vector.signs(spec.name).astype(np.float32)
        flat = np.where(mask, signs * np.float32(scales[spec.name]), np.float32(0))
        residual[spec.name] = flat.reshape(spec.shape)
    return residual
