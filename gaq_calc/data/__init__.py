"""Data: readers (rMD17 npz, QM9, ASE files), reference energies, neighbour graphs and batching."""

from gaq_calc.data.frames import Frames, read_ase, read_frames, read_rmd17, shipped_split, train_val_split
from gaq_calc.data.graphs import GraphBatch, GraphDataset, neighbour_graph, species_index
from gaq_calc.data.qm9 import qm9_split, read_qm9
from gaq_calc.data.reference import fit_reference_energies

__all__ = [
    "Frames",
    "GraphBatch",
    "GraphDataset",
    "fit_reference_energies",
    "neighbour_graph",
    "qm9_split",
    "read_ase",
    "read_frames",
    "read_qm9",
    "read_rmd17",
    "shipped_split",
    "species_index",
    "train_val_split",
]
