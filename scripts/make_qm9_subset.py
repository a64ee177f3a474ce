"""Write the QM9 subset shipped in data/qm9/ (tests, smoke runs) from qm9pack's CSV files.

    pip install 'gaq_calc[qm9]'          # qm9pack 1.0.3 (MIT)
    python scripts/make_qm9_subset.py    # -> data/qm9/qm9_subset.extxyz

300 molecules drawn with a fixed seed: 280 from all 130,831, then 20 more among those containing
fluorine (rare in QM9: ~2%), so all five elements occur. Each frame keeps QM9's raw values in its info,
unconverted: `qm9_index` (gdb index, 1-based), `U0_hartree` (InternalEnergy_0K_au) and `mu_debye`
(Dipole_debye); gaq_calc.data.qm9 converts U0 to eV when it reads the file. Positions are XYZ_Ang (Å).
About a tenth of the molecules have index % 10 == 0 and fall in the fixed test split.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write

from gaq_calc.data.qm9 import _parse_elements, _parse_xyz, qm9pack_csv_files

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default=str(REPO / "data" / "qm9" / "qm9_subset.extxyz"))
    parser.add_argument("--n-random", type=int, default=280)
    parser.add_argument("--n-fluorine", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    csv.field_size_limit(1 << 24)
    rows = []
    for path in qm9pack_csv_files():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append(
                    {k: row[k] for k in ("Index", "Elements", "XYZ_Ang", "InternalEnergy_0K_au", "Dipole_debye")}
                )
    rng = np.random.default_rng(args.seed)
    chosen = set(rng.choice(len(rows), size=args.n_random, replace=False).tolist())
    fluorine = [k for k, r in enumerate(rows) if 9 in _parse_elements(r["Elements"]) and k not in chosen]
    chosen |= set(rng.choice(fluorine, size=args.n_fluorine, replace=False).tolist())
    images = []
    for k in sorted(chosen, key=lambda k: int(rows[k]["Index"])):
        r = rows[k]
        atoms = Atoms(numbers=_parse_elements(r["Elements"]), positions=_parse_xyz(r["XYZ_Ang"]))
        atoms.info["qm9_index"] = int(r["Index"])
        atoms.info["U0_hartree"] = float(r["InternalEnergy_0K_au"])
        atoms.info["mu_debye"] = float(r["Dipole_debye"])
        images.append(atoms)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write(args.output, images, format="extxyz")
    n_test = sum(img.info["qm9_index"] % 10 == 0 for img in images)
    print(f"wrote {len(images)} molecules ({n_test} in the test split) of {len(rows)} to {args.output}")


if __name__ == "__main__":
    main()
