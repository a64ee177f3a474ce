"""Where one ASE MD step's time goes: GAQCalculator("azobenzene_w4a8.pt") in its default (conservative)
mode, default kernel, ASE VelocityVerlet at 0.5 fs, azobenzene (gaq_calc.md.load_structure), float32.

    python benchmarks/md_step_profile.py --threads 1 --steps 200 --blocks 5

Each part is timed by time.perf_counter wrappers set on this process's objects (instance attributes of
the calculator and the Atoms, the neighbour-list function as gaq_calc.calculator sees it,
the kernel's gaq::Model.energy_forces and ase's Calculator.calculate; all put back after each timed block); no
source file is changed. Parts are exclusive, and add up to the step:

    C++ kernel          gaq::Model.energy_forces (forward and hand-written backward)
    kernel wrapper      FusedEnergyForces.__call__ around it (dtype casts, argument passing)
    neighbour list      gaq_calc.data.graphs.neighbour_graph (numpy all-pairs up to 512 atoms without pbc,
                        matscipy's neighbour_list above that or with pbc)
    tensor construction the rest of GAQCalculator._graph (finite check, species index, min-distance check,
                        torch.from_numpy, GraphBatch)
    ASE calculate       ase's Calculator.calculate, which GAQCalculator.calculate calls first
                        (atoms.copy, a stat of the calculator's directory)
    calculate, rest     the rest of GAQCalculator.calculate (autograd contexts, energy and forces to
                        numpy, finite checks)
    check_state         GAQCalculator.check_state (ASE calls it on every get_forces)
    ASE get_forces      the rest of Atoms.get_forces -> Calculator.get_property (atoms.copy for the
                        cache, results copy, constraints)
    ASE integrator      the rest of the step: VelocityVerlet.step's arithmetic, get/set positions and
                        momenta, MolecularDynamics.irun's loop and observers

Timed blocks alternate with blocks run without the wrappers, to show what the wrappers cost; the table is
the sum over the instrumented blocks. --cprofile N also runs N steps under cProfile and prints the
functions with the most own time (cProfile's overhead inflates Python-heavy parts; use it for names,
the table for times). Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

PARTS = (
    ("C++ kernel", "gaq::Model.energy_forces"),
    ("kernel wrapper", "FusedEnergyForces.__call__ minus the op"),
    ("neighbour list", "neighbour_graph"),
    ("tensor construction", "GAQCalculator._graph minus neighbour_graph"),
    ("ASE calculate", "ase Calculator.calculate (the super() call: atoms.copy, directory stat)"),
    ("calculate, rest", "GAQCalculator.calculate minus ASE calculate, _graph and energy_forces"),
    ("check_state", "GAQCalculator.check_state"),
    ("ASE get_forces, rest", "Atoms.get_forces minus check_state and calculate"),
    ("ASE integrator", "step minus Atoms.get_forces"),
)


def exclusive_parts(t: dict[str, float], total: float) -> dict[str, float]:
    """Exclusive seconds per part from the inclusive totals of the wrapped functions (see PARTS)."""
    return {
        "C++ kernel": t["op"],
        "kernel wrapper": t["kernel"] - t["op"],
        "neighbour list": t["neighbours"],
        "tensor construction": t["graph"] - t["neighbours"],
        "ASE calculate": t["base_calculate"],
        "calculate, rest": t["calculate"] - t["base_calculate"] - t["graph"] - t["kernel"],
        "check_state": t["check_state"],
        "ASE get_forces, rest": t["get_forces"] - t["check_state"] - t["calculate"],
        "ASE integrator": total - t["get_forces"],
    }


class Wrappers:
    """Install / remove the timing wrappers; acc[name] = [seconds, calls]."""

    def __init__(self, calc, atoms):

        import gaq_calc.calculator as calculator_module

        self.calc, self.atoms, self.module = calc, atoms, calculator_module
        self.acc = {
            k: [0.0, 0]
            for k in ("op", "kernel", "neighbours", "graph", "calculate", "base_calculate", "check_state", "get_forces")
        }
        self._neighbour_graph = calculator_module.neighbour_graph
        self._model = calc.energy_forces.model  # the fused kernel's gaq::Model (TorchScript class)
        from ase.calculators.calculator import Calculator

        self.base, self._base_calculate = Calculator, Calculator.calculate

    def _timed(self, name, fn):
        acc = self.acc[name]
        clock = time.perf_counter

        def wrapper(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[0] += clock() - t0
                acc[1] += 1

        return wrapper

    def install(self) -> None:
        calc, atoms = self.calc, self.atoms
        atoms.get_forces = self._timed("get_forces", atoms.get_forces)
        calc.check_state = self._timed("check_state", calc.check_state)
        calc.calculate = self._timed("calculate", calc.calculate)
        calc._graph = self._timed("graph", calc._graph)
        self._energy_forces = calc.energy_forces
        calc.energy_forces = self._timed("kernel", calc.energy_forces)
        self.module.neighbour_graph = self._timed("neighbours", self._neighbour_graph)
        self._energy_forces.model = _Timed(self._timed("op", self._model.energy_forces))
        self.base.calculate = self._timed("base_calculate", self._base_calculate)  # what super().calculate finds

    def remove(self) -> None:
        for name in ("check_state", "calculate", "_graph"):
            self.calc.__dict__.pop(name, None)
        self.calc.energy_forces = self._energy_forces
        self.atoms.__dict__.pop("get_forces", None)
        self.module.neighbour_graph = self._neighbour_graph
        self._energy_forces.model = self._model
        self.base.calculate = self._base_calculate


class _Timed:
    """Stands in for the kernel's gaq::Model, whose methods cannot be replaced: a timed energy_forces."""

    def __init__(self, energy_forces):
        self.energy_forces = energy_forces


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="azobenzene_w4a8.pt")
    parser.add_argument("--mode", default="conservative", help="the calculator's default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="MD steps per block")
    parser.add_argument("--blocks", type=int, default=5, help="instrumented blocks (as many plain ones between)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="also profile N steps with cProfile")
    args = parser.parse_args(argv)

    import torch
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from gaq_calc import GAQCalculator
    from gaq_calc.md import load_structure, maxwell_boltzmann

    torch.set_num_threads(args.threads)
    atoms = load_structure("azobenzene", 0)
    calc = GAQCalculator(args.model, mode=args.mode)
    atoms.calc = calc
    maxwell_boltzmann(atoms, 300.0, np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(args.warmup)

    wrappers = Wrappers(calc, atoms)
    inst, plain = [], []
    for _ in range(args.blocks):
        t0 = time.perf_counter()
        dyn.run(args.steps)
        plain.append(time.perf_counter() - t0)
        wrappers.install()
        t0 = time.perf_counter()
        dyn.run(args.steps)
        inst.append(time.perf_counter() - t0)
        wrappers.remove()
    if calc.kernel != "fused":
        raise SystemExit(f"{args.model} runs the {calc.kernel} kernel here; this profile splits the fused one")

    steps = args.steps * args.blocks
    total = sum(inst)
    parts = exclusive_parts({k: v[0] for k, v in wrappers.acc.items()}, total)
    calls = {
        "C++ kernel": "op",
        "kernel wrapper": "kernel",
        "neighbour list": "neighbours",
        "tensor construction": "graph",
        "ASE calculate": "base_calculate",
        "calculate, rest": "calculate",
        "check_state": "check_state",
        "ASE get_forces, rest": "get_forces",
    }
    print(
        f"{args.model} {args.mode} ({calc.kernel} kernel), {len(atoms)} atoms, {args.threads} thread(s), "
        f"torch {torch.__version__}, load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{args.blocks} instrumented blocks of {args.steps} steps, alternated with as many plain ones: "
        f"{1e3 * total / steps:.3f} ms/step instrumented, {1e3 * sum(plain) / steps:.3f} ms/step plain "
        f"(median block {1e3 * np.median(inst) / args.steps:.3f} / {1e3 * np.median(plain) / args.steps:.3f})"
    )
    print()
    print("| part | what | ms / step | share | calls / step |")
    print("|---|---|---|---|---|")
    what = dict(PARTS)
    for name, _ in PARTS:
        n = wrappers.acc[calls[name]][1] / steps if name in calls else 1.0
        print(f"| {name} | {what[name]} | {1e3 * parts[name] / steps:.3f} | {100 * parts[name] / total:.1f}% | {n:g} |")
    print(f"| **step** | dyn.run / steps | {1e3 * total / steps:.3f} | 100% | 1 |")

    if args.cprofile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        dyn.run(args.cprofile)
        profiler.disable()
        print(f"\ncProfile, {args.cprofile} steps, top functions by own time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
