"""A thin ASE calculator: atoms -> neighbour list (matscipy) -> model -> energy (eV), forces (eV/Å)."""
from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from gaq_calc.data.graphs import GraphBatch, centred, neighbour_graph, species_index, wrap_positions
from gaq_calc.loading import DTYPES, KERNELS, load_energy_forces
from gaq_calc.models_dir import resolve_model
from gaq_calc.quant import MODES

ARGUMENTS = ("model", "device", "dtype", "min_distance", "jit", "mode", "kernel")
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
    Other keyword arguments: ASE's label, directory and atoms; anything else is a TypeError.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model="azobenzene_fp32", device="cpu", dtype="float32", min_distance=0.1, jit=True,
                 mode="conservative", kernel="auto", **kwargs):
        unknown = [k for k in kwargs if k not in ASE_ARGUMENTS]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], ARGUMENTS + ASE_ARGUMENTS, n=1)
            raise TypeError(f"GAQCalculator got an unexpected keyword argument {unknown[0]!r}"
                            + (f" (did you mean {close[0]!r}?)" if close else "")
                            + f"; it takes {', '.join(ARGUMENTS)} and ASE's {', '.join(ASE_ARGUMENTS)}")
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
        species = species_index(atoms.numbers, self.species)
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
        receivers, senders, shifts = neighbour_graph(positions, self.cutoff, cell, pbc)
        if len(receivers):
            dist = np.linalg.norm(positions[senders] - positions[receivers] + shifts, axis=1)
            k = int(np.argmin(dist))
            if dist[k] < self.min_distance:
                raise ValueError(
                    f"atoms {receivers[k]} and {senders[k]} overlap ({dist[k]:.3g} Å apart, "
                    f"below min_distance={self.min_distance} Å)"
                )
        n = len(atoms)
        dev, dt = self.device, self.dtype
        return GraphBatch(
            species=torch.from_numpy(species).to(dev),
            positions=torch.from_numpy(positions).to(dev, dt),
            receivers=torch.from_numpy(receivers).to(dev),
            senders=torch.from_numpy(senders).to(dev),
            shifts=torch.from_numpy(shifts).to(dev, dt),
            batch=torch.zeros(n, dtype=torch.long, device=dev),
            n_graphs=1,
            n_atoms_per_graph=torch.tensor([n], device=dev),
        )

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
        super().calculate(atoms, properties, system_changes)
        if len(self.atoms) == 0:
            self.results = {"energy": 0.0, "free_energy": 0.0, "forces": np.zeros((0, 3))}
            return
        # forces need autograd even under a caller's no_grad/inference_mode; both are restored on exit
        with torch.inference_mode(False), torch.enable_grad():
            g = self._graph(self.atoms)
            energy, forces = self.energy_forces(g.species, g.positions, g.receivers, g.senders, g.shifts, g.batch, 1)
        energy = float(energy.detach().cpu()[0])
        forces = forces.detach().cpu().double().numpy()
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
