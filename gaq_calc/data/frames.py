"""Labelled frames in ASE units, read from rMD17 npz files or any ASE-readable file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from gaq_calc.units import kcal_mol_to_ev

#: Folder of the rMD17 splits shipped inside the repository.
SHIPPED_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "rmd17"


@dataclass
class Frames:
    """A list of labelled structures; energies in eV, forces in eV/Å, positions in Å (float64).

    Energy-only data (QM9) has `forces=None`: no force labels at all, never NaN placeholders. The
    trainer then drops the force loss and the metrics skip the force errors. `ids` optionally names
    each frame in its source data set (QM9: the 1-based gdb index), and follows subsets.
    """

    numbers: list[np.ndarray]  # each [n_atoms] int64
    positions: list[np.ndarray]  # each [n_atoms, 3]
    energies: np.ndarray  # [n_frames]
    forces: Optional[list[np.ndarray]]  # each [n_atoms, 3]; None: energy-only data
    ids: Optional[np.ndarray] = None  # [n_frames] int64, e.g. QM9 gdb indices
    properties: Optional[dict] = None  # other per-frame labels, name -> [n_frames] (QM9: "mu_debye")

    def __len__(self) -> int:
        return len(self.energies)

    @property
    def has_forces(self) -> bool:
        return self.forces is not None

    def subset(self, index) -> Frames:
        index = np.asarray(index, dtype=np.int64)
        return Frames(
            numbers=[self.numbers[i] for i in index],
            positions=[self.positions[i] for i in index],
            energies=self.energies[index],
            forces=None if self.forces is None else [self.forces[i] for i in index],
            ids=None if self.ids is None else self.ids[index],
            properties=None if self.properties is None else {k: v[index] for k, v in self.properties.items()},
        )

    @property
    def species(self) -> list[int]:
        """Sorted atomic numbers present in these frames."""
        return sorted({int(z) for numbers in self.numbers for z in np.unique(numbers)})

    @property
    def n_atoms_total(self) -> int:
        return int(sum(len(n) for n in self.numbers))


def check_finite(path, positions, energies, forces) -> None:
    """One-line ValueError naming the file and the first frame with a NaN or infinite label or position:
    a single one makes the training loss NaN, which otherwise surfaces epochs later as a message about
    the learning rate."""
    for what, values in (
        ("energy", energies),
        ("forces", forces if forces is not None else []),
        ("positions", positions),
    ):
        for k, frame in enumerate(values):
            if not np.isfinite(frame).all():
                raise ValueError(
                    f"{path}: frame {k} has a non-finite {what} label (NaN or inf); fix or drop that frame"
                )


def read_rmd17(path: str | Path) -> Frames:
    """Read an rMD17 npz split; converts kcal/mol(/Å) to eV(/Å). The noisy `old_*` labels are ignored."""
    with np.load(path) as data:
        missing = {"nuclear_charges", "coords", "energies", "forces"} - set(data.files)
        if missing:
            raise ValueError(f"{path}: not an rMD17 file, missing keys {sorted(missing)}")
        numbers = data["nuclear_charges"].astype(np.int64)
        coords = data["coords"].astype(np.float64)
        energies = kcal_mol_to_ev(data["energies"].astype(np.float64))
        forces = kcal_mol_to_ev(data["forces"].astype(np.float64))
    check_finite(path, coords, energies, forces)
    return Frames(
        numbers=[numbers] * len(energies),
        positions=list(coords),
        energies=energies,
        forces=list(forces),
    )


def _has_forces(atoms) -> bool:
    calc = atoms.calc
    return calc is not None and "forces" in getattr(calc, "results", {})


def read_ase(path: str | Path, index: str = ":") -> Frames:
    """Read any ASE-readable file whose frames carry energy and forces (e.g. extxyz).

    A file whose frames all carry energies and none carries forces is energy-only data
    (`forces=None`); a file that mixes the two is refused.
    """
    from ase.io import read

    images = read(str(path), index=index)
    if not isinstance(images, list):
        images = [images]
    energy_only = len(images) > 0 and not any(_has_forces(atoms) for atoms in images)
    numbers, positions, energies, forces = [], [], [], []
    for k, atoms in enumerate(images):
        try:
            energy = atoms.get_potential_energy()
            frame_forces = None if energy_only else atoms.get_forces()
        except Exception as err:  # ASE raises several types for missing labels
            raise ValueError(f"{path}: frame {k} has no energy/forces labels ({err})") from err
        if atoms.pbc.any():
            raise ValueError(f"{path}: frame {k} is periodic; training on periodic structures is not supported")
        numbers.append(atoms.numbers.astype(np.int64))
        positions.append(atoms.positions.astype(np.float64))
        energies.append(float(energy))
        if not energy_only:
            forces.append(np.asarray(frame_forces, dtype=np.float64))
    check_finite(path, positions, energies, [] if energy_only else forces)
    return Frames(numbers, positions, np.asarray(energies, dtype=np.float64), None if energy_only else forces)


def shipped_split(molecule: str, split: str) -> Path:
    """Path of a shipped rMD17 split-01 file, e.g. ('azobenzene', 'train')."""
    path = SHIPPED_DATA_DIR / f"rmd17_{molecule}_{split}_01.npz"
    if not path.exists():
        shipped = sorted(p.name for p in SHIPPED_DATA_DIR.glob("*.npz"))
        raise FileNotFoundError(f"no shipped split {path.name}; shipped: {shipped}")
    return path


def read_frames(source: str | Path, split: str = "train") -> Frames:
    """Frames from a file path (npz = rMD17, anything else through ase.io) or a shipped molecule name.

    QM9 sources ("qm9", "qm9_subset", "qm9:FILE"; see gaq_calc.data.qm9) apply QM9's fixed split.
    """
    from gaq_calc.data.qm9 import is_qm9_source, read_qm9

    if is_qm9_source(source):
        return read_qm9(source, split)
    path = Path(source)
    if not path.exists() and path.suffix == "" and "/" not in str(source):
        path = shipped_split(str(source), split)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {source}")
    if path.suffix == ".npz":
        return read_rmd17(path)
    return read_ase(path)


def train_val_split(n_frames: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation subset out of the training frames (the test file is never touched)."""
    if not 0 < n_val < n_frames:
        raise ValueError(f"n_val={n_val} must lie in (0, {n_frames})")
    perm = np.random.default_rng(seed).permutation(n_frames)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
