"""The fused kernel of a git revision against the current one, side by side in one process.

    python benchmarks/kernel_versions.py --base 36053eb --check          # bit identity, shipped artifacts
    python benchmarks/kernel_versions.py --base 36053eb --time --rounds 7  # per-call time, alternated
    python benchmarks/kernel_versions.py --base 36053eb --md --json benchmarks/results/kernel_versions.json

The base revision's fused_cpu.cpp is built under another op namespace (torch.ops.gaq_base) and called
with the parameter list its own gather_parameters (git show of that revision's kernels/fused.py) makes,
so both libraries live in one process. --check compares energies and forces bit for bit on shipped
artifacts (every model, both modes, float32 and float64, one molecule and a batch of five) and exits
non-zero on a difference. --time alternates calls of both kernels on one azobenzene (and optionally a
larger batch) and prints medians and the ratio. --md runs ASE VelocityVerlet (0.5 fs, azobenzene) with the
base revision's calculator (its gaq_calc/calculator.py on its kernel) and the current one, blocks
alternated, and prints ms per MD step for every model and mode. Not a test: it builds a second library
(~1 min).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def git_show(rev: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True, check=True).stdout


def load_base(rev: str):
    """(module of the base revision's fused.py, torch.ops.gaq_base.energy_forces)."""
    from torch.utils import cpp_extension

    from gaq_calc.kernels.fused import _ninja_on_path, build_spec

    src = git_show(rev, "gaq_calc/kernels/fused_cpu.cpp")
    src = src.replace("TORCH_LIBRARY(gaq,", "TORCH_LIBRARY(gaq_base,").replace(
        "TORCH_LIBRARY_IMPL(gaq,", "TORCH_LIBRARY_IMPL(gaq_base,"
    )
    digest = hashlib.sha256(src.encode()).hexdigest()[:12]
    folder = Path.home() / ".cache" / "gaq_kernel_versions" / digest
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fused_cpu_base.cpp").write_text(src)
    py = folder / "fused_base.py"
    py.write_text(git_show(rev, "gaq_calc/kernels/fused.py"))
    _ninja_on_path()
    _, flags = build_spec()
    cpp_extension.load(
        name=f"gaq_base_{digest}",
        sources=[str(folder / "fused_cpu_base.cpp")],
        extra_cflags=flags,
        is_python_module=False,
    )
    spec = importlib.util.spec_from_file_location("gaq_fused_base", py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, torch.ops.gaq_base.energy_forces


class BaseKernel:
    """FusedEnergyForces of the base revision, on torch.ops.gaq_base."""

    def __init__(self, module, op, potential, dtype):
        self.dtype, self.op, self.model = dtype, op, None
        if hasattr(module, "_cast_weights"):  # named, versioned layout (gaq::Model; from 085197c on)
            weights, consts = module.gather_parameters(potential)
            weights = module._cast_weights(weights, dtype, True)
            self.model = torch.classes.gaq_base.Model(module.LAYOUT_VERSION, weights, consts, dtype == torch.float64)
            return
        params, self.consts, quant = module.gather_parameters(potential)
        self.quant = module._cast_quantizers(quant, dtype, True)
        self.params = [t.to(dtype) for t in params[:-1]] + [params[-1].to(torch.float64)]

    def __call__(self, species, positions, receivers, senders, shifts, batch, n_graphs):
        if self.model is not None:
            return self.model.energy_forces(positions, species, receivers, senders, shifts, batch, int(n_graphs))
        return self.op(
            positions.to(self.dtype),
            species,
            receivers,
            senders,
            shifts.to(self.dtype),
            batch,
            int(n_graphs),
            self.params,
            self.consts,
            self.quant,
        )


def batches(species_list, cutoff, dtype, sizes=(1, 5)):
    from gaq_calc.data import GraphDataset, read_frames

    frames = read_frames("azobenzene", "test")
    out = []
    for size in sizes:
        ds = GraphDataset(frames.subset(np.arange(3, 3 + size)), species_list, cutoff)
        out.append(ds.collate(list(range(size))).to("cpu", dtype))
    return out


def kernels(module, op, model: str, mode: str, dtype):
    from gaq_calc.export import load_artifact
    from gaq_calc.kernels import FusedEnergyForces
    from gaq_calc.quant import set_mode

    ef, meta = load_artifact(REPO / "models" / f"azobenzene_{model}.pt")
    if meta.get("quantization"):
        set_mode(ef, mode)
    new = FusedEnergyForces(ef.potential, dtype)
    old = BaseKernel(module, op, ef.potential, dtype)
    return old, new, [int(z) for z in meta["species"]], float(meta["cutoff"])


def call(f, b):
    return f(b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, b.n_graphs)


def check(module, op) -> int:
    bad = 0
    for model, modes in (
        ("fp32", ["conservative"]),
        ("w8a8", ["conservative", "quantized"]),
        ("w4a8", ["conservative", "quantized"]),
    ):
        for mode in modes:
            for dtype in (torch.float32, torch.float64):
                old, new, species, cutoff = kernels(module, op, model, mode, dtype)
                for b in batches(species, cutoff, dtype):
                    e0, f0 = call(old, b)
                    e1, f1 = call(new, b)
                    same = torch.equal(e0, e1) and torch.equal(f0, f1)
                    bad += not same
                    print(
                        f"{model} {mode} {str(dtype)[6:]} {b.n_graphs} molecule(s): "
                        f"{'identical' if same else 'DIFFERENT'} (max |dE| {(e0 - e1).abs().max().item():.3g}, "
                        f"max |dF| {(f0 - f1).abs().max().item():.3g})"
                    )
    return bad


def timing(module, op, rounds: int, calls: int, sizes) -> None:
    for model, mode in (("w4a8", "conservative"), ("w4a8", "quantized"), ("fp32", "conservative")):
        old, new, species, cutoff = kernels(module, op, model, mode, torch.float32)
        for b in batches(species, cutoff, torch.float32, sizes):
            t = {"base": [], "new": []}
            for f in (old, new):
                for _ in range(3):
                    call(f, b)
            for r in range(rounds):
                for name, f in (("base", old), ("new", new)) if r % 2 == 0 else (("new", new), ("base", old)):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        call(f, b)
                    t[name].append((time.perf_counter() - t0) / calls)
            base, cur = np.median(t["base"]), np.median(t["new"])
            print(
                f"{model} {mode} {len(b.species)} atoms, {torch.get_num_threads()} thread(s): base "
                f"{1e3 * base:.3f} ms, new {1e3 * cur:.3f} ms, base/new {base / cur:.2f}x"
            )


def base_calculator(rev: str, module, op, model: str, mode: str, threads: int):
    """The base revision's GAQCalculator (its calculator.py) running the base revision's kernel."""
    src = git_show(rev, "gaq_calc/calculator.py")
    path = Path.home() / ".cache" / "gaq_kernel_versions" / f"calculator_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"gaq_calculator_{rev}", path)
    calc_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calc_module)
    calc = calc_module.GAQCalculator(model, **({} if model.endswith("fp32") else {"mode": mode}))
    from gaq_calc.export import load_artifact
    from gaq_calc.quant import set_mode

    ef, meta = load_artifact(REPO / "models" / model)
    if meta.get("quantization"):
        set_mode(ef, mode)
    calc.energy_forces = BaseKernel(module, op, ef.potential, torch.float32)
    return calc


def md(rev: str, module, op, rounds: int, steps: int) -> list:
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from gaq_calc import GAQCalculator
    from gaq_calc.md import load_structure, maxwell_boltzmann

    rows = []
    for label, model, mode in (
        ("w4a8 default", "azobenzene_w4a8.pt", "conservative"),
        ("w4a8 quantized", "azobenzene_w4a8.pt", "quantized"),
        ("fp32", "azobenzene_fp32.pt", "conservative"),
    ):
        calcs = {
            "base": base_calculator(rev, module, op, model, mode, torch.get_num_threads()),
            "new": GAQCalculator(model, **({} if model.endswith("fp32.pt") else {"mode": mode})),
        }
        start = load_structure("azobenzene", 0)
        maxwell_boltzmann(start, 300.0, np.random.default_rng(0))
        times = {k: [] for k in calcs}
        energies = {}
        for r in range(rounds + 1):
            for name in ("base", "new") if r % 2 == 0 else ("new", "base"):
                atoms = start.copy()
                atoms.calc = calcs[name]
                dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
                t0 = time.perf_counter()
                dyn.run(steps)
                if r:  # round 0 warms up
                    times[name].append((time.perf_counter() - t0) / steps)
                energies[name] = atoms.get_potential_energy()
        base, new = np.median(times["base"]), np.median(times["new"])
        rows.append(
            {
                "variant": label,
                "model": model,
                "mode": mode,
                "threads": torch.get_num_threads(),
                "base_ms_per_step": 1e3 * base,
                "new_ms_per_step": 1e3 * new,
                "speedup": base / new,
                "same_trajectory_energy": bool(energies["base"] == energies["new"]),
            }
        )
        print(
            f"| {label} | {torch.get_num_threads()} | {1e3 * base:.3f} | {1e3 * new:.3f} | {base / new:.2f}x | "
            f"{'yes' if rows[-1]['same_trajectory_energy'] else 'no'} |",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="36053eb", help="git revision of the base kernel")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--md", action="store_true", help="ms per ASE MD step, base against current")
    parser.add_argument("--md-steps", type=int, default=100)
    parser.add_argument("--json", help="write the --md rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module, op = load_base(args.base)
    from gaq_calc.kernels import load_extension

    load_extension()
    bad = check(module, op) if args.check else 0
    if args.time:
        timing(module, op, args.rounds, args.calls, args.sizes)
    if args.md:
        import json
        import os
        import platform

        print(
            f"| variant | threads | base ms / step | new ms / step | speed-up | same energy after {args.md_steps} "
            "steps |\n|---|---|---|---|---|---|"
        )
        load = os.getloadavg()
        rows = md(args.base, module, op, args.rounds, args.md_steps)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "command": "python benchmarks/kernel_versions.py " + " ".join(sys.argv[1:]),
                        "base": args.base,
                        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                        "torch": torch.__version__,
                        "load_average": {"start": load, "end": os.getloadavg()},
                        "md_steps": args.md_steps,
                        "rounds": args.rounds,
                        "rows": rows,
                    },
                    indent=1,
                )
                + "\n"
            )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
