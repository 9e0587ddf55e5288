"""Unlearning one of N clients against a from-scratch merge and against TALL-mask recomputation."""

from __future__ import annotations

import functools
import gc
import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from benchmarks.common import BenchConfig, Figure, median, summary, time_call
from benchmarks.workload import ResidualFiles, read_residual_file
from sift_fl.baselines.tall_masks import compute_tall_masks
from sift_fl.codec import EncodedResidual
from sift_fl.merge import MergeState

logger = logging.getLogger(__name__)

SCRATCH_TARGET = 1 / 250
TALL_TARGET = 1 / 500
TALL_LAMBDA = 0.4


def merge_from_files(files: ResidualFiles, client_ids: list[str]) -> MergeState:
    """Merge the clients' stored residuals into a fresh state, one file at a time, in sorted order."""
    state = MergeState(files.layout, files.sign_vector)
    for client_id in sorted(client_ids):
        state.add(client_id, files.load(client_id))
    return state


def measure_unlearning(files: ResidualFiles, config: BenchConfig) -> list[Figure]:
    """Return the figures for unlearning one client: against a from-scratch merge and against TALL.

    Both SIFT-Masks timings include reading the residuals from their files and computing
    the new mean τ̄. Each repeat merges the retain set from scratch (timed), adds the
    withdrawn client back (untimed), then removes it again several times (timed, re-adding
    untimed in between). The last removal must leave the digest of the from-scratch state.
    """
    client_ids = files.client_ids
    withdrawn = client_ids[len(client_ids) // 2]
    retain = [c for c in client_ids if c != withdrawn]
    scratch_times: list[float] = []
    remove_times: list[float] = []
    digests_match = True
    state: MergeState | None = None

    for repeat in range(config.unlearn_repeats):
        logger.info("unlearning: repeat %d, from-scratch merge of %d clients", repeat, len(retain))
        state = None  # frees the previous repeat's sums before the next merge allocates its own
        gc.collect()
        start = time.perf_counter()
        state = merge_from_files(files, retain)
        state.mean()
        scratch_times.append(time.perf_counter() - start)
        scratch_digest = state.digest()

        for _ in range(config.removes_per_repeat):
            state.add(withdrawn, files.load(withdrawn))
            remove_times.append(time_call(functools.partial(_unlearn, state, files, withdrawn)))
        digests_match = digests_match and state.digest() == scratch_digest

    tall = measure_tall(files, retain, config)
    unlearn = median(remove_times)
    measured_scratch = {
        "num_clients": len(client_ids),
        "num_parameters": files.layout.num_parameters,
        "density": files.density,
        "stored_files": len(files.paths),
        "unlearn": summary(remove_times),
        "from_scratch_merge": summary(scratch_times),
        "unlearned_state_equals_scratch": digests_match,
    }
    return [
        Figure.compare(
            "unlearn_vs_scratch",
            f"unlearn 1 of {len(client_ids)}: read its residual, MergeState.remove, mean()",
            f"from-scratch merge of the {len(retain)} others, streamed from files, then mean()",
            unlearn / median(scratch_times),
            SCRATCH_TARGET,
            "<=",
            measured=measured_scratch,
        ),
        Figure.compare(
            "unlearn_vs_tall",
            f"unlearn 1 of {len(client_ids)}: read its residual, MergeState.remove, mean()",
            f"TALL masks recomputed for the {len(retain)} others (compute_tall_masks, lambda {TALL_LAMBDA})",
            unlearn / tall["total"]["median_s"],
            TALL_TARGET,
            "<=",
            measured={"unlearn": summary(remove_times), "tall": tall},
            notes=(
                "TALL runs block by block over the coordinates (all clients per block) because 499 "
                "dense residuals do not fit in memory. Its residuals are decoded from the files' "
                "contents already in memory, which favours TALL. One lambda per client, no grid search."
            ),
        ),
    ]


def _unlearn(state: MergeState, files: ResidualFiles, client_id: str) -> None:
    state.remove(client_id, files.load(client_id))
    state.mean()


def measure_tall(files: ResidualFiles, retain: list[str], config: BenchConfig) -> dict[str, object]:
    """Time TALL-mask recomputation for the retain set over all coordinates, block by block.

    Per block, every retained client's residual is decoded to dense float32 and
    `compute_tall_masks` runs on that block. The reported time is the sum over blocks.
    """
    stored = [read_residual_file(path, files.layout) for path in files.paths]
    signs = {spec.name: files.sign_vector.signs(spec.name).astype(np.float32) for spec in files.layout.tensors}
    blocks = _blocks(files, stored, config.tall_block)
    lambdas = [TALL_LAMBDA] * len(retain)
    stored_index = [files.paths.index(files.path_of(client_id)) for client_id in retain]

    totals, decode_totals = [], []
    for repeat in range(config.tall_repeats):
        total = decode = 0.0
        for block in tqdm(blocks, desc=f"benchmarks: TALL repeat {repeat}", unit="block"):
            start = time.perf_counter()
            residuals = [{piece.key: _decode(stored[k], piece, k, signs) for piece in block} for k in stored_index]
            decoded = time.perf_counter()
            compute_tall_masks(residuals, lambdas)
            total += time.perf_counter() - start
            decode += decoded - start
            del residuals
        totals.append(total)
        decode_totals.append(decode)
    return {
        "total": summary(totals),
        "decode": summary(decode_totals),
        "blocks": len(blocks),
        "block_size": config.tall_block,
    }


@dataclass
class _Piece:
    """Coordinates start..stop of one tensor and, per stored residual, the index of its first magnitude."""

    name: str
    start: int
    stop: int
    offsets: list[int]

    @property
    def key(self) -> str:
        return f"{self.name}[{self.start}:{self.stop}]"


def _blocks(files: ResidualFiles, stored: list[EncodedResidual], block_size: int) -> list[list[_Piece]]:
    """Split the coordinates into blocks of at most `block_size`, as lists of tensor pieces."""
    blocks: list[list[_Piece]] = []
    current: list[_Piece] = []
    filled = 0
    for spec in files.layout.tensors:
        set_bits = [np.cumsum(np.bitwise_count(r.tensors[spec.name].mask), dtype=np.int64) for r in stored]
        for start in range(0, spec.numel, block_size):
            stop = min(start + block_size, spec.numel)
            if current and filled + stop - start > block_size:
                blocks.append(current)
                current, filled = [], 0
            offsets = [int(counts[start // 8 - 1]) if start else 0 for counts in set_bits]
            current.append(_Piece(spec.name, start, stop, offsets))
            filled += stop - start
    if current:
        blocks.append(current)
    return blocks


def _decode(residual: EncodedResidual, piece: _Piece, stored_index: int, signs: dict[str, np.ndarray]) -> np.ndarray:
    """Return the dense float32 residual of one tensor piece."""
    tensor = residual.tensors[piece.name]
    size = piece.stop - piece.start
    bits = np.unpackbits(tensor.mask[piece.start // 8 : (piece.stop + 7) // 8], count=size).view(bool)
    index = np.flatnonzero(bits)
    offset = piece.offsets[stored_index]
    values = np.zeros(size, dtype=np.float32)
    values[index] = tensor.magnitude[offset : offset + index.size]
    np.multiply(values, signs[piece.name][piece.start : piece.stop], out=values)
    return values
