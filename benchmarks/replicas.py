"""Many replicas: path-integral MD through i-PI with gaq-ipi clients, and the batched call in one process.

    .venv/bin/python benchmarks/replicas.py --json benchmarks/results/replicas.json

1. i-PI, 8-bead PIMD of azobenzene (PILE-L, 300 K, 0.25 fs), W4A8 artifact in conservative mode:
   steps/s with 1 and 2 clients (one structure per request, the classic exchange), and with one client
   taking all 8 beads per request (<batch_size>8</batch_size>, one kernel call per step). Clients run
   with 1 thread each; i-PI and the clients share the machine's cores.
2. In one process: structures/s of GAQCalculator.energies_and_forces on 8 and 64 azobenzene replicas
   (one kernel call) against a loop of single calls, at --threads.
Prints markdown tables and writes them as JSON with --json. Not a test: numbers depend on the machine
and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

PIMD_INPUT = """<simulation verbosity="low" sockets_prefix="{sockets}">
  <output prefix="sim">
    <properties stride="1" flush="1" filename="out">[ step, potential{{electronvolt}} ]</properties>
    <checkpoint stride="100000"/>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>31415</seed></prng>
  <ffsocket name="gaq" mode="unix" pbc="false">
    <address>b</address>
    <batch_size>{batch_size}</batch_size>
  </ffsocket>
  <system>
    <initialize nbeads="{nbeads}">
      <file mode="xyz">azobenzene.xyz</file>
      <velocities mode="thermal" units="kelvin">300</velocities>
    </initialize>
    <forces><force forcefield="gaq"/></forces>
    <motion mode="dynamics">
      <dynamics mode="nvt">
        <timestep units="femtosecond">0.25</timestep>
        <thermostat mode="pile_l"><tau units="femtosecond">100</tau></thermostat>
      </dynamics>
    </motion>
    <ensemble><temperature units="kelvin">300</temperature></ensemble>
  </system>
