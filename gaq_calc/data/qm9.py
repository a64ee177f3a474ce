"""QM9: U0 of 130,831 small organic molecules (H, C, N, O, F; up to 9 heavy atoms), energy-only data.

Source: R. Ramakrishnan, P. O. Dral, M. Rupp and O. A. von Lilienfeld, "Quantum chemistry structures and
properties of 134 kilo molecules", Sci. Data 1, 140022 (2014). B3LYP/6-31G(2df,p) geometries and
properties. The full data come from the `qm9pack` package (MIT; `pip install gaq_calc[qm9]`), whose CSV
files hold the 130,831 molecules that passed QM9's consistency check, with the gdb index, elements,
coordinates (Å) and U0 (hartree). A small subset ships in data/qm9/ (scripts/make_qm9_subset.py).

Sources understood by `read_qm9` (and so by `read_frames`, `gaq-train --train-data` and `gaq-eval --data`):
  "qm9"          the full data set from qm9pack's CSV files
  "qm9_subset"   the subset shipped in data/qm9/qm9_subset.extxyz (tests, smoke runs)
  "qm9:FILE"     a CSV in qm9pack's layout, or an ASE-readable file (extxyz) whose frames carry
                 `qm9_index` in their info and either `U0_hartree` in their info or an energy in eV

Units are converted once, here: U0 hartree -> eV (ase.units.Hartree). Positions stay in Å. The dipole
moment magnitude stays in debye (`Frames.properties["mu_debye"]`, NaN where a source lacks it).

The split is fixed by the QM9 index (the gdb index, 1-based as in QM9):
  test  = every molecule whose index is divisible by 10 (13,087 of 130,831), never used for training
          or model selection;
  train = every other molecule; the trainer carves its validation set out of these (seeded,
          `train_val_split`), exactly as `qm9_split` below does.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np

from gaq_calc.data.frames import Frames, train_val_split
from gaq_calc.units import hartree_to_ev

#: Elements of QM9 (atomic numbers of H, C, N, O, F).
QM9_SPECIES = [1, 6, 7, 8, 9]
#: Test molecules: QM9 index divisible by this.
TEST_EVERY = 10
#: The shipped subset (tests, smoke runs).
SUBSET_FILE = Path(__file__).resolve().parents[2] / "data" / "qm9" / "qm9_subset.extxyz"
#: Splits `read_qm9` understands; "train" holds train and validation molecules (the trainer carves validation).
SPLITS = ("all", "train", "test")
_CSV_NAMES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


def is_qm9_source(source) -> bool:
    s = str(source)
    return s in ("qm9", "qm9_subset") or s.startswith("qm9:")


def is_test_index(ids) -> np.ndarray:
    """True for held-out test molecules: QM9 index divisible by 10."""
    return np.asarray(ids, dtype=np.int64) % TEST_EVERY == 0


def qm9_split(ids, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) positions into `ids` (QM9 indices). Test is fixed by the index rule; validation
    is carved from the rest with `train_val_split(n_rest, n_val, seed)`, as the trainer does."""
    ids = np.asarray(ids, dtype=np.int64)
    test = np.flatnonzero(is_test_index(ids))
    rest = np.flatnonzero(~is_test_index(ids))
    train, val = train_val_split(len(rest), n_val, seed)
    return rest[train], rest[val], test


