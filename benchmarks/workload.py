"""Benchmark workload: synthetic SIFT residuals of a model's layout, stored as safetensors files.

N clients of P parameters do not fit in memory at N = 500 and P = 22.7M (about 27 GB of
encoded residuals), so a few distinct residuals are generated with different seeds and
written once, and client i reads file i mod K. Every merge streams its residuals from
those files, one at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
from tqdm.auto import tqdm

from sift_fl.codec import EncodedResidual, EncodedTensor, from_arrays
from sift_fl.layout import ParameterLayout
from sift_fl.sign import SignVector
from sift_fl.store.files import read_into_buffer, safetensors_views

logger = logging.getLogger(__name__)

# Residual magnitudes are drawn uniformly from this range: SIFT residuals after 20 Adam
# steps at learning rate 3e-4 are at most about 20 * 3e-4 = 6e-3 per coordinate.
MAGNITUDE_RANGE = (1e-5, 6e-3)
def synthetic_residual(layout: ParameterLayout, density: float, seed: int) -> EncodedResidual:
    """Return an encoded residual whose mask keeps each coordinate with probability `density`.

    Signs are implied by the sign vector, so any mask and positive magnitudes form a valid
    SIFT residual.
    """
    generator = np.random.default_rng(seed)
    tensors = {}
    for spec in layout.tensors:
        mask = generator.random(spec.numel, dtype=np.float32) < density
        magnitude = generator.uniform(*MAGNITUDE_RANGE, int(np.count_nonzero(mask))).astype(np.float32)
        tensors[spec.name] = EncodedTensor(np.packbits(mask), magnitude)
    return EncodedResidual(tensors)


def read_residual_file(path: Path, layout: ParameterLayout) -> EncodedResidual:
    """Read a residual safetensors file with a single copy of its bytes, then validate it."""
    return from_arrays(safetensors_views(read_into_buffer(path)), layout)


@dataclass
class ResidualFiles:
    """N client ids backed by K stored residual files; client i reads file i mod K."""

    layout: ParameterLayout
    sign_vector: SignVector
    density: float
    paths: list[Path]
    num_clients: int

    @classmethod
    def create(
        cls,
        directory: Path,
        layout: ParameterLayout,
        sign_vector: SignVector,
        density: float,
        num_files: int,
        num_clients: int,
    ) -> ResidualFiles:
        """Generate `num_files` synthetic residuals with seeds 0..K-1 and write them under `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for seed in tqdm(range(num_files), desc="benchmarks: residual files", unit="file"):
            residual = synthetic_residual(layout, density, seed)
            path = directory / f"residual-{seed}.safetensors"
            safetensors.numpy.save_file(residual.to_arrays(), str(path))
            paths.append(path)
        return cls(layout, sign_vector, density, paths, num_clients)

    @property
    def client_ids(self) -> list[str]:
        """Return the client ids in sorted order."""
        return [f"client-{index:04d}" for index in range(self.num_clients)]

    def path_of(self, client_id: str) -> Path:
        index = int(client_id.rsplit("-", 1)[1])
        return self.paths[index % len(self.paths)]

    def load(self, client_id: str) -> EncodedResidual:
        """Read and validate the residual of `client_id` from its file."""
        return read_residual_file(self.path_of(client_id), self.layout)

    def to_json(self) -> dict[str, object]:
        """Return what a worker process needs to rebuild this object."""
        return {
            "layout": self.layout.to_json(),
            "sign_seed": self.sign_vector.seed,
            "density": self.density,
            "paths": [str(p) for p in self.paths],
            "num_clients": self.num_clients,
        }

    @classmethod
    def from_json(cls, values: dict[str, object]) -> ResidualFiles:
        layout = ParameterLayout.from_json(str(values["layout"]))
        sign_vector = SignVector(int(values["sign_seed"]), layout)  # type: ignore[arg-type]
        paths = [Path(str(p)) for p in values["paths"]]  # type: ignore[union-attr]
        return cls(layout, sign_vector, float(values["density"]), paths, int(values["num_clients"]))  # type: ignore[arg-type]
