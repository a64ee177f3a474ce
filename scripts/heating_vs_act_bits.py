#!/usr/bin/env python
"""How fast NVE heats with rounded activations, against the activation step (issue 12, item 4): the same
weights, the same start and protocol as md_protocols/nve.py, with every rounded activation re-rounded at
another bit width over its own clipping range (quant.api.round_at_bits: A6 has 4x A8's step, A10 a quarter
of it), and the conservative mode (activations not rounded) as the limit of a vanishing step. Example:
    python scripts/heating_vs_act_bits.py --model azobenzene_w4a8_mp.pt --bits 10 6 9 7 8 conservative \\
        --time-ps 100 --equilibrate-ps 2 --threads 1 --no-progress --out results/md_heating
One NVE run per entry in OUT/A{bits} (OUT/conservative), in the order given; each is resumable (rerun the
same command) and a completed one returns at once. Every calculator is built and every restart checked
before the first run starts. After every run the table of all runs of this model in OUT is written,
atomically, to OUT/heating.json, .md and .png (drift against bits). Wider codes than int8 run in the fused
kernel in floating-point units, exactly (A11 at most in float32 for 8-bit weights; --dtype float64 for more).
"""

import argparse
import copy
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np

from gaq_calc import GAQCalculator
from gaq_calc.io import write_json_atomic, write_text_atomic
from gaq_calc.kernels import KernelUnavailable
from gaq_calc.md.cli import (
    UsageError,
    add_common_arguments,
    add_thermostat_arguments,
    check_arguments,
    nve_settings,
    run_main,
    stop_cleanly_on_sigterm,
)
from gaq_calc.md.protocols import load_structure, run_nve
from gaq_calc.md.runner import check_restart
from gaq_calc.quant.api import convert, round_at_bits
from gaq_calc.quant.kinds import ActKind
from gaq_calc.quant.primitives import qrange


def rounding_quantizers(potential) -> list:
    """The activation quantizers that round in quantized mode (not those of unrounded inputs)."""
    return [
        m.act_quantizer for m in potential.modules() if hasattr(m, "packed") and m.act_quantizer.kind != ActKind.NONE
    ]


def parse_entries(values: list[str]) -> list[str]:
    """--bits: bit widths in [2, 16] and/or "conservative", each once; UsageError otherwise."""
    for entry in values:
        if entry != "conservative" and not (entry.isascii() and entry.isdigit() and 2 <= int(entry) <= 16):
            raise UsageError(f"--bits takes integers in [2, 16] or 'conservative', not {entry!r}")
    entries = ["conservative" if e == "conservative" else str(int(e)) for e in values]
    if len(set(entries)) != len(entries):
        raise UsageError(f"--bits names an entry twice: {' '.join(values)}")
    return entries


def run_name(entry: str) -> str:
    return "conservative" if entry == "conservative" else f"A{entry}"


def load_base(model: str, dtype: str) -> GAQCalculator:
    """The model in quantized mode, as its inference network (a QAT checkpoint is converted)."""
    from gaq_calc.model.serialization import ModelFileError

    try:
        base = GAQCalculator(model, mode="quantized", dtype=dtype)
    except (ModelFileError, ValueError) as err:
        raise UsageError(f"--model {model}: {err}") from err
    if any(hasattr(m, "weight_quantizer") for m in base.model.modules()):  # a QAT checkpoint
        path = base.model_path
        base = GAQCalculator(convert(base.model), mode="quantized", dtype=dtype)
        base.model_path = path
    return base


def calculator_at(base: GAQCalculator, entry: str, dtype: str) -> GAQCalculator:
    """The base model with its rounded activations at `entry` bits, on the fused kernel, or its conservative
    mode for entry "conservative". UsageError where the fused kernel cannot run it exactly."""
    if entry == "conservative":
        return GAQCalculator(base.model, mode="conservative", kernel="fused", dtype=dtype)
    model = copy.deepcopy(base.model)
    for q in rounding_quantizers(model):
        round_at_bits(q, int(entry))
    try:
        return GAQCalculator(model, mode="quantized", kernel="fused", dtype=dtype)
    except KernelUnavailable as err:
        raise UsageError(
            f"--bits {entry}: {err}. This study runs the fused kernel: fewer bits, or --dtype float64"
        ) from err


