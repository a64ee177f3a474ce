"""Per-element reference energies, fitted by least squares in float64."""

from __future__ import annotations

import numpy as np

from gaq_calc.data.frames import Frames


def composition_matrix(frames: Frames, species: list[int]) -> np.ndarray:
    """[n_frames, n_species] counts of each element."""
    counts = np.zeros((len(frames), len(species)), dtype=np.float64)
    column = {z: k for k, z in enumerate(species)}
    for f, numbers in enumerate(frames.numbers):
        for z, n in zip(*np.unique(numbers, return_counts=True)):
            counts[f, column[int(z)]] = n
    return counts


def fit_reference_energies(frames: Frames, species: list[int]) -> np.ndarray:
    """E_ref[Z] minimising sum_frames (E - sum_i E_ref[Z_i])^2.

    With a single composition (one molecule) the system is rank-deficient; lstsq then returns the
    minimum-norm solution, which still reproduces the mean energy exactly.
    """
    counts = composition_matrix(frames, species)
    ref, *_ = np.linalg.lstsq(counts, frames.energies.astype(np.float64), rcond=None)
    return ref
