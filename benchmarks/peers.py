"""so3krates-torch against gaq_calc: ASE MD on azobenzene, the calculators alternated in one process.

    pip install '.[bench]'          # so3krates-torch
    python benchmarks/peers.py --threads 1 2 --json benchmarks/results/peers.json

The molecule is gaq_calc.md.load_structure("azobenzene", 0) (shipped rMD17 data). Each calculator gets
its own ASE VelocityVerlet (0.5 fs, float32) from the same Maxwell-Boltzmann velocities (300 K, seeded,
zero linear and angular momentum: gaq_calc.md.maxwell_boltzmann).
After --warmup steps each, --blocks blocks of --steps steps are timed; within a block round the
calculators take turns, in an order rotated every block, and every block starts again from the
starting positions and velocities (so3krates-torch runs with random weights: its forces are not
physical, and left alone its molecule would fly apart and its neighbour list shrink). ms / step is the
median over blocks. The per-call rows time calc.calculate (energy + forces, no integrator) on jittered
positions, again alternated. One process per thread count (torch.set_num_threads in each).

so3krates-torch: randomly initialised (speed does not depend on the weights), built with the
hyperparameters of the shipped gaq_calc model mapped onto its constructor (printed, with what could not
be matched), run through its own ASE calculator (so3krates_torch.calculator.so3.TorchkratesCalculator,
eager PyTorch, forces by autograd). gaq_calc: GAQCalculator with its default kernel.

Prints a markdown table (rendered by gaq_calc.cli.report.peers_markdown, as gaq-report puts it in
README) and writes it as JSON with --json. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import numpy as np

PEER = "so3krates-torch"
# gaq_calc rows: (label, model, GAQCalculator mode); "conservative" is the calculator's default mode
GAQ_VARIANTS = (
    ("w4a8 default", "azobenzene_w4a8.pt", "conservative"),
    ("w4a8 quantized", "azobenzene_w4a8.pt", "quantized"),
    ("fp32", "azobenzene_fp32", "conservative"),
)
CALL_VARIANTS = (PEER, "w4a8 default")  # the per-call row pair

# What in gaq_calc's model has no counterpart in so3krates-torch's constructor (So3krates, 0.2.1).
UNMATCHED = (
    "l=1 channels: gaq_calc carries 64 channels of l=1 vectors per atom ([n, 3, 64]); so3krates-torch's "
    "Euclidean variables for degrees=[1] are one set of l=1 coordinates per atom ([n, 3]), no channel axis. "
    "num_features=64 sets only its invariant width",
    "radial MLP: gaq_calc has one radial MLP shared by all layers, 16 -> 32 (radial_hidden) -> 6 x (3F + H); "
    "so3krates-torch has two filter nets per layer (invariant and Euclidean), each 16 -> 64 -> 64 on the "
    "basis plus 1 -> 16 -> 64 on the Euclidean-variable invariants; their width is num_features, not settable",
    "attention: gaq_calc uses cosine attention with a learnable temperature (tau_init 10), normalised over the "
    "neighbours with a +1 sink; so3krates-torch's weights are filtered query-key dot products divided by "
    "avg_num_neighbors (message_normalization='avg_num_neighbors'; set here to the structure's mean neighbour "
    "count), not normalised over the neighbours",
    "Bessel basis: same sin(k pi r / rc) / r form, but so3krates-torch's frequencies are k = 0..15 (the first "
    "function is zero) and carry no sqrt(2 / rc) prefactor; gaq_calc's are k = 1..16",
    "layer norm: gaq_calc normalises the scalar features before attention and before the exchange (pre-norm); "
    "so3krates-torch's layer_normalization_1/2 normalise after the attention and after the interaction block "
    "(post-norm); both are switched on here",
    "update: gaq_calc's PaiNN-style exchange (vector_mix, exchange_in/out MLP) vs so3krates-torch's "
    "InteractionBlock (one Linear on [invariants, l=1 norms])",
    "species: gaq_calc embeds its 3 elements (H, C, N); so3krates-torch one-hot encodes 118 "
    "(num_elements=118, the table its calculator uses)",
    "forces: gaq_calc's fused C++ kernel has a hand-written backward; so3krates-torch takes them by autograd "
    "(its calculator has no TorchScript or torch.compile option)",
)


def peer_constructor(config: dict, avg_num_neighbors: float | None = None) -> dict:
    """so3krates_torch.modules.models.So3krates keyword arguments for a gaq_calc ModelConfig dict."""
    return {
        "r_max": float(config["cutoff"]),
        "num_radial_basis_fn": int(config["num_rbf"]),
        "degrees": [
            1
        ],  # l_max = 1: So3krates's Euclidean variables hold degrees 1..l_max (l=0 is the invariant branch)
        "num_features": int(config["num_features"]),
        "num_heads": int(config["num_heads"]),
        "num_layers": int(config["num_layers"]),
        "num_elements": 118,
        "radial_basis_fn": "bessel",
        "cutoff_fn": "polynomial",  # the same polynomial envelope as gaq_calc's PolynomialEnvelope
        "cutoff_p": int(config.get("envelope_exponent", 6)),
        "avg_num_neighbors": avg_num_neighbors,
        "final_mlp_layers": 2,  # gaq_calc's readout: LayerNorm, Linear(F, F), SiLU, Linear(F, 1)
        "energy_regression_dim": None,  # = num_features
        "layer_normalization_1": True,
        "layer_normalization_2": True,
        "activation_fn": "silu",
        "energy_activation_fn": "silu",
        "dtype": "float32",
    }


def mapping_lines(config: dict, kwargs: dict) -> list[str]:
    """ "ours -> theirs" lines for the hyperparameters the benchmark is asked to match."""
    pairs = [
        ("num_features", "num_features"),
        ("num_layers", "num_layers"),
        ("num_heads", "num_heads"),
        ("cutoff", "r_max"),
        ("num_rbf", "num_radial_basis_fn"),
        ("envelope_exponent", "cutoff_p"),
    ]
    lines = [f"{ours}={config[ours]} -> {theirs}={kwargs[theirs]}" for ours, theirs in pairs if ours in config]
    lines += [
        "l_max=1 (l=0 and l=1 features) -> degrees=[1]",
        "Bessel basis -> radial_basis_fn='bessel'",
        "polynomial envelope -> cutoff_fn='polynomial'",
        f"radial_hidden={config.get('radial_hidden')} -> (none: filter nets are num_features wide)",
        f"tau_init={config.get('tau_init')} -> (none)",
    ]
    return lines


def rotated(items: list, k: int) -> list:
    """items started at position k (mod len): the order of round k, so no calculator always goes first."""
    k %= len(items)
    return list(items[k:]) + list(items[:k])


def cpu_model(cpuinfo: str) -> str:
    """The first "model name" of /proc/cpuinfo's text (or "unknown")."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return "unknown"


