"""Time per atom against system size: many azobenzenes in a box, gaq_calc (and so3krates-torch), one process.

    python benchmarks/scaling.py --threads 1 --json benchmarks/results/scaling.json

Structures: copies of azobenzene (gaq_calc.md.load_structure frame 0), each turned by a seeded random
rotation, centred on the points of a cubic grid --spacing Å apart (11 Å: molecules do not overlap,
neighbouring ones touch within the 5 Å cutoff). Clusters without periodic boundaries at --molecules
(default 1, 8, 63, 209: 24 to 5,016 atoms), and periodic boxes (the grid's cell, pbc on all axes) at
--periodic sizes. One call = energy + forces of GAQCalculator("azobenzene_w4a8.pt") in its default mode
(fused kernel) via calc.calculate on slightly jittered positions (a fresh neighbour list each call: the
jitter exceeds no skin, but timings include the list, whatever path it takes); median of --repeats
calls after one warm-up call. With --peer, so3krates-torch (random weights, hyperparameters mapped as in
benchmarks/peers.py, its own ASE calculator: eager PyTorch, autograd forces) is timed the same way on
the same structures up to --peer-max-atoms. Prints a markdown table; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def box_of_molecules(n_molecules: int, spacing: float, periodic: bool, seed: int = 0):
    from ase import Atoms
    from scipy.spatial.transform import Rotation

    from gaq_calc.md import load_structure

    mol = load_structure("azobenzene", 0)
    centre = mol.positions - mol.positions.mean(0)
    side = int(np.ceil(n_molecules ** (1 / 3) - 1e-9))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n_molecules]
    rot = Rotation.random(n_molecules, random_state=seed).as_matrix()
    pos = np.concatenate([centre @ rot[k].T + (grid[k] + 0.5) * spacing for k in range(n_molecules)])
    atoms = Atoms(numbers=np.tile(mol.numbers, n_molecules), positions=pos)
    if periodic:
        atoms.cell = np.eye(3) * side * spacing
        atoms.pbc = True
    return atoms


def time_calls(calc, atoms, repeats: int) -> float:
    rng = np.random.default_rng(0)
    base = atoms.positions.copy()
    times = []
    for k in range(repeats + 1):
        atoms.positions = base + rng.normal(scale=1e-3, size=base.shape)
        t0 = time.perf_counter()
        calc.calculate(atoms, ["energy", "forces"], ["positions"])
        if k:
            times.append(time.perf_counter() - t0)
    atoms.positions = base
    return float(np.median(times))


def edges_per_atom(atoms, cutoff: float) -> float:
    from gaq_calc.data.graphs import neighbour_graph

    r, _, _ = neighbour_graph(atoms.positions, cutoff, atoms.cell.array, atoms.pbc)
    return len(r) / len(atoms)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--molecules", type=int, nargs="+", default=[1, 8, 63, 209])
    parser.add_argument("--periodic", type=int, nargs="*", default=[63, 209])
    parser.add_argument("--spacing", type=float, default=11.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer", action="store_true", help="also time so3krates-torch")
    parser.add_argument("--peer-max-atoms", type=int, default=6000)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch

    from gaq_calc import GAQCalculator

    torch.set_num_threads(args.threads)  # a benchmark process, not library code
    load_start = os.getloadavg()
    calc = GAQCalculator("azobenzene_w4a8.pt")
    peer = None
    if args.peer:
        from peers import _make_peer

        config = GAQCalculator("azobenzene_fp32").model.config.to_dict()
    structures = [(n, False) for n in args.molecules] + [(n, True) for n in args.periodic]
    rows = []
    print(
        "| structure | atoms | edges / atom | gaq_calc ms / call | gaq_calc µs / atom | so3krates-torch ms / call "
        "| so3krates-torch µs / atom | so3krates-torch / gaq_calc |\n|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    for n_mol, periodic in structures:
        atoms = box_of_molecules(n_mol, args.spacing, periodic)
        n = len(atoms)
        seconds = time_calls(calc, atoms, args.repeats)
        row = {
            "molecules": n_mol,
            "periodic": periodic,
            "atoms": n,
            "edges_per_atom": edges_per_atom(atoms, calc.cutoff),
            "gaq_ms_per_call": 1e3 * seconds,
            "gaq_us_per_atom": 1e6 * seconds / n,
            "peer_ms_per_call": None,
            "peer_us_per_atom": None,
        }
        if args.peer and n <= args.peer_max_atoms:
            atoms_peer = atoms.copy()
            peer, _, _ = _make_peer(config, atoms_peer if n <= 600 else atoms_peer[:24], 0)
            peer.models[0].avg_num_neighbors = (
                row["edges_per_atom"] if hasattr(peer.models[0], "avg_num_neighbors") else None
            )
            ps = time_calls(peer, atoms_peer, max(1, min(args.repeats, 3)))
            row["peer_ms_per_call"], row["peer_us_per_atom"] = 1e3 * ps, 1e6 * ps / n
        rows.append(row)
        peer_cols = (
            f"{row['peer_ms_per_call']:.1f} | {row['peer_us_per_atom']:.1f} | "
            f"{row['peer_ms_per_call'] / row['gaq_ms_per_call']:.2f}x"
            if row["peer_ms_per_call"]
            else "- | - | -"
        )
        print(
            f"| {'periodic box' if periodic else 'cluster'} of {n_mol} | {n} | {row['edges_per_atom']:.1f} | "
            f"{row['gaq_ms_per_call']:.1f} | {row['gaq_us_per_atom']:.1f} | {peer_cols} |",
            flush=True,
        )
    if args.json:
        from importlib.metadata import version

        Path(args.json).write_text(
            json.dumps(
                {
                    "command": "python benchmarks/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "model": "azobenzene_w4a8.pt (conservative, fused kernel)",
                    "spacing_A": args.spacing,
                    "repeats": args.repeats,
                    "so3krates_torch": version("so3krates-torch") if args.peer else None,
                    "load_average": {"start": load_start, "end": os.getloadavg()},
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
