"""HDF5 trajectories that survive a kill, the restart checkpoint, and atomic JSON writes.

Why the file survives a kill: frames are buffered in memory and appended in batches, each batch
followed by `h5py.File.flush()`. Between batches nothing touches the file, so a process killed at any
moment leaves the file as it was after the last flush (HDF5 is only at risk while a write is under way).
The checkpoint (exact float64 positions and momenta, RNG and thermostat state) is written atomically
*after* the frames it refers to were flushed, so the trajectory always reaches at least the
checkpoint's step; a restart drops the few frames a kill can leave after it (they are recomputed
exactly), and nothing is lost or duplicated.

Why the writer checks for room before every write: HDF5 cannot recover from a failed write. With h5py
3.16 / HDF5 2.0 a write that fails on a full disk (or past the file-size limit) is reported only as
ignored errors while h5py releases the dataset, and the next flush crashes the process with a
segfault. So the writer stops with `DiskFullError` while there is still room, before HDF5 sees a
failure; the file then stays as after its last flush.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from gaq_calc.io import write_json_atomic

#: Per-frame datasets: name -> (shape after the frame axis given n_atoms, dtype).
FRAME_FIELDS = {
    "step": (lambda n: (), np.int64),
    "time_ps": (lambda n: (), np.float64),
    "positions": (lambda n: (n, 3), np.float64),  # Å
    "velocities": (lambda n: (n, 3), np.float64),  # Å/fs
    "potential_energy": (lambda n: (), np.float64),  # eV
    "kinetic_energy": (lambda n: (), np.float64),  # eV
    "total_energy": (lambda n: (), np.float64),  # eV
    "temperature": (lambda n: (), np.float64),  # K, ASE's definition (3N minus constrained DOF)
}

UNITS = {
    "step": "MD steps",
    "time_ps": "ps",
    "positions": "Å",
    "velocities": "Å/fs",
    "potential_energy": "eV",
    "kinetic_energy": "eV",
    "total_energy": "eV",
    "temperature": "K",
}


#: Room kept free beyond the next trajectory write: HDF5 metadata, then the checkpoint, summary and plot
#: that follow it (plus per atom: the checkpoint's JSON, twice while it is replaced).
HEADROOM_BYTES = 4 * 2**20
HEADROOM_BYTES_PER_ATOM = 512


class RestartError(RuntimeError):
    """A restart that cannot continue the saved run consistently (changed settings or system, missing
    frames, a damaged checkpoint). Raised before anything is written."""


class DiskFullError(OSError):
    """Too little room for the next trajectory write; raised before HDF5 writes anything."""


def free_bytes(path: str | os.PathLike) -> int:
    """Room left to write `path`: free disk space (for this user) and, where the process has a
    file-size limit (RLIMIT_FSIZE), what that limit leaves the file."""
    path = Path(path)
    room = shutil.disk_usage(path if path.is_dir() else path.parent).free
    try:
        import resource
    except ImportError:  # not POSIX
        return room
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        room = min(room, limit - (path.stat().st_size if path.is_file() else 0))
    return room


def read_json(path: str | os.PathLike):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({'empty file' if not err.doc else err})") from err


class TrajectoryWriter:
    """Appends frames to resizable datasets of an HDF5 file, in batches.

    `append` only buffers; `flush` writes the buffer and flushes the file. The caller decides when
    (every K frames or every few seconds) and writes its checkpoint after `flush` returns.
    """

    def __init__(
        self, path: str | os.PathLike, n_atoms: int, attrs: dict | None = None, *, resume_step: int | None = None
    ):
        """Create `path` (resume_step None; refuses to overwrite) or reopen it for a restart, keeping
        only frames with step <= resume_step (a kill can leave a few frames after the last checkpoint;
        the caller checks that these are all it drops)."""
        self.path = Path(path)
        self.n_atoms = int(n_atoms)
        self._frames: list[dict] = []  # one append per frame: a signal cannot leave half a frame
        self.last_step = None if resume_step is None else int(resume_step)  # of the frames in the file
        chunk_frames = max(1, min(256, 2**20 // max(1, 24 * self.n_atoms)))  # ~1 MiB chunks
        self._chunks = {
            name: (chunk_frames if shape(self.n_atoms) else 4096, *shape(self.n_atoms))
            for name, (shape, _) in FRAME_FIELDS.items()
        }
        self._frame_bytes = sum(
            int(np.prod(shape(self.n_atoms))) * np.dtype(dtype).itemsize for shape, dtype in FRAME_FIELDS.values()
        )
        self._chunk_bytes = sum(
            int(np.prod(self._chunks[name])) * np.dtype(dtype).itemsize for name, (_, dtype) in FRAME_FIELDS.items()
        )
        if resume_step is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._check_room(0)
            self.file = h5py.File(self.path, "w-")
            for name, (shape, dtype) in FRAME_FIELDS.items():
                s = shape(self.n_atoms)
                self.file.create_dataset(
                    name, shape=(0, *s), maxshape=(None, *s), dtype=dtype, chunks=self._chunks[name]
                )
                self.file[name].attrs["units"] = UNITS[name]
            for key, value in (attrs or {}).items():
                self.file.attrs[key] = value
            self.file.flush()
        else:
            steps, _ = saved_frames(self.path)  # checked read-only: a refused restart writes nothing
            keep = int(np.searchsorted(steps, resume_step, side="right"))
            if keep == 0 or steps[keep - 1] != resume_step:
                raise RestartError(
                    f"{self.path}: no frame at the checkpoint's step {resume_step} "
                    f"(last steps {steps[-3:].tolist()}); cannot restart consistently"
                )
            self._check_room(0)
            self.file = h5py.File(self.path, "r+")
            for name in FRAME_FIELDS:  # drops frames after the checkpoint, and any frame cut off mid-write
                if self.file[name].shape[0] != keep:
                    self.file[name].resize(keep, axis=0)
            self.file.flush()
        self._n_written = int(self.file["step"].shape[0])

    def _check_room(self, n_frames: int) -> None:
        """Raise DiskFullError unless there is room to write n_frames: their bytes, one new chunk per
        dataset (HDF5 allocates whole chunks) and the headroom for what follows the write."""
        need = (
            n_frames * self._frame_bytes + self._chunk_bytes + HEADROOM_BYTES + HEADROOM_BYTES_PER_ATOM * self.n_atoms
        )
        room = free_bytes(self.path)
        if room < need:
            saved = "no frame is saved" if self.last_step is None else f"frames up to step {self.last_step} are saved"
            raise DiskFullError(
                errno.ENOSPC,
                f"only {max(room, 0) / 2**20:.2f} MiB of room left for "
                f"{self.path} (a write needs {need / 2**20:.2f} MiB with headroom); stopped "
                f"before writing, as HDF5 cannot recover from a failed write; {saved}",
            )

    def __len__(self) -> int:
        return self._n_written + self.pending

    def append(self, **frame) -> None:
        missing = set(FRAME_FIELDS) - set(frame)
        if missing:
            raise KeyError(f"frame lacks {sorted(missing)}")
        self._frames.append(frame)

    @property
    def pending(self) -> int:
        return len(self._frames)

    def flush(self) -> None:
        """Write the buffered frames and flush the file. Idempotent if interrupted part-way (an
        exception raised by a signal handler between two datasets): the buffer is cleared only after
        every dataset holds the frames, and a repeated call rewrites the same slices."""
        k = self.pending
        if k:
            self._check_room(k)
            n0, n1 = self._n_written, self._n_written + k
            for name, (_shape, dtype) in FRAME_FIELDS.items():
                ds = self.file[name]
                if ds.shape[0] != n1:
                    ds.resize(n1, axis=0)
                ds[n0:n1] = np.asarray([frame[name] for frame in self._frames], dtype=dtype)
            self._n_written = n1
            self.last_step = int(self._frames[-1]["step"])
            self._frames = []
        self.file.flush()

    def close(self) -> None:
        """Flush and close. The file is closed even when the flush fails (no room): an h5py file left
        open until the interpreter exits is flushed again there, where a failure cannot be reported."""
        if self.file.id.valid:
            try:
                self.flush()
            finally:
                self.file.close()


def read_trajectory(path: str | os.PathLike, names=None) -> tuple[dict[str, np.ndarray], dict]:
    """The datasets (arrays over frames) and the file attributes of a trajectory.

    names: the datasets to read (default all); reading only energies skips the positions and
    velocities, which are most of a long run's file.
    """
    with h5py.File(path, "r") as f:
        missing = [n for n in names or () if n not in f]
        if missing:
            raise KeyError(f"{path} has no dataset {missing}; it has {sorted(f.keys())}")
        return {name: f[name][:] for name in (names or f.keys())}, _attrs(f)


def saved_frames(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Steps of the complete frames of a trajectory, and its attributes; read-only. A kill during a
    flush can leave later datasets shorter than earlier ones: a frame is complete when all hold it."""
    with h5py.File(path, "r") as f:
        n = min(f[name].shape[0] for name in FRAME_FIELDS)
        return f["step"][:n], _attrs(f)


