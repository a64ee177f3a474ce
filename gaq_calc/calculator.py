"""A thin ASE calculator: atoms -> neighbour list (matscipy) -> model -> energy (eV), forces (eV/Å)."""

from __future__ import annotations

import os

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from gaq_calc.data.graphs import (
    BRUTE_FORCE_MAX_ATOMS,
    GraphBatch,
    centred,
    neighbour_graph,
    species_index,
    wrap_positions,
)
from gaq_calc.loading import DTYPES, KERNELS, load_energy_forces
from gaq_calc.models_dir import resolve_model
from gaq_calc.quant import MODES

ARGUMENTS = ("model", "device", "dtype", "min_distance", "jit", "mode", "kernel", "skin")
ASE_ARGUMENTS = ("label", "directory", "atoms")  # ase.calculators.calculator.Calculator's, passed on


class GAQCalculator(Calculator):
    """ASE calculator over a gaq_calc model.

    model: a deployable artifact (`gaq-export`, e.g. "azobenzene_w4a8.pt"), a model checkpoint file or
    folder, a shipped name such as "azobenzene_fp32" (names resolve in models/), or a network in memory
    (a GAQPotential, or a prepared/converted quantized one; the calculator works on a copy). Every kind
    loads through gaq_calc.loading.load_energy_forces.
    device: torch device ("cpu", "cuda"); dtype: "float32" or "float64" for the network (the reference
    energies and the total energy are always accumulated in float64). Artifacts are float32.
    min_distance: atoms closer than this (Å) are rejected as overlapping.
    jit: run an FP32 checkpoint through TorchScript (same numbers, less overhead per call) on the
    reference kernel; quantized checkpoints run eagerly; for artifacts, see kernel.
    mode (quantized models): "conservative" (default) keeps the quantized weights but does not round
    activations, so forces are exact gradients of the reported energy and NVE conserves energy;
    "quantized" rounds activations to 8 bits as in training (the model card's numbers), and its forces
    are the straight-through gradient of an energy that jumps where rounding decisions flip, not its
    exact derivative.
    mode="quantized" on an FP32 model is refused (ValueError): it has no quantized mode.
    kernel: "auto" (default) runs the fused C++ CPU kernel (gaq_calc.kernels: one call, hand-written
    backward; built on first use) wherever it applies: on CPU, for FP32 models, quantized models in
    conservative mode, and artifacts in quantized mode (integer GEMMs on int8 activation codes; not
    MDDQ); the reference path elsewhere. "fused" requires it; "reference" always runs the
    TorchScript/eager network with autograd forces. The chosen path is in self.kernel.
    An artifact is read as data (its tensors and metadata, integrity-checked) and rebuilt in eager
    PyTorch; only kernel="reference" runs the file's own TorchScript, which is a program: use it only
    for artifacts you trust like code.
    skin (Å, default 0.5; 0 turns it off): a structure without periodic boundaries keeps a neighbour list
    of pairs within cutoff + skin, built when needed, and reuses it until an atom has moved more than
    skin / 2 since; each call keeps the pairs within the cutoff, in the order a fresh list has, so
    energies and forces are bit for bit those of a list rebuilt every call. Periodic structures get a
    fresh list every call.
    Other keyword arguments: ASE's label, directory and atoms; anything else is a TypeError.
    """

    implemented_properties = ["energy", "free_energy", "forces"]  # noqa: RUF012 (ASE's attribute)

    def __init__(
        self,
        model="azobenzene_fp32",
        device="cpu",
        dtype="float32",
        min_distance=0.1,
        jit=True,
        mode="conservative",
        kernel="auto",
        skin=0.5,
        **kwargs,
    ):
        unknown = [k for k in kwargs if k not in ASE_ARGUMENTS]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], ARGUMENTS + ASE_ARGUMENTS, n=1)
            raise TypeError(
                f"GAQCalculator got an unexpected keyword argument {unknown[0]!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; it takes {', '.join(ARGUMENTS)} and ASE's {', '.join(ASE_ARGUMENTS)}"
            )
        super().__init__(**kwargs)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
        if not min_distance > 0:
            raise ValueError(f"min_distance must be > 0 Å, not {min_distance}")
        self.min_distance = float(min_distance)
        if not skin >= 0:
            raise ValueError(f"skin must be >= 0 Å, not {skin}")
        self.skin = float(skin)
        self._list = None  # the neighbour list kept across calls (non-periodic, skin > 0)
        self._fixed = None  # (numbers, species tensor, batch tensor) of the last structure
        self.model_path = None if isinstance(model, torch.nn.Module) else resolve_model(model)
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.mode = mode
        loaded = load_energy_forces(model if self.model_path is None else self.model_path, self.dtype, self.device,
                                    mode, kernel, jit)  # fmt: skip
        self.model = loaded.potential  # the eager network (for an artifact: rebuilt from its tensors)
        self.energy_forces = loaded.energy_forces
        self.kernel = loaded.kernel
        self.metadata = loaded.metadata
        self.cutoff = loaded.cutoff
        self.species = loaded.species
        self.quantized = loaded.quantized

    def _graph(self, atoms) -> GraphBatch:
        positions = np.asarray(atoms.positions, dtype=np.float64)
        if not np.isfinite(positions).all():
            raise ValueError("atoms have NaN or infinite positions")
        numbers = atoms.numbers
        dev, dt = self.device, self.dtype
        fixed = self._fixed
        if fixed is None or not np.array_equal(fixed[0], numbers):  # species and batch: once per structure
            species = species_index(numbers, self.species)
            n = len(numbers)
            fixed = self._fixed = (
                np.array(numbers),
                torch.from_numpy(species).to(dev),
                torch.zeros(n, dtype=torch.long, device=dev),
                torch.tensor([n], device=dev),
            )
            self._list = None
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        if pbc.any():
            if not np.isfinite(cell).all() or abs(np.linalg.det(cell)) < 1e-6:
                raise ValueError(
                    f"periodic boundary conditions {pbc.tolist()} need a cell of non-zero volume; "
                    "set pbc=False for a molecule in vacuum"
                )
            positions = wrap_positions(positions, cell, pbc)  # short shifts wherever the atoms are
        # float64 until the graph is built: about its centre, a structure keeps its float32 digits for
        # the edge vectors however far from the origin it sits (forces do not change under a rigid shift)
        positions = centred(positions)
        if pbc.any() or self.skin == 0:
            receivers, senders, shifts = neighbour_graph(positions, self.cutoff, cell, pbc)
            if not pbc.any() and len(positions) > BRUTE_FORCE_MAX_ATOMS:  # matscipy's order: sort as all-pairs
                order = np.lexsort((senders, receivers))  # (as the skin list, so both give the same bits)
                receivers, senders, shifts = receivers[order], senders[order], shifts[order]
            dist = (
                np.linalg.norm(positions[senders] - positions[receivers] + shifts, axis=1) if len(receivers) else None
            )
            edges = (
                torch.from_numpy(receivers).to(dev),
                torch.from_numpy(senders).to(dev),
                torch.from_numpy(shifts).to(dev, dt),
            )
        else:
            receivers, senders, dist, edges = self._skin_edges(positions)
        if len(receivers):
            k = int(np.argmin(dist))
            if dist[k] < self.min_distance:
                raise ValueError(
                    f"atoms {receivers[k]} and {senders[k]} overlap ({dist[k]:.3g} Å apart, "
                    f"below min_distance={self.min_distance} Å)"
                )
        return GraphBatch(
            species=fixed[1],
            positions=torch.from_numpy(positions).to(dev, dt),
            receivers=edges[0],
            senders=edges[1],
            shifts=edges[2],
            batch=fixed[2],
            n_graphs=1,
            n_atoms_per_graph=fixed[3],
        )

    def _skin_edges(self, positions: np.ndarray):
        """(receivers, senders, distances, edge tensors) within the cutoff, from the kept list of pairs
        within cutoff + skin (rebuilt once an atom has moved more than skin / 2 since it was built).
        Kept pairs are in a fresh list's order (receiver, then sender; see neighbour_graph), and the test
        is the all-pairs one (squared distance below cutoff^2), so the graph is the one a fresh list gives."""
        kept = self._list
        if kept is not None:
            moved = positions - kept["positions"]
            if np.einsum("ij,ij->i", moved, moved).max(initial=0.0) > (0.5 * self.skin) ** 2:
                kept = None
        if kept is None:
            r, s, _ = neighbour_graph(positions, self.cutoff + self.skin)
            order = np.lexsort((s, r))  # all-pairs lists come sorted; matscipy's need it
            kept = self._list = {"positions": positions.copy(), "r": r[order], "s": s[order], "mask": None}
        r, s = kept["r"], kept["s"]
        vec = positions[r] - positions[s]
        d2 = (vec * vec).sum(-1)
        mask = d2 < self.cutoff * self.cutoff
        if kept["mask"] is None or not np.array_equal(mask, kept["mask"]):
            rc, sc = r[mask], s[mask]
            dev = self.device
            kept["mask"], kept["rs"] = mask, (rc, sc)
            kept["edges"] = (
                torch.from_numpy(rc).to(dev),
                torch.from_numpy(sc).to(dev),
                torch.zeros((len(rc), 3), dtype=self.dtype, device=dev),
            )
        rc, sc = kept["rs"]
        return rc, sc, np.sqrt(d2[mask]), kept["edges"]

    def check_state(self, atoms, tol=1e-15):
        """ASE's check_state without its allclose calls on every array (on a small molecule they cost a
        tenth of the model call, three times per MD step): exact comparison of what the model depends
        on (numbers, positions, cell, pbc), so it flags every change ASE's tolerance would, and more."""
        old = self.atoms
        if old is None:
            return list(all_changes)
        changes = []
        if not np.array_equal(old.numbers, atoms.numbers):
            changes.append("numbers")
        if not np.array_equal(old.positions, atoms.positions):
            changes.append("positions")
        if not np.array_equal(old.cell.array, atoms.cell.array):
            changes.append("cell")
        if not np.array_equal(old.pbc, atoms.pbc):
            changes.append("pbc")
        return changes

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        # ASE's Calculator.calculate copies the atoms (get_property has just done so) and stats the
        # directory on every call: copy only when the kept atoms differ, and make the directory once
        if atoms is not None and (self.atoms is None or self.check_state(atoms)):
            self.atoms = atoms.copy()
        if self.directory != "." and not os.path.isdir(self.directory):
            super().calculate(atoms, properties, system_changes)
        if len(self.atoms) == 0:
            self.results = {"energy": 0.0, "free_energy": 0.0, "forces": np.zeros((0, 3))}
            return
        if self.kernel == "fused":  # no autograd: a hand-written backward
            g = self._graph(self.atoms)
            energy, forces = self.energy_forces(g.species, g.positions, g.receivers, g.senders, g.shifts, g.batch, 1)
        else:
            # forces need autograd even under a caller's no_grad/inference_mode; both are restored on exit
            with torch.inference_mode(False), torch.enable_grad():
                g = self._graph(self.atoms)
                energy, forces = self.energy_forces(
                    g.species, g.positions, g.receivers, g.senders, g.shifts, g.batch, 1
                )
            energy, forces = energy.detach().cpu(), forces.detach().cpu()
        energy = float(energy[0])
        forces = forces.numpy().astype(np.float64)
        if not (np.isfinite(energy) and np.isfinite(forces).all()):
            raise FloatingPointError("the model returned a non-finite energy or forces for this structure")
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}

    def energies_and_forces(self, structures):
        """Energies (eV, float64 [n]) and forces (list of [n_atoms_k, 3], eV/Å) of a list of Atoms in one
        kernel call on the whole batch (replicas, beads, ...); sizes may differ. Same numbers as one call
        per structure, to float rounding. Does not touch this calculator's ASE state (atoms, results).
        See gaq_calc.batched."""
        from gaq_calc.batched import energies_and_forces

        return energies_and_forces(self, structures)
