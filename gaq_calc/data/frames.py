"""Labelled frames in ASE units, read from rMD17 npz files or any ASE-readable file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gaq_calc.units import kcal_mol_to_ev

#: Folder of the rMD17 splits shipped inside the repository.
SHIPPED_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "rmd17"


@dataclass
class Frames:
    """A list of labelled structures; energies in eV, forces in eV/Å, positions in Å (float64)."""

    numbers: list[np.ndarray]  # each [n_atoms] int64
    positions: list[np.ndarray]  # each [n_atoms, 3]
    energies: np.ndarray  # [n_frames]
    forces: list[np.ndarray]  # each [n_atoms, 3]

    def __len__(self) -> int:
        return len(self.energies)

    def subset(self, index) -> "Frames":
        index = np.asarray(index, dtype=np.int64)
        return Frames(
            numbers=[self.numbers[i] for i in index],
            positions=[self.positions[i] for i in index],
            energies=self.energies[index],
            forces=[self.forces[i] for i in index],
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
    for what, values in (("energy", energies), ("forces", forces), ("positions", positions)):
        for k, frame in enumerate(values):
            if not np.isfinite(frame).all():
                raise ValueError(f"{path}: frame {k} has a non-finite {what} label (NaN or inf); "
                                 "fix or drop that frame")


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


def read_ase(path: str | Path, index: str = ":") -> Frames:
    """Read any ASE-readable file whose frames carry energy and forces (e.g. extxyz)."""
    from ase.io import read

    images = read(str(path), index=index)
    if not isinstance(images, list):
        images = [images]
    numbers, positions, energies, forces = [], [], [], []
    for k, atoms in enumerate(images):
        try:
            energy = atoms.get_potential_energy()
            frame_forces = atoms.get_forces()
        except Exception as err:  # ASE raises several types for missing labels
            raise ValueError(f"{path}: frame {k} has no energy/forces labels ({err})") from err
        if atoms.pbc.any():
            raise ValueError(f"{path}: frame {k} is periodic; training on periodic structures is not supported")
        numbers.append(atoms.numbers.astype(np.int64))
        positions.append(atoms.positions.astype(np.float64))
        energies.append(float(energy))
        forces.append(np.asarray(frame_forces, dtype=np.float64))
    check_finite(path, positions, energies, forces)
    return Frames(numbers, positions, np.asarray(energies, dtype=np.float64), forces)


def shipped_split(molecule: str, split: str) -> Path:
    """Path of a shipped rMD17 split-01 file, e.g. ('azobenzene', 'train')."""
    path = SHIPPED_DATA_DIR / f"rmd17_{molecule}_{split}_01.npz"
    if not path.exists():
        shipped = sorted(p.name for p in SHIPPED_DATA_DIR.glob("*.npz"))
        raise FileNotFoundError(f"no shipped split {path.name}; shipped: {shipped}")
    return path


def read_frames(source: str | Path, split: str = "train") -> Frames:
    """Frames from a file path (npz = rMD17, anything else through ase.io) or a shipped molecule name."""
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