def row(summary: dict, own_bits: int) -> dict:
    bits = summary.get("act_bits")
    return {
        "activations": "not rounded (conservative mode)" if bits is None else f"A{bits}",
        "act_bits": bits,
        "step_vs_own": None if bits is None else qrange(own_bits)[1] / qrange(bits)[1],  # same range
        "status": summary["status"],
        "simulated_ps": summary.get("simulated_ps"),
        "drift_meV_per_atom_per_ps": summary.get("energy_drift_meV_per_atom_per_ps"),
        "drift_stderr_meV_per_atom_per_ps": summary.get("energy_drift_stderr_meV_per_atom_per_ps"),
        "mean_temperature_K": summary.get("mean_temperature_K"),
    }


def rows_in(out: Path, model_path: str, own_bits: int) -> list[dict]:
    """A row for every run in out of this model (its summary.json), by bits, the conservative mode last."""
    rows = []
    for path in sorted(out.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if summary.get("model_path") == model_path and "act_bits" in summary:
            rows.append(row(summary, own_bits))
    return sorted(rows, key=lambda r: (r["act_bits"] is None, r["act_bits"] or 0))


def fmt(x, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def power_law(rows: list[dict], min_sigmas: float = 3.0) -> dict | None:
    """drift = c x (step / own step)^p, by weighted least squares of log drift against log step over the rows
    whose drift is above min_sigmas standard errors (the others are not resolved from zero). None below two
    such rows. The exponent's standard error comes from the drifts' standard errors."""
    used = [
        r
        for r in rows
        if r["act_bits"] is not None
        and r["drift_stderr_meV_per_atom_per_ps"]
        and (r["drift_meV_per_atom_per_ps"] or 0) > min_sigmas * r["drift_stderr_meV_per_atom_per_ps"]
    ]
    if len(used) < 2:
        return None
    x = np.log([r["step_vs_own"] for r in used])
    y = np.log([r["drift_meV_per_atom_per_ps"] for r in used])
    w = np.array([(r["drift_meV_per_atom_per_ps"] / r["drift_stderr_meV_per_atom_per_ps"]) ** 2 for r in used])
    xm = (w * x).sum() / w.sum()
    sxx = (w * (x - xm) ** 2).sum()
    if sxx == 0:
        return None
    slope = (w * (x - xm) * (y - (w * y).sum() / w.sum())).sum() / sxx
    intercept = (w * y).sum() / w.sum() - slope * xm
    return {
        "exponent": float(slope),
        "exponent_stderr": float(np.sqrt(1.0 / sxx)),
        "drift_at_own_step": float(np.exp(intercept)),
        "rows_used": [r["activations"] for r in used],
        "min_sigmas": min_sigmas,
    }


def markdown(result: dict) -> str:
    own = result["own_act_bits"]
    lines = [
        f"| activations | step / A{own}'s | status | NVE ps | drift (meV/atom/ps) | std. error | mean T (K) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['activations']} | {fmt(r['step_vs_own'], '.3g')} | {r['status']} | "
            f"{fmt(r['simulated_ps'], '.4g')} | "
            f"{fmt(r['drift_meV_per_atom_per_ps'], '.3g')} | {fmt(r['drift_stderr_meV_per_atom_per_ps'], '.2g')} | "
            f"{fmt(r['mean_temperature_K'], '.0f')} |"
        )
    fit = result.get("fit")
    if fit:
        lines.append(
            f"\nFit over {', '.join(fit['rows_used'])} (drift above {fit['min_sigmas']:g} standard errors): "
            f"drift = {fit['drift_at_own_step']:.3g} meV/atom/ps x (step / A{own}'s)^p, "
            f"p = {fit['exponent']:.2f} ± {fit['exponent_stderr']:.2f}."
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    rows = [r for r in result["rows"] if r["act_bits"] is not None and r["drift_meV_per_atom_per_ps"] is not None]
    fig = Figure(figsize=(5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if rows:
        ax.errorbar(
            [r["act_bits"] for r in rows],
            [r["drift_meV_per_atom_per_ps"] for r in rows],
            yerr=[2 * (r["drift_stderr_meV_per_atom_per_ps"] or 0) for r in rows],
            fmt="o",
            capsize=3,
            label="quantized mode (2 std. errors)",
        )
        bits = sorted({r["act_bits"] for r in rows})
        ax.set_xticks(bits)
        fit, own = result.get("fit"), result["own_act_bits"]
        if fit:
            fitted = [r["act_bits"] for r in rows if r["activations"] in fit["rows_used"]]
            b = np.linspace(min(fitted), max(fitted), 100)  # drawn where it was fitted
            ratio = (2 ** (own - 1) - 1) / (2 ** (b - 1) - 1)
            ax.plot(b, fit["drift_at_own_step"] * ratio ** fit["exponent"], color="C0", lw=0.8,
                    label=f"fit: step^{fit['exponent']:.2f}")  # fmt: skip
    ax.set_yscale("symlog", linthresh=0.01)
    for r in result["rows"]:
        if r["act_bits"] is None and r["drift_meV_per_atom_per_ps"] is not None:
            ax.axhline(r["drift_meV_per_atom_per_ps"], color="gray", ls="--", label="conservative mode")
    ax.axhline(0.15, color="red", ls=":", label="target 0.15")
    ax.set_xlabel("activation bits (same clipping range)")
    ax.set_ylabel("NVE energy drift (meV/atom/ps)")
    ax.set_title(f"{result['model']}: {result['time_ps']:g} ps NVE per point", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--equilibrate-ps", type=float, default=2.0, help="NVT before each NVE run (default 2)")
    add_thermostat_arguments(parser, prefix="equilibrate-")
    parser.add_argument(
        "--bits", nargs="+", required=True, help="activation bit widths (2-16) and/or 'conservative', run in this order"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "scripts/heating_vs_act_bits.py", *argv])
    return run_main(lambda: study(args, command))


def study(args, command: str) -> int:
    entries = parse_entries(args.bits)
    check_arguments(args)
    if not args.time_ps > 0:
        raise UsageError(f"--time-ps must be > 0 ps, not {args.time_ps}")
    if args.out is None:
        raise UsageError("--out is required")
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base = load_base(args.model, args.dtype)
    own = {q.bits for q in rounding_quantizers(base.model)}
    if len(own) != 1:
        raise UsageError(f"--model {args.model} must round its activations at one bit width, not {sorted(own)}")
    own_bits, model_path = own.pop(), str(base.model_path)
    out = Path(args.out)
    table = out / "heating.json"
    if table.exists() and json.loads(table.read_text()).get("model_path") != model_path:
        raise UsageError(f"{table} is the table of another model; give another --out")
    settings, equilibration = nve_settings(args)
    plans = []  # every calculator built and every restart checked before the first run writes anything
    for entry in entries:
        calc = calculator_at(base, entry, args.dtype)
        atoms = load_structure(args.structure, args.frame)
        atoms.calc = calc
        metadata = {
            "model": str(args.model),
            "model_path": model_path,
            "act_bits": None if entry == "conservative" else int(entry),
            "mode": calc.mode,
            "kernel": calc.kernel,
            "dtype": args.dtype,
            "torch_threads": torch.get_num_threads(),
            "command": command,
        }
        check_restart(out / run_name(entry), "equilibration", atoms, equilibration, metadata)
        check_restart(out / run_name(entry), "trajectory", atoms, settings, metadata)
        plans.append((entry, atoms, metadata))

    def write_table() -> str:
        """The table of every run of this model in OUT (a stopped one included), atomically."""
        result = {
            "model": str(args.model),
            "model_path": model_path,
            "own_act_bits": own_bits,
            "time_ps": args.time_ps,
            "equilibrate_ps": args.equilibrate_ps,
            "temperature_K": args.temperature,
            "timestep_fs": args.timestep,
            "dtype": args.dtype,
            "command": command,
            "rows": rows_in(out, model_path, own_bits),
        }
        result["fit"] = power_law(result["rows"])
        write_json_atomic(table, result)
        write_text_atomic(out / "heating.md", markdown(result) + "\n")
        plot(result, out / "heating.png")
        return markdown(result)

    stop_cleanly_on_sigterm()
    text = None
    try:
        for entry, atoms, metadata in plans:
            summary = run_nve(
                atoms,
                settings,
                out / run_name(entry),
                equilibration=equilibration,
                restart=True,
                progress=not args.no_progress,
                metadata=metadata,
            )
            drift = fmt(summary.get("energy_drift_meV_per_atom_per_ps"), ".3g")
            print(f"{run_name(entry)}: {summary['status']}, drift {drift} meV/atom/ps", flush=True)
            text = write_table()
    except BaseException:
        if out.exists():  # a stop: the stopped run's summary is written by now, and goes in the table
            write_table()
        raise
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
