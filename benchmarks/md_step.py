"""Per-call latency (energy + forces) and ASE MD steps/s for one molecule, variants side by side.

    .venv/bin/python benchmarks/md_step.py --model azobenzene_fp32 --threads 1 2
Prints a markdown table and writes it as JSON with --json. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import time

import numpy as np
import torch
from ase import Atoms, units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

from gaq_calc import GAQCalculator
from gaq_calc.data import read_frames
from gaq_calc.io import write_text_atomic


def engine_calculator(path, mode, int_gemm: str) -> GAQCalculator:
    """GAQCalculator on the fused kernel with the integer engine `int_gemm` (kernels.FusedEnergyForces) in place
    of its default; mode None: the file's own (FP32)."""
    from gaq_calc.loading import load_energy_forces

    calc = GAQCalculator(str(path), kernel="fused", **({} if mode is None else {"mode": mode}))
    calc.energy_forces = load_energy_forces(path, mode=mode, kernel="fused", int_gemm=int_gemm).energy_forces
    return calc


def time_calls(calc: GAQCalculator, atoms: Atoms, repeats: int) -> float:
    """Median seconds of one fresh energy+forces evaluation (positions change every call)."""
    rng = np.random.default_rng(0)
    base = atoms.positions.copy()
    times = []
    for k in range(repeats + 5):
        atoms.positions = base + rng.normal(scale=1e-3, size=base.shape)
        t0 = time.perf_counter()
        calc.calculate(atoms, ["energy", "forces"], ["positions"])
        if k >= 5:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def md_steps_per_second(calc: GAQCalculator, atoms: Atoms, steps: int) -> float:
    atoms = atoms.copy()
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(5)
    t0 = time.perf_counter()
    dyn.run(steps)
    return steps / (time.perf_counter() - t0)


def keep_freed_memory() -> None:
    """glibc: keep freed blocks for reuse instead of returning them to the OS after every op (this
    process only; the same as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        raise SystemExit("mallopt is glibc-only; run without the malloc variant here")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 256 * 1024 * 1024)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="azobenzene_fp32")
    parser.add_argument("--molecule", default="azobenzene")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--md-steps", type=int, default=100)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--worker", choices=["default", "malloc"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    frames = read_frames(args.molecule, "test")
    atoms = Atoms(numbers=frames.numbers[0], positions=frames.positions[0])
    if args.worker:  # one allocator setting per process, so neither inherits the other's warm state
        if args.worker == "malloc":
            keep_freed_memory()
        rows = []
        for threads in args.threads:
            torch.set_num_threads(threads)  # a benchmark is an application: it may set threads
            variants = {
                "eager": dict(jit=False, kernel="reference"),
                "torchscript": dict(jit=True, kernel="reference"),
                "fused": dict(kernel="fused"),
            }
            for name, kwargs in variants.items():
                calc = GAQCalculator(args.model, **kwargs)
                rows.append(
                    {
                        "variant": name + (" + malloc" if args.worker == "malloc" else ""),
                        "threads": threads,
                        "atoms": len(atoms),
                        "ms_per_call": 1e3 * time_calls(calc, atoms, args.repeats),
                        "md_steps_per_s": md_steps_per_second(calc, atoms, args.md_steps),
                    }
                )
        print(json.dumps(rows))
        return
    import subprocess
    import sys

    own = [a for a in (sys.argv[1:] if argv is None else argv)]
    rows = []
    for worker in ("default", "malloc"):
        out = subprocess.run(
            [sys.executable, __file__, *own, "--worker", worker], check=True, capture_output=True, text=True
        ).stdout
        rows.extend(json.loads(out.strip().splitlines()[-1]))
    base = {r["threads"]: r["ms_per_call"] for r in rows if r["variant"] == "eager"}
    print(f"{args.model}, {len(atoms)} atoms, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("(+ malloc: glibc keeps freed memory, see keep_freed_memory; each setting in its own process)")
    print("| variant | threads | ms / call (E+F) | speed-up vs eager | ASE MD steps/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        r["speedup_vs_eager"] = base[r["threads"]] / r["ms_per_call"]
        print(
            f"| {r['variant']} | {r['threads']} | {r['ms_per_call']:.2f} | {r['speedup_vs_eager']:.2f}x | "
            f"{r['md_steps_per_s']:.0f} |"
        )
    if args.json:
        result = {
            "command": shlex.join(["python", "benchmarks/md_step.py", *own]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "atoms": len(atoms),
            "rows": rows,
        }
        write_text_atomic(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