def pairs_within(positions: np.ndarray, cutoff: float) -> int:
    """Directed pairs i != j closer than cutoff (the edges of both calculators' graphs)."""
    d2 = ((positions[:, None, :] - positions[None, :, :]) ** 2).sum(-1)
    return int((d2 < cutoff * cutoff).sum() - len(positions))


def add_ratios(rows: list[dict]) -> list[dict]:
    """ratio = so3krates-torch ms / this row's ms, for the same measure and thread count."""
    peer = {(r["measure"], r["threads"]): r["ms"] for r in rows if r["calculator"] == PEER}
    for r in rows:
        ref = peer.get((r["measure"], r["threads"]))
        r["peer_over_this"] = ref / r["ms"] if ref and r["ms"] else None
    return rows


def summarize(samples_ms: list[float]) -> dict:
    return {
        "ms": float(np.median(samples_ms)),
        "ms_min": float(np.min(samples_ms)),
        "ms_max": float(np.max(samples_ms)),
        "samples": len(samples_ms),
    }


def _make_peer(config: dict, atoms, seed: int):
    import torch
    from so3krates_torch.calculator.so3 import TorchkratesCalculator
    from so3krates_torch.modules.models import So3krates

    avg = pairs_within(atoms.positions, float(config["cutoff"])) / len(atoms)
    kwargs = peer_constructor(config, avg_num_neighbors=round(avg, 3))
    torch.manual_seed(seed)
    model = So3krates(**kwargs).eval()
    calc = TorchkratesCalculator(models=model, model_type="so3krates", default_dtype="float32", device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
    return calc, kwargs, n_params


def worker(args, threads: int) -> dict:
    import torch
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from gaq_calc import GAQCalculator
    from gaq_calc.md import CalculatorTimer, load_structure, maxwell_boltzmann

    torch.set_num_threads(threads)  # a benchmark is an application: it may set threads
    start = load_structure(args.structure, args.frame)
    variants = []  # dicts: label, calc, row metadata
    fp32 = None
    for label, model, mode in GAQ_VARIANTS:
        calc = GAQCalculator(model, mode=mode)
        fp32 = calc if model == "azobenzene_fp32" else fp32
        variants.append(
            {
                "label": label,
                "calc": calc,
                "row": {
                    "calculator": "gaq_calc",
                    "model": model,
                    "mode": mode if calc.quantized else "fp32",
                    "kernel": calc.kernel,
                },
            }
        )
    fp32 = fp32 or GAQCalculator("azobenzene_fp32")  # the hyperparameters to map (the W4A8 shares them)
    config = fp32.model.config.to_dict()
    gaq_params = sum(p.numel() for p in fp32.model.parameters())
    peer_calc, peer_kwargs, peer_params = _make_peer(config, start, args.seed)
    variants.insert(
        0,
        {
            "label": PEER,
            "calc": peer_calc,
            "row": {
                "calculator": PEER,
                "model": "So3krates (random weights)",
                "mode": "fp32",
                "kernel": "TorchkratesCalculator (eager, autograd)",
            },
        },
    )
    if torch.get_num_threads() != threads:
        raise SystemExit(f"asked for {threads} threads, torch runs {torch.get_num_threads()}")

    probe = start.copy()
    maxwell_boltzmann(probe, args.temperature, np.random.default_rng(args.seed))  # zero P and L, exactly T
    p0, x0 = probe.get_momenta(), start.get_positions()
    for v in variants:
        atoms = start.copy()
        atoms.calc = v["calc"]
        atoms.set_momenta(p0)
        v.update(
            atoms=atoms,
            dyn=VelocityVerlet(atoms, timestep=args.timestep * units.fs),
            timer=CalculatorTimer(v["calc"]),
            md=[],
            share=[],
            pairs=[],
            calls=[],
        )

    def reset(v):
        v["atoms"].set_positions(x0)
        v["atoms"].set_momenta(p0)
        v["atoms"].get_forces()  # the block's first force call, outside the clock

    for v in variants:  # warm-up: allocator, caches, the fused kernel's first call
        reset(v)
        v["dyn"].run(args.warmup)
    for b in range(args.blocks):
        for v in rotated(variants, b):
            reset(v)
            v["timer"].reset()
            t0 = time.perf_counter()
            v["dyn"].run(args.steps)
            dt = time.perf_counter() - t0
            v["md"].append(1e3 * dt / args.steps)
            v["share"].append(v["timer"].seconds / dt)
            v["calls"].append(v["timer"].calls / args.steps)
            v["pairs"].append(pairs_within(v["atoms"].positions, float(config["cutoff"])))
        print(
            f"[{threads} thread(s)] block {b + 1}/{args.blocks}: "
            + ", ".join(f"{v['label']} {v['md'][-1]:.2f}" for v in variants)
            + " ms/step",
            file=sys.stderr,
        )

    rows = []
    for v in variants:
        v["timer"].uninstall()
        rows.append(
            {
                **v["row"],
                "label": v["label"],
                "measure": "MD step",
                "threads": threads,
                **summarize(v["md"]),
                "blocks_ms": v["md"],
                "calculate_share": float(np.median(v["share"])),
                "calculations_per_step": float(np.mean(v["calls"])),
                "pairs_at_block_end": float(np.mean(v["pairs"])),
            }
        )

    # per call: energy + forces through calc.calculate on jittered starting positions, alternated
    rng = np.random.default_rng(args.seed)
    calls = [v for v in variants if v["label"] in CALL_VARIANTS]
    times = {v["label"]: [] for v in calls}
    for k in range(args.calls + 5):
        jitter = rng.normal(scale=1e-3, size=x0.shape)
        for v in rotated(calls, k):
            atoms = v["atoms"]
            atoms.set_positions(x0 + jitter)
            t0 = time.perf_counter()
            v["calc"].calculate(atoms, ["energy", "forces"], ["positions"])
            if k >= 5:
                times[v["label"]].append(1e3 * (time.perf_counter() - t0))
    for v in calls:
        rows.append(
            {
                **v["row"],
                "label": v["label"],
                "measure": "call (E+F)",
                "threads": threads,
                **summarize(times[v["label"]]),
                "pairs_at_block_end": float(pairs_within(x0, config["cutoff"])),
            }
        )
    return {
        "rows": rows,
        "peer_constructor": peer_kwargs,
        "peer_parameters": peer_params,
        "gaq_parameters": gaq_params,
        "model_config": config,
        "atoms": len(start),
    }


def machine_info() -> dict:
    import torch

    try:
        with open("/proc/cpuinfo") as fh:
            cpu = cpu_model(fh.read())
    except OSError:
        cpu = platform.processor() or "unknown"
    from importlib.metadata import version

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "cpu_model": cpu,
        "torch": torch.__version__,
        "so3krates_torch": version("so3krates-torch"),
        "ase": version("ase"),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=100, help="MD steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per calculator (median reported)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed MD steps per calculator first")
    parser.add_argument("--calls", type=int, default=50, help="timed energy+forces calls per calculator")
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K, Maxwell-Boltzmann start")
    parser.add_argument("--structure", default="azobenzene", help="gaq_calc.md.load_structure source")
    parser.add_argument("--frame", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if min(args.steps, args.blocks, args.calls, *args.threads) < 1 or args.warmup < 0:
        parser.error("--steps, --blocks, --calls and --threads must be >= 1, --warmup >= 0")

    if args.worker:
        print(json.dumps(worker(args, args.worker)))
        return
    try:
        import so3krates_torch  # noqa: F401
    except ImportError:
        raise SystemExit(
            "so3krates-torch is not installed: pip install 'gaq_calc[bench]' (or pip install so3krates-torch==0.2.1)"
        ) from None
    from gaq_calc.cli.report import peers_markdown

    load_start = os.getloadavg()
    results = []
    for threads in args.threads:  # one process each: no thread pool or allocator state carries over
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--worker", str(threads)],
            env=env,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    first = results[0]
    data = {
        "command": "python benchmarks/peers.py " + " ".join(shlex.quote(a) for a in argv),
        **machine_info(),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "structure": f"{args.structure} frame {args.frame}",
        "atoms": first["atoms"],
        "settings": {
            "integrator": "ase.md.verlet.VelocityVerlet",
            "timestep_fs": args.timestep,
            "temperature_K": args.temperature,
            "dtype": "float32",
            "steps_per_block": args.steps,
            "blocks": args.blocks,
            "warmup_steps": args.warmup,
            "calls": args.calls,
            "seed": args.seed,
        },
        "peer": {
            "package": "so3krates-torch",
            "calculator": "so3krates_torch.calculator.so3.TorchkratesCalculator",
            "calculator_kind": "its own ASE calculator (eager PyTorch, forces by autograd)",
            "weights": "random (torch.manual_seed(seed))",
            "constructor": first["peer_constructor"],
            "parameters": first["peer_parameters"],
            "mapping": mapping_lines(first["model_config"], first["peer_constructor"]),
            "unmatched": list(UNMATCHED),
        },
        "gaq": {"model_config": first["model_config"], "parameters": first["gaq_parameters"]},
        "rows": add_ratios([r for res in results for r in res["rows"]]),
    }
    print("so3krates-torch constructor (So3krates):")
    print("  " + ", ".join(f"{k}={v!r}" for k, v in data["peer"]["constructor"].items()))
    print("mapping (gaq_calc -> so3krates-torch):")
    for line in data["peer"]["mapping"]:
        print("  " + line)
    print("not matched:")
    for line in UNMATCHED:
        print("  - " + line)
    print()
    print(peers_markdown(data))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