</simulation>
"""


def _last_step(path: Path) -> int:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return -1
    return int(float(lines[-1].split()[0])) if lines else -1


def pimd_steps_per_second(
    model: str, mode: str, clients: int, batch_size: int, nbeads: int, steps: int, warmup: int, timeout: float = 600.0
) -> float:
    """Steps/s of i-PI between step `warmup` and the last step (clients loaded and connected before)."""
    ipi = shutil.which("i-pi", path=str(Path(sys.executable).parent)) or shutil.which("i-pi")
    if ipi is None:
        raise SystemExit("i-PI is not installed: pip install -e .[ipi]")
    run = Path(tempfile.mkdtemp(prefix="gaqbench"))
    sockets = tempfile.mkdtemp(prefix="gb", dir="/tmp") + "/"
    shutil.copy(REPO / "examples" / "ipi" / "azobenzene.xyz", run)
    (run / "input.xml").write_text(
        PIMD_INPUT.format(sockets=sockets, steps=warmup + steps, nbeads=nbeads, batch_size=batch_size)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    try:
        for k in range(clients):
            cmd = [
                sys.executable,
                "-m",
                "gaq_calc.cli.ipi",
                "--model",
                model,
                "--mode",
                mode,
                "--unix",
                "b",
                "--sockets-prefix",
                sockets,
                "--structure",
                str(run / "azobenzene.xyz"),
                "--threads",
                "1",
                "--wait",
                str(timeout),
            ]
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env=env,
                    stdout=open(run / f"client{k}.log", "w"),  # noqa: SIM115 (the child keeps it)
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + timeout
        for k in range(clients):  # models loaded: i-PI then meets every client at once
            while "waiting up to" not in (run / f"client{k}.log").read_text():
                if procs[k].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"client failed: {(run / f'client{k}.log').read_text()[-2000:]}")
                time.sleep(0.05)
        server = subprocess.Popen(
            [ipi, "input.xml"],
            cwd=run,
            env=env,
            stdout=open(run / "ipi.log", "w"),  # noqa: SIM115 (the child keeps it)
            stderr=subprocess.STDOUT,
        )
        procs.append(server)
        out = run / "sim.out"
        t_start = None
        while True:
            step = _last_step(out)
            now = time.perf_counter()
            if t_start is None and step >= warmup:
                t_start, s_start = now, step
            if step >= warmup + steps:
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"i-PI stopped at step {step}: {(run / 'ipi.log').read_text()[-2000:]}")
            time.sleep(0.01)
        rate = (step - s_start) / (now - t_start)
        server.wait(60)
        return rate
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)


def batched_vs_loop(model: str, mode: str, n_replicas: int, repeats: int) -> dict:
    """Median structures/s of one batched call and of a loop of single calls, on perturbed replicas."""
    from gaq_calc import GAQCalculator
    from gaq_calc.md.protocols import load_structure

    calc = GAQCalculator(model, mode=mode)
    base = load_structure(None)
    rng = np.random.default_rng(0)

    def replicas():
        out = []
        for _ in range(n_replicas):
            atoms = base.copy()
            atoms.positions += rng.normal(scale=0.02, size=atoms.positions.shape)
            out.append(atoms)
        return out

    def loop(structures):
        for atoms in structures:
            calc.calculate(atoms, ["energy", "forces"], ["positions"])

    def batch(structures):
        calc.energies_and_forces(structures)

    times = {"loop": [], "batched": []}
    for k in range(repeats + 1):
        for name, fn in (("loop", loop), ("batched", batch)):
            structures = replicas()  # fresh positions every time
            t0 = time.perf_counter()
            fn(structures)
            if k:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    loop_rate = n_replicas / float(np.median(times["loop"]))
    batch_rate = n_replicas / float(np.median(times["batched"]))
    return {
        "replicas": n_replicas,
        "atoms": len(base),
        "loop_structures_per_s": loop_rate,
        "batched_structures_per_s": batch_rate,
        "speedup": batch_rate / loop_rate,
        "kernel": calc.kernel,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="azobenzene_w4a8.pt")
    parser.add_argument("--mode", default="conservative")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process batched call")
    parser.add_argument("--pimd-steps", type=int, default=100, help="timed PIMD steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--replicas", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    command = "python benchmarks/replicas.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    pimd = []
    for clients, batch_size in [(1, 1), (2, 1), (1, 8)]:
        rate = pimd_steps_per_second(args.model, args.mode, clients, batch_size, 8, args.pimd_steps, args.warmup_steps)
        pimd.append(
            {
                "beads": 8,
                "clients": clients,
                "batch_size": batch_size,
                "steps_per_s": rate,
                "structures_per_s": 8 * rate,
            }
        )
        print(f"PIMD: {clients} client(s), batch {batch_size}: {rate:.1f} steps/s", file=sys.stderr)
    batched = [batched_vs_loop(args.model, args.mode, n, args.repeats) for n in args.replicas]

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [
        f"`{command}` on {machine}:",
        "",
        "| i-PI PIMD, 8 beads, azobenzene | clients | beads per request | steps/s | structures/s |",
        "|---|---|---|---|---|",
    ]
    for row in pimd:
        exchange = "classic" if row["batch_size"] == 1 else "batched"
        lines.append(
            f"| {exchange} exchange | {row['clients']} | {row['batch_size']} | {row['steps_per_s']:.1f} | "
            f"{row['structures_per_s']:.0f} |"
        )
    lines += [
        "",
        f"| in one process ({args.threads} thread) | replicas | loop of single calls (structures/s) | "
        "batched call (structures/s) | speed-up |",
        "|---|---|---|---|---|",
    ]
    for row in batched:
        lines.append(
            f"| energies_and_forces, {row['kernel']} kernel | {row['replicas']} | "
            f"{row['loop_structures_per_s']:.0f} | {row['batched_structures_per_s']:.0f} | "
            f"{row['speedup']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": command,
                    "machine": machine,
                    "model": args.model,
                    "mode": args.mode,
                    "threads": args.threads,
                    "pimd": pimd,
                    "batched": batched,
                    "markdown": table,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
