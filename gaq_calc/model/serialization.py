"""Model files: tensors and plain data only, loaded with weights_only=True (no arbitrary unpickling).

Every file written here carries a SHA-256 of its contents (weights, config and metadata; the "sha256"
entry), which read_model_file checks: a flipped byte or an edit after writing is refused with a
ModelFileError. Files written before the hash existed still load, with an UnverifiedModelWarning that
says how to re-save them (gaq-resave, which changes no number)."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from gaq_calc.io import atomic_path
from gaq_calc.model.network import GAQPotential

MODEL_FORMAT = "gaq_calc.model"
MODEL_FORMAT_VERSION = 1
INTEGRITY_KEY = "sha256"
CHECKPOINT_FORMAT = "gaq_calc.checkpoint"


class ModelFileError(RuntimeError):
    """A model file that is missing, corrupt, or not a gaq_calc model."""


class UnverifiedModelWarning(UserWarning):
    """A model file without an integrity hash (written before gaq_calc stored one)."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint_file(obj: dict, path: str | Path) -> None:
    """The trainer's resume state (weights, optimizer, counters), atomically, inside an envelope that holds
    the SHA-256 of its torch.save bytes: a damaged checkpoint is refused at resume instead of resuming
    from wrong numbers. (Hashing the bytes, not the content: optimizer states have integer keys.)"""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    envelope = {"format": CHECKPOINT_FORMAT, "payload": payload, INTEGRITY_KEY: hashlib.sha256(payload).hexdigest()}
    atomic_save(envelope, path)


def load_checkpoint_file(path: str | Path) -> dict:
    """A checkpoint written by save_checkpoint_file, its hash checked (ModelFileError, one line, if damaged;
    the file is left as it is), or a plain torch.save checkpoint from before the envelope existed."""
    advice = "move it away to start the run over, or restore it from a copy"
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"training checkpoint {path} cannot be read ({type(exc).__name__}); {advice}") from None
    if not (isinstance(outer, dict) and outer.get("format") == CHECKPOINT_FORMAT):
        return outer
    payload = outer.get("payload")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != outer.get(INTEGRITY_KEY):
        raise ModelFileError(f"training checkpoint {path} fails its SHA-256 check (damaged); {advice}")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def _feed(h, obj: Any) -> None:
    """Feed a canonical, type-tagged encoding of plain data and tensors to the hash `h`: equal content
    gives equal bytes whatever the dict order or the file's pickle layout."""
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"T" if obj else b"F")
    elif isinstance(obj, int):
        s = str(obj).encode()
        h.update(b"i" + struct.pack("<Q", len(s)) + s)
    elif isinstance(obj, float):
        h.update(b"f" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        s = obj.encode("utf-8", "surrogatepass")
        h.update(b"s" + struct.pack("<Q", len(s)) + s)
    elif isinstance(obj, bytes):
        h.update(b"b" + struct.pack("<Q", len(obj)) + obj)
    elif isinstance(obj, (list, tuple)):
        h.update(b"l" + struct.pack("<Q", len(obj)))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("model file dictionaries must have string keys")
        h.update(b"d" + struct.pack("<Q", len(obj)))
        for key in sorted(obj):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        if t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"cannot hash a {t.layout} tensor")
        _feed(h, [str(t.dtype), list(t.shape)])
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(b"t" + struct.pack("<Q", len(data)) + data)
    elif isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        _feed(h, ["torch", type(obj).__name__, str(obj)])
    else:
        raise TypeError(f"cannot hash a {type(obj).__name__} in a model file")


def content_sha256(data: dict) -> str:
    """SHA-256 of a model file's contents (everything but the stored hash itself)."""
    h = hashlib.sha256(b"gaq_calc.model content v1\0")
    _feed(h, {k: v for k, v in data.items() if k != INTEGRITY_KEY})
    return h.hexdigest()


def write_model_file(path: str | Path, data: dict) -> None:
    """Write a model file's contents (a dict as read_model_file returns it) with a fresh integrity hash,
    atomically."""
    data = {k: v for k, v in data.items() if k != INTEGRITY_KEY}
    data[INTEGRITY_KEY] = content_sha256(data)
    atomic_save(data, path)


def save_model(path: str | Path, model: GAQPotential, metadata: dict | None = None) -> None:
    """Config, weights and metadata; a quantization-prepared model also records its quant config."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    data = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "state_dict": state,
        "metadata": metadata or {},
    }
    quant_config = getattr(model, "quant_config", None)
    if quant_config is not None:
        data["quant_config"] = quant_config.to_dict()
    write_model_file(path, data)


def upgrade_state_dict(module: torch.nn.Module, state: dict) -> dict:
    """A state dict written with an older layout of `module`'s classes, in the current one: every submodule
    with an `upgrade_state(state, prefix)` method renames (or drops) its own entries."""
    state = dict(state)
    for name, sub in module.named_modules():
        upgrade = getattr(sub, "upgrade_state", None)
        if upgrade is not None:
            upgrade(state, f"{name}." if name else "")
    return state


def unverified_warning(path: str | Path, kind: str = "model file") -> None:
    warnings.warn(
        f"{path}: this {kind} has no integrity hash (written before gaq_calc stored one), so its weights and "
        f"metadata are unverified; re-save it with `gaq-resave {path}` (changes no number)",
        UnverifiedModelWarning,
        stacklevel=3,
    )


def read_model_file(path: str | Path) -> dict:
    """The raw contents of a model file, validated and integrity-checked; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelFileError(
            f"{path} is not a readable gaq_calc model file ({type(err).__name__}: {_one_line(err)})"
        ) from err
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path} is not a gaq_calc model file (no '{MODEL_FORMAT}' header)")
    if data.get("format_version") != MODEL_FORMAT_VERSION:
        raise ModelFileError(f"{path}: unsupported model format version {data.get('format_version')}")
    stored = data.get(INTEGRITY_KEY)
    if stored is None:
        unverified_warning(path)
        return data
    try:
        actual = content_sha256(data)
    except TypeError as err:
        raise ModelFileError(f"{path}: integrity check failed ({err})") from err
    if stored != actual:
        raise ModelFileError(
            f"{path}: integrity check failed: the weights or metadata do not match the SHA-256 "
            "stored in the file (corrupted or edited after it was written)"
        )
    return data


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
