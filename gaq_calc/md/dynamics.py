"""ASE integrators for the protocols, initial velocities, and the integrator state a restart needs.

Everything here uses ASE's classes unchanged; this module only chooses them, converts the user's units
(fs, 1/fs) into ASE's time unit, and reads/writes the few pieces of thermostat state that are not in
the atoms (Nose-Hoover chain variables; Bussi's bookkeeping of transferred energy).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms, units
from ase.md.bussi import Bussi
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.nose_hoover_chain import NoseHooverChainNVT
from ase.md.velocitydistribution import Stationary, ZeroRotation, force_temperature
from ase.md.verlet import VelocityVerlet

THERMOSTATS = ("langevin", "bussi", "nose-hoover")


def make_dynamics(
    atoms: Atoms,
    ensemble: str,
    timestep_fs: float,
    *,
    temperature_K: float = 300.0,
    thermostat: str | None = None,
    friction_per_fs: float = 0.01,
    taut_fs: float = 100.0,
    tchain: int = 3,
    rng: np.random.Generator | None = None,
) -> MolecularDynamics:
    """An ASE integrator. NVE: velocity Verlet. NVT: Langevin (friction in 1/fs), Bussi stochastic
    velocity rescaling (time constant taut in fs) or a Nose-Hoover chain (damping time taut in fs,
    tchain thermostats). rng drives the stochastic thermostats; its state is checkpointed."""
    dt = timestep_fs * units.fs
    if ensemble == "nve":
        return VelocityVerlet(atoms, dt)
    if ensemble != "nvt":
        raise ValueError(f"ensemble must be 'nve' or 'nvt', not {ensemble!r}")
    if thermostat == "langevin":
        # fixcm=False: ASE deprecates fixcm=True (it does not sample NVT exactly); the molecule's centre
        # of mass then diffuses, which is harmless in vacuum, and all 3N degrees of freedom are thermalised.
        return Langevin(
            atoms, dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs, fixcm=False, rng=rng
        )
    if thermostat == "bussi":
        return Bussi(atoms, dt, temperature_K=temperature_K, taut=taut_fs * units.fs, rng=rng)
    if thermostat == "nose-hoover":
        return NoseHooverChainNVT(atoms, dt, temperature_K=temperature_K, tdamp=taut_fs * units.fs, tchain=tchain)
    raise ValueError(f"thermostat must be one of {THERMOSTATS}, not {thermostat!r}")


def thermostat_state(dyn: MolecularDynamics) -> dict:
    """Integrator state beyond positions, momenta and the RNG (JSON-serialisable)."""
    if isinstance(dyn, NoseHooverChainNVT):
        th = dyn._thermostat  # ASE keeps the chain variables private; there is no public accessor
        return {"eta": th._eta.tolist(), "p_eta": th._p_eta.tolist()}
    if isinstance(dyn, Bussi):
        return {"transferred_energy": float(dyn.transferred_energy)}
    return {}


def set_thermostat_state(dyn: MolecularDynamics, state: dict) -> None:
    if isinstance(dyn, NoseHooverChainNVT) and state:
        th = dyn._thermostat
        th._eta = np.asarray(state["eta"], dtype=np.float64)
        th._p_eta = np.asarray(state["p_eta"], dtype=np.float64)
    elif isinstance(dyn, Bussi) and state:
        dyn.transferred_energy = float(state["transferred_energy"])


def maxwell_boltzmann(atoms: Atoms, temperature_K: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann velocities at temperature_K with zero linear and angular momentum.

    The velocities are then rescaled so that atoms.get_temperature() (ASE's definition, 3N degrees of
    freedom) equals temperature_K exactly: for a small molecule the sampled temperature scatters by
    tens of K, which would make runs with different seeds start at different energies.
    """
    try:
        from ase.md.velocitydistribution import thermalize_momenta  # ASE >= 3.29
    except ImportError:  # older ASE: the same function under its old name
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    else:
        thermalize_momenta(atoms, temperature_K, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    if temperature_K > 0:
        force_temperature(atoms, temperature_K, unit="K")


def zero_momenta(atoms: Atoms) -> None:
    """Remove total linear and angular momentum, without rescaling (used after a Langevin
    equilibration, whose noise leaves both non-zero), so NVE conserves P = L = 0."""
    Stationary(atoms, preserve_temperature=False)
    ZeroRotation(atoms, preserve_temperature=False)
