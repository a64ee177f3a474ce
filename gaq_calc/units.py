"""Unit conversions, in one place. Inside gaq_calc everything is in ASE units (eV, Å)."""

from ase import units

#: 1 kcal/mol in eV (ase.units: kcal / mol = 0.0433641...).
KCAL_PER_MOL_TO_EV: float = units.kcal / units.mol
#: meV per eV, for reporting.
MEV_PER_EV: float = 1000.0


def kcal_mol_to_ev(x):
    """Energies in kcal/mol (or forces in kcal/mol/Å) to eV (eV/Å)."""
    return x * KCAL_PER_MOL_TO_EV


#: 1 hartree in eV (ase.units.Hartree = 27.211386...), for QM9's energies.
HARTREE_TO_EV: float = units.Hartree


def hartree_to_ev(x):
    """Energies in hartree to eV."""
    return x * HARTREE_TO_EV