def qm9pack_csv_files() -> list[Path]:
    """The CSV files installed by the qm9pack package (located without importing it)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the full QM9 data set needs the qm9pack package: pip install 'gaq_calc[qm9]' "
            "(or pip install qm9pack); the shipped subset is 'qm9_subset'"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = [folder / name for name in _CSV_NAMES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"qm9pack is installed but lacks its data files {missing}")
    return files


def _parse_elements(text: str) -> np.ndarray:
    from ase.data import atomic_numbers

    symbols = [s.strip().strip("'\"") for s in text.strip().strip("[]").split(",")]
    return np.array([atomic_numbers[s] for s in symbols], dtype=np.int64)


def _parse_xyz(text: str) -> np.ndarray:
    values = text.replace("[", " ").replace("]", " ").split(",")
    return np.array(values, dtype=np.float64).reshape(-1, 3)


def read_qm9_csv(paths) -> Frames:
    """Frames (U0 in eV, no forces, ids = QM9 index) from CSV files in qm9pack's layout, in file order."""
    csv.field_size_limit(1 << 24)
    ids, numbers, positions, u0, mu = [], [], [], [], []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            need = {"Index", "Elements", "XYZ_Ang", "InternalEnergy_0K_au"}
            if not need <= set(reader.fieldnames or ()):
                raise ValueError(f"{path}: not a QM9 CSV in qm9pack's layout (needs columns {sorted(need)})")
            for row in reader:
                z = _parse_elements(row["Elements"])
                xyz = _parse_xyz(row["XYZ_Ang"])
                if len(z) != len(xyz):
                    raise ValueError(f"{path}: molecule {row['Index']} has {len(z)} elements and {len(xyz)} positions")
                ids.append(int(row["Index"]))
                numbers.append(z)
                positions.append(xyz)
                u0.append(float(row["InternalEnergy_0K_au"]))
                mu.append(float(row.get("Dipole_debye") or "nan"))
    return Frames(
        numbers,
        positions,
        hartree_to_ev(np.asarray(u0, dtype=np.float64)),
        None,
        ids=np.asarray(ids, dtype=np.int64),
        properties={"mu_debye": np.asarray(mu, dtype=np.float64)},
    )


def read_qm9_ase(path: str | Path) -> Frames:
    """Frames from an ASE-readable file whose frames carry `qm9_index` and `U0_hartree` (or an energy in eV)."""
    from ase.io import read

    images = read(str(path), index=":")
    ids, numbers, positions, energies, mu = [], [], [], [], []
    for k, atoms in enumerate(images):
        if "qm9_index" not in atoms.info:
            raise ValueError(f"{path}: frame {k} has no qm9_index in its info")
        if "U0_hartree" in atoms.info:
            energy = hartree_to_ev(float(atoms.info["U0_hartree"]))
        else:
            try:
                energy = atoms.get_potential_energy()
            except Exception as err:  # ASE raises several types for a missing label
                raise ValueError(f"{path}: frame {k} has neither U0_hartree nor an energy ({err})") from err
        ids.append(int(atoms.info["qm9_index"]))
        numbers.append(atoms.numbers.astype(np.int64))
        positions.append(atoms.positions.astype(np.float64))
        energies.append(float(energy))
        mu.append(float(atoms.info.get("mu_debye", np.nan)))
    return Frames(
        numbers,
        positions,
        np.asarray(energies, dtype=np.float64),
        None,
        ids=np.asarray(ids, dtype=np.int64),
        properties={"mu_debye": np.asarray(mu, dtype=np.float64)},
    )


def read_qm9(source="qm9", split: str = "all") -> Frames:
    """QM9 frames of one split ("all", "train" = train + validation molecules, "test"); see the module doc."""
    if split not in SPLITS:
        raise ValueError(f"QM9 split must be one of {SPLITS} (validation is carved from 'train'), not {split!r}")
    source = str(source)
    if source == "qm9":
        frames = read_qm9_csv(qm9pack_csv_files())
    elif source == "qm9_subset":
        frames = read_qm9_ase(SUBSET_FILE)
    elif source.startswith("qm9:"):
        path = Path(source[4:])
        if not path.is_file():
            raise FileNotFoundError(f"QM9 data file not found: {path}")
        frames = read_qm9_csv(path) if path.suffix == ".csv" else read_qm9_ase(path)
    else:
        raise ValueError(f"not a QM9 source: {source!r} (use 'qm9', 'qm9_subset' or 'qm9:FILE')")
    unknown = sorted(set(frames.species) - set(QM9_SPECIES))
    if unknown:
        raise ValueError(f"{source}: elements {unknown} are not QM9's (H, C, N, O, F)")
    if len(np.unique(frames.ids)) != len(frames):
        raise ValueError(f"{source}: repeated QM9 indices")
    if split == "all":
        return frames
    test = is_test_index(frames.ids)
    return frames.subset(np.flatnonzero(test if split == "test" else ~test))
