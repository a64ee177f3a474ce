"""The fused kernel of a git revision against the current one, side by side in one process.

    python benchmarks/kernel_versions.py --base 36053eb --check          # bit identity, shipped artifacts
    python benchmarks/kernel_versions.py --base 36053eb --time --rounds 7  # per-call time, alternated

The base revision's fused_cpu.cpp is built under another op namespace (torch.ops.gaq_base) and called
with the parameter list its own gather_parameters (git show of that revision's kernels/fused.py) makes,
so both libraries live in one process. --check compares energies and forces bit for bit on shipped
artifacts (every model, both modes, float32 and float64, one molecule and a batch of five) and exits
non-zero on a difference. --time alternates calls of both kernels on one azobenzene (and optionally a
larger batch) and prints medians and the ratio. Not a test: it builds a second library (~1 min).
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
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


def load_base(rev: str):
    """(module of the base revision's fused.py, torch.ops.gaq_base.energy_forces)."""
    from torch.utils import cpp_extension

    from gaq_calc.kernels.fused import _ninja_on_path, build_spec

    src = git_show(rev, "gaq_calc/kernels/fused_cpu.cpp")
    src = src.replace("TORCH_LIBRARY(gaq,", "TORCH_LIBRARY(gaq_base,").replace(
        "TORCH_LIBRARY_IMPL(gaq,", "TORCH_LIBRARY_IMPL(gaq_base,")
    digest = hashlib.sha256(src.encode()).hexdigest()[:12]
    folder = Path.home() / ".cache" / "gaq_kernel_versions" / digest
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fused_cpu_base.cpp").write_text(src)
    py = folder / "fused_base.py"
    py.write_text(git_show(rev, "gaq_calc/kernels/fused.py"))
    _ninja_on_path()
    _, flags = build_spec()
    cpp_extension.load(name=f"gaq_base_{digest}", sources=[str(folder / "fused_cpu_base.cpp")], extra_cflags=flags,
                       is_python_module=False)
    spec = importlib.util.spec_from_file_location("gaq_fused_base", py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, torch.ops.gaq_base.energy_forces


class BaseKernel:
    """FusedEnergyForces of the base revision, on torch.ops.gaq_base."""

    def __init__(self, module, op, potential, dtype):
        params, self.consts, quant = module.gather_parameters(potential)
        self.quant = module._cast_quantizers(quant, dtype, True)
        self.params = [t.to(dtype) for t in params[:-1]] + [params[-1].to(torch.float64)]
        self.dtype, self.op = dtype, op

    def __call__(self, species, positions, receivers, senders, shifts, batch, n_graphs):
        return self.op(positions.to(self.dtype), species, receivers, senders, shifts.to(self.dtype), batch,
                       int(n_graphs), self.params, self.consts, self.quant)


def batches(species_list, cutoff, dtype, sizes=(1, 5)):
    from gaq_calc.data import GraphDataset, read_frames

    frames = read_frames("azobenzene", "test")
    out = []
    for size in sizes:
        ds = GraphDataset(frames.subset(np.arange(3, 3 + size)), species_list, cutoff)
        out.append(ds.collate(list(range(size))).to("cpu", dtype))
    return out


def kernels(module, op, model: str, mode: str, dtype):
    from gaq_calc.export import load_artifact, set_mode
    from gaq_calc.kernels import FusedEnergyForces

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
    for model, modes in (("fp32", ["conservative"]), ("w8a8", ["conservative", "quantized"]),
                         ("w4a8", ["conservative", "quantized"])):
        for mode in modes:
            for dtype in (torch.float32, torch.float64):
                old, new, species, cutoff = kernels(module, op, model, mode, dtype)
                for b in batches(species, cutoff, dtype):
                    e0, f0 = call(old, b)
                    e1, f1 = call(new, b)
                    same = torch.equal(e0, e1) and torch.equal(f0, f1)
                    bad += not same
                    print(f"{model} {mode} {str(dtype)[6:]} {b.n_graphs} molecule(s): "
                          f"{'identical' if same else 'DIFFERENT'} (max |dE| {(e0 - e1).abs().max().item():.3g}, "
                          f"max |dF| {(f0 - f1).abs().max().item():.3g})")
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
            print(f"{model} {mode} {len(b.species)} atoms, {torch.get_num_threads()} thread(s): base "
                  f"{1e3 * base:.3f} ms, new {1e3 * cur:.3f} ms, base/new {base / cur:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="36053eb", help="git revision of the base kernel")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module, op = load_base(args.base)
    from gaq_calc.kernels import load_extension

    load_extension()
    bad = check(module, op) if args.check else 0
    if args.time:
        timing(module, op, args.rounds, args.calls, args.sizes)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
