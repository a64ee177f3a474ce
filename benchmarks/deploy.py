"""Deployment benchmark: FP32, W8A8 and W4A8 artifacts side by side, one process per measurement.

    .venv/bin/python benchmarks/deploy.py --threads 1 2 --json benchmarks/results/deploy.json

For each artifact (models/azobenzene_{fp32,w8a8,w4a8}.pt) and mode (quantized: 8-bit activations;
conservative: unrounded activations), at 1 and 2 threads:
- per-call latency of energy + forces for one azobenzene molecule (median, GAQCalculator);
- ASE VelocityVerlet steps per second;
- throughput on a large batched workload (--batch molecules in one graph), molecules per second;
- peak resident memory of the process, and the artifact's file size.
Then a latency breakdown of one call by operator class, measured with torch.profiler (cf. the
paper's Table IV). Prints markdown tables; not a test, the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (model, mode, kernel); "fused" in quantized mode is the integer path as GAQCalculator runs it (int_gemm
# "auto": int8 codes with int32 sums, vpdpbusd where the CPU has AVX512-VNNI, else integer-valued floats
# through sgemm); "fused-float" forces the sgemm engine and "fused-int32" the int8 one (same bits)
VARIANTS = [
    ("fp32", "fp32", "reference"),
    ("fp32", "fp32", "fused"),
    ("w8a8", "quantized", "reference"),
    ("w8a8", "quantized", "fused"),
    ("w8a8", "conservative", "fused"),
    ("w4a8", "quantized", "reference"),
    ("w4a8", "quantized", "fused"),
    ("w4a8", "quantized", "fused-float"),
    ("w4a8", "quantized", "fused-int32"),
    ("w4a8", "conservative", "reference"),
    ("w4a8", "conservative", "fused"),
]


def worker(name: str, mode: str, kernel: str, threads: int, repeats: int, md_steps: int, batch: int) -> dict:
    import numpy as np
    import torch
    from ase import Atoms
    from md_step import engine_calculator, md_steps_per_second, time_calls  # the same timing as benchmarks/md_step.py

    from gaq_calc import GAQCalculator
    from gaq_calc.data import GraphDataset, read_frames

    torch.set_num_threads(threads)  # a benchmark process, not library code
    path = REPO / "models" / f"azobenzene_{name}.pt"
    kwargs = {} if mode == "fp32" else {"mode": mode}
    if kernel.startswith("fused-"):  # the fused kernel with one integer engine in place of the calculator's
        calc = engine_calculator(path, kwargs.get("mode"), kernel.split("-", 1)[1])
        kernel_name = kernel
    else:
        calc = GAQCalculator(str(path), kernel=kernel, **kwargs)
        kernel_name = calc.kernel
    frames = read_frames("azobenzene", "test")
    atoms = Atoms(numbers=frames.numbers[0], positions=frames.positions[0])
    seconds_per_call = time_calls(calc, atoms, repeats)
    steps_per_s = md_steps_per_second(calc, atoms, md_steps)
    # large workload: `batch` molecules in one graph through the scripted module
    ds = GraphDataset(frames.subset(np.arange(batch) % len(frames)), calc.species, calc.cutoff)
    b = ds.collate(list(range(batch))).to("cpu", torch.float32)
    f = calc.energy_forces
    with torch.enable_grad():
        f(b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, b.n_graphs)  # warm-up
        t0 = time.perf_counter()
        f(b.species, b.positions, b.receivers, b.senders, b.shifts, b.batch, b.n_graphs)
        batch_s = time.perf_counter() - t0
    return {
        "model": f"azobenzene_{name}",
        "mode": mode,
        "kernel": kernel_name,
        "threads": threads,
        "ms_per_call": 1e3 * seconds_per_call,
        "md_steps_per_s": steps_per_s,
        "batch_molecules": batch,
        "batch_atoms": len(b.species),
        "molecules_per_s": batch / batch_s,
        "file_bytes": path.stat().st_size,
        "int_gemm": getattr(calc.energy_forces, "int_gemm", None) if mode == "quantized" else None,
        "int8_simd": getattr(calc.energy_forces, "int8_simd", None) if mode == "quantized" else None,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def breakdown(name: str, mode: str, kernel: str, threads: int) -> list[dict]:
    """Self CPU time per operator class for 20 energy+forces calls, from torch.profiler."""
    import torch
    from ase import Atoms
    from torch.profiler import ProfilerActivity, profile

    from gaq_calc import GAQCalculator
    from gaq_calc.data import read_frames

    torch.set_num_threads(threads)
    calc = GAQCalculator(
        str(REPO / "models" / f"azobenzene_{name}.pt"), kernel=kernel, **({} if mode == "fp32" else {"mode": mode})
    )
    frames = read_frames("azobenzene", "test")
    atoms = Atoms(numbers=frames.numbers[0], positions=frames.positions[0])
    for _ in range(5):
        calc.calculate(atoms, ["energy", "forces"], ["positions"])
    classes = {
        "fused C++ loops (gaq::energy_forces, self)": ("gaq::energy_forces",),
        "matmul (linear layers, radial filters)": ("mm", "addmm", "bmm", "matmul", "linear", "_int_mm"),
        "activation quantization (round, clamp, div)": ("round", "clamp", "div", "argmax", "gather", "cross"),
        "gather / scatter (message passing)": ("index_select", "index_add", "scatter", "index"),
        "cat / split / stack / copies": (
            "cat",
            "split",
            "stack",
            "unbind",
            "copy_",
            "clone",
            "contiguous",
            "fill_",
            "zero_",
            "zeros",
            "empty",
        ),
    }
    totals = {k: 0.0 for k in classes} | {"elementwise and other": 0.0}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            atoms.positions = atoms.positions + 1e-4
            calc.calculate(atoms, ["energy", "forces"], ["positions"])
    for evt in prof.key_averages():
        name_ = evt.key.replace("aten::", "")
        base = name_.split("Backward")[0].lower()
        for k, keys in classes.items():
            if base in keys or name_ in keys:
                totals[k] += evt.self_cpu_time_total
                break
        else:
            totals["elementwise and other"] += evt.self_cpu_time_total
    total = sum(totals.values())
    return [{"class": k, "ms_per_call": v / 20 / 1e3, "share": v / total} for k, v in totals.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--md-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=512, help="molecules in the large workload")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", nargs=4, metavar=("NAME", "MODE", "KERNEL", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", nargs=4, metavar=("NAME", "MODE", "KERNEL", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, mode, kernel, threads = args.worker
        print(json.dumps(worker(name, mode, kernel, int(threads), args.repeats, args.md_steps, args.batch)))
        return
    if args.breakdown:
        name, mode, kernel, threads = args.breakdown
        print(json.dumps(breakdown(name, mode, kernel, int(threads))))
        return
    env = dict(
        os.environ, MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TRIM_THRESHOLD_="4294967295", MALLOC_TOP_PAD_="268435456"
    )
    base = [
        sys.executable,
        __file__,
        "--repeats",
        str(args.repeats),
        "--md-steps",
        str(args.md_steps),
        "--batch",
        str(args.batch),
    ]
    rows = []
    for threads in args.threads:
        for name, mode, kernel in VARIANTS:  # one process each: clean peak memory, no shared caches
            out = subprocess.run(
                base + ["--worker", name, mode, kernel, str(threads)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(
                f"  {name} {mode} {kernel} {threads} thread(s): {rows[-1]['ms_per_call']:.2f} ms/call", file=sys.stderr
            )
    # ratios against FP32 on the same kernel and thread count, measured in the same run
    fp = {(r["threads"], r["kernel"]): r for r in rows if r["mode"] == "fp32"}
    ref_fp = {r["threads"]: r for r in rows if r["mode"] == "fp32" and r["kernel"] == "reference"}
    for r in rows:
        ref = fp[(r["threads"], r["kernel"].split("-")[0])]  # fused-int32 against FP32 fused
        r["call_speedup_vs_fp32_reference"] = ref_fp[r["threads"]]["ms_per_call"] / r["ms_per_call"]
        r["call_speedup_vs_fp32"] = ref["ms_per_call"] / r["ms_per_call"]
        r["throughput_vs_fp32"] = r["molecules_per_s"] / ref["molecules_per_s"]
        r["size_ratio_fp32_over_this"] = ref["file_bytes"] / r["file_bytes"]
    parts = {}
    for name, mode, kernel in (
        ("fp32", "fp32", "reference"),
        ("w4a8", "quantized", "reference"),
        ("w4a8", "quantized", "fused"),
        ("w4a8", "conservative", "fused"),
    ):
        out = subprocess.run(
            base + ["--breakdown", name, mode, kernel, str(min(args.threads))],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
        parts[f"{name} {mode}, {kernel} kernel"] = json.loads(out.strip().splitlines()[-1])
    result = {
        "command": shlex.join(["python", "benchmarks/deploy.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": rows,
        "breakdown": parts,
    }
    result["markdown"] = format_tables(result)
    print(result["markdown"])
    if args.json:
        from gaq_calc.io import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")


def format_tables(result: dict) -> str:
    import torch

    lines = [
        f"`{result['command']}` on {result['machine']}, torch {torch.__version__}:",
        "",
        "Ratios are against FP32 on the same kernel and thread count; the last speed-up column is against "
        "the FP32 reference kernel.",
        "",
        "| model | mode | kernel | threads | ms / call | vs FP32 | MD steps/s | molecules/s (batch) | vs FP32 | "
        "file KiB | FP32 / this size | peak RSS MiB | vs FP32 reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['kernel']} | {r['threads']} | {r['ms_per_call']:.2f} | "
            f"{r['call_speedup_vs_fp32']:.2f}x | "
            f"{r['md_steps_per_s']:.1f} | {r['molecules_per_s']:.0f} ({r['batch_molecules']}) | "
            f"{r['throughput_vs_fp32']:.2f}x | {r['file_bytes'] / 1024:.0f} | {r['size_ratio_fp32_over_this']:.2f}x | "
            f"{r['peak_rss_MiB']:.0f} | {r['call_speedup_vs_fp32_reference']:.2f}x |"
        )
    for variant, parts in result["breakdown"].items():
        lines += [
            "",
            f"Latency breakdown, {variant} (torch.profiler, self CPU time per call):",
            "",
            "| operator class | ms / call | share |",
            "|---|---|---|",
        ]
        lines += [f"| {p['class']} | {p['ms_per_call']:.2f} | {100 * p['share']:.0f}% |" for p in parts]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