def read_frame(path: str | os.PathLike, index: int) -> dict:
    """One frame (every dataset at `index`) of a trajectory."""
    with h5py.File(path, "r") as f:
        return {name: f[name][index] for name in FRAME_FIELDS}


def read_attrs(path: str | os.PathLike) -> dict:
    with h5py.File(path, "r") as f:
        return _attrs(f)


def _attrs(f: h5py.File) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}


# ---- checkpoint: exact state at a logged step -------------------------------------------------


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """state: {'step', 'positions' [N,3] Å, 'momenta' [N,3] ASE units, 'rng', 'thermostat', ...};
    arrays are stored as nested lists of Python floats, which JSON round-trips bit-exactly."""
    data = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    write_json_atomic(path, data)


CHECKPOINT_KEYS = ("step", "positions", "momenta", "rng", "settings")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's state; ValueError naming the file when it is damaged (truncated, empty, fields
    missing or malformed), which an atomically written checkpoint only is by outside hands."""
    data = read_json(path)
    try:
        missing = [key for key in CHECKPOINT_KEYS if key not in data]
        if missing:
            raise ValueError(f"no {missing}")
        if not isinstance(data["settings"], dict):
            raise ValueError("settings is not a mapping")
        for key in ("positions", "momenta"):
            data[key] = np.asarray(data[key], dtype=np.float64)
            if data[key].ndim != 2 or data[key].shape[1] != 3:
                raise ValueError(f"{key} of shape {data[key].shape}")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} is damaged ({err})") from err
    return data
